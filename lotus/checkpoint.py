"""Checkpoint files: atomic writes, plain safetensors weights, and the resumable training state.

Every write goes through :mod:`lotus.safe_io` (a Lotus-named temporary file beside the target, then one
rename), so a kill at any moment leaves either the old file or the new one, never a truncated one.
Loading never unpickles arbitrary objects: weights come from safetensors or ``torch.load(..., weights_only=True)``.

A weights file is self-describing: its safetensors metadata holds one JSON entry ``"lotus"`` whose
``"model"`` is the model section that rebuilds it (:func:`model_metadata`: name, img_size, patch_size,
in_chans, num_classes as actually built, kwargs, block, op, widths). Files of older versions, where
``"model"`` is only the name, still load (:func:`read_model_metadata`).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch.nn.utils import parametrize

from lotus.errors import ConfigError, LotusError
from lotus.safe_io import atomic_write, atomic_write_stream, atomic_write_text
from lotus.schema import to_dict, validate
from pruning import apply_widths, get_widths

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "export_state_dict",
    "save_weights",
    "load_weights",
    "read_state_dict",
    "read_metadata",
    "model_metadata",
    "read_model_metadata",
    "model_config_from_checkpoint",
    "save_state",
    "load_state",
]

MODEL_KEYS = ("name", "img_size", "patch_size", "in_chans", "num_classes", "kwargs", "block", "op")


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's plain state dict: parametrized tensors (e.g. pruning masks) exported as their value.

    The result has the keys of the un-parametrized model, so it loads into a fresh ``timm`` model.
    """
    sd = model.state_dict()
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for pname in list(module.parametrizations.keys()):
            drop = f"{prefix}parametrizations.{pname}."
            for k in [k for k in sd if k.startswith(drop)]:
                del sd[k]
            sd[f"{prefix}{pname}"] = getattr(module, pname)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def _structured_widths(model: nn.Module) -> dict | None:
    try:
        return get_widths(model)
    except (ValueError, AttributeError, TypeError):
        return None  # not a block-structured model: nothing to record


def _size(value: Any) -> int | list[int] | None:
    """An int for square sizes (``(16, 16)`` -> 16), a list for others, None when unknown."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        vals = [int(v) for v in value]
        return (vals[0] if len(set(vals)) == 1 else vals) if vals else None
    return int(value)


def _pretrained_cfg(model: nn.Module) -> dict:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg if isinstance(cfg, dict) else {}


def _first_conv(model: nn.Module) -> nn.Module | None:
    name = _pretrained_cfg(model).get("first_conv") or "patch_embed.proj"
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _json_kwargs(kwargs: dict, name: str) -> dict:
    out = {}
    for k, v in (kwargs or {}).items():
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            warnings.warn(
                f"model.kwargs.{k}: a {type(v).__name__} cannot be recorded in the checkpoint; "
                f"pass it again when you rebuild {name}",
                stacklevel=2,
            )
    return out


def _block_of(keys: Any) -> str | None:
    """'op' / 'pre_ln' from characteristic tensor names (OP blocks have residual gains and no norm1)."""
    keys = list(keys)
    if any(k.startswith("blocks.") and k.endswith((".beta_attn", ".beta_mlp")) for k in keys):
        return "op"
    if any(k.startswith("blocks.") and ".norm1." in k for k in keys):
        return "pre_ln"
    return None


def model_metadata(model_cfg: Any, model: nn.Module, widths: bool = True) -> dict:
    """The model section that rebuilds ``model``, with the sizes it was actually built with.

    ``model_cfg`` is the config's ``model`` section (a :class:`lotus.config.ModelConfig`, or None: then only
    what the built model tells). Sizes are read from the timm model (``patch_embed``, ``num_classes``, the
    first conv, ``pretrained_cfg``), so unset config values are recorded as resolved numbers. ``widths``:
    record the block widths (``pruning.get_widths``; off for FSDP-sharded models).
    """
    pcfg = _pretrained_cfg(model)
    pe = getattr(model, "patch_embed", None)
    proj, conv = getattr(pe, "proj", None), _first_conv(model)
    name = getattr(model_cfg, "name", None) or pcfg.get("architecture")
    patch = getattr(model_cfg, "patch_size", None)
    if patch is None and isinstance(proj, nn.Conv2d) and getattr(pe, "backbone", None) is None:
        patch = _size(getattr(pe, "patch_size", None))  # plain patch embedding (not a hybrid CNN stem)
    classes = getattr(model, "num_classes", None)
    block = getattr(model_cfg, "block", None) or _block_of(n for n, _ in model.named_parameters()) or "pre_ln"
    op = getattr(model_cfg, "op", None)
    return {
        "name": name,
        "img_size": _size(getattr(pe, "img_size", None))
        or getattr(model_cfg, "img_size", None)
        or _size(tuple(pcfg.get("input_size", ()))[1:]),
        "patch_size": patch,
        "in_chans": int(conv.in_channels) if hasattr(conv, "in_channels") else getattr(model_cfg, "in_chans", None),
        "num_classes": int(classes) if isinstance(classes, int) else getattr(model_cfg, "num_classes", None),
        "kwargs": _json_kwargs(getattr(model_cfg, "kwargs", None) or {}, str(name)),
        "block": block,
        "op": to_dict(op) if block == "op" and op is not None else None,
        "widths": _structured_widths(model) if widths else None,
        "timm_version": timm.__version__,
    }


def save_weights(
    model: nn.Module,
    path: str | os.PathLike,
    metadata: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    model_cfg: Any = None,
) -> None:
    """Write the plain weights as safetensors; block widths (for thinned models) go in the metadata.

    ``model_cfg`` (the config's ``model`` section): also record the full model section
    (:func:`model_metadata`) as the metadata's ``"model"``, so the file rebuilds without its config.
    ``state_dict``: write these full tensors instead of ``model``'s own (FSDP2-sharded models, whose
    gathered state comes from ``lotus.parallel.get_full_state``)."""
    meta = dict(metadata or {})
    widths = _structured_widths(model) if state_dict is None else None
    if widths is not None:
        meta.setdefault("widths", widths)
    if model_cfg is not None:
        meta["model"] = model_metadata(model_cfg, model, widths=state_dict is None)
    tensors = (
        export_state_dict(model)
        if state_dict is None
        else {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    )
    # serialised here and written by Lotus: no temp file of safetensors' own beside the target
    atomic_write_stream(path, lambda f: f.write(safetensors_bytes(tensors, metadata={"lotus": json.dumps(meta)})))


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then '{'
    return len(head) == 9 and head[8:9] == b"{"


def read_metadata(path: str | os.PathLike, key: str | None = None) -> dict:
    """The Lotus metadata stored in a safetensors file ({} for other files)."""
    path = os.fspath(path)
    if key is not None and not os.path.isfile(path):
        raise LotusError(f"{key}: file not found: {path}")
    if not _is_safetensors(path):
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        where = f"{key}: {path} is" if key else f"{path}:"
        raise LotusError(f"{where} not a readable safetensors file ({_first_line(e)})") from None
    try:
        out = json.loads(meta.get("lotus", "{}"))
    except json.JSONDecodeError:
        return {}
    return out if isinstance(out, dict) else {}


def _section(meta: dict) -> dict | None:
    model = meta.get("model")
    if isinstance(model, str):  # files of older versions record only the name
        section = {"name": model}
    elif isinstance(model, dict):
        section = dict(model)
    else:
        return None
    if meta.get("widths") and not section.get("widths"):
        section["widths"] = meta["widths"]
    return section


def read_model_metadata(path: str | os.PathLike, key: str = "checkpoint") -> dict | None:
    """The model section recorded in a weights file (see :func:`model_metadata`), or None if it records none.

    Files of older versions give ``{"name": ..., "widths": ...}`` only; torch state-dict files give None.
    """
    return _section(read_metadata(path, key))


def model_config_from_checkpoint(
    model_cfg: Any, path: str | os.PathLike, given: dict | None = None, key: str = "--checkpoint"
) -> Any:
    """``model_cfg`` with the model section recorded in ``path`` as its defaults (a new object).

    ``given``: the model keys the user set (config file, ``--set``, flags); they win over the recorded ones
    (``op`` and ``kwargs`` merge key by key). A recorded model of another name than a given one is not used.
    """
    path, given = os.fspath(path), dict(given or {})
    section = read_model_metadata(path, key)
    if not section or not isinstance(section.get("name"), str):
        return model_cfg
    if given.get("name") not in (None, section["name"]):
        return model_cfg  # another architecture was asked for: its sizes are not this file's
    rec = {k: section[k] for k in MODEL_KEYS if section.get(k) is not None}
    kwargs = dict(rec.get("kwargs") or {})  # sizes a ModelConfig cannot hold travel as timm kwargs
    if isinstance(rec.get("img_size"), list):
        kwargs.setdefault("img_size", rec.pop("img_size"))
    if isinstance(rec.get("num_classes"), int) and rec["num_classes"] < 2:
        kwargs.setdefault("num_classes", rec.pop("num_classes"))
    if kwargs:
        rec["kwargs"] = kwargs
    data = to_dict(model_cfg)
    for k, v in rec.items():
        if k not in given:
            data[k] = v
        elif isinstance(v, dict) and isinstance(given[k], dict):
            data[k] = {**v, **given[k]}
    try:
        return validate(type(model_cfg), data, "model")
    except ConfigError as e:
        raise LotusError(f"{key}: {path} records a model section this Lotus cannot use ({e})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_state_dict(path: str | os.PathLike, key: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch state-dict file (``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LotusError(f"{key}: file not found: {path}")
    try:
        if _is_safetensors(path):
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt/unsupported file
        raise LotusError(
            f"{key}: {path} is not a readable safetensors or PyTorch state-dict file ({_first_line(e)})"
        ) from None
    for wrapper in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LotusError(f"{key}: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


_THIN = (".attn.qkv.", ".attn.proj.weight", ".mlp.fc1.", ".mlp.fc2.weight")  # what structured thinning narrows


def _thinned_shape(k: str, theirs: tuple, ours: tuple) -> bool:
    """The file's tensor is this model's, narrowed along one axis as structured thinning does."""
    if not (k.startswith("blocks.") and any(t in k for t in _THIN)) or len(theirs) != len(ours):
        return False
    diff = [(a, b) for a, b in zip(theirs, ours) if a != b]
    return len(diff) == 1 and diff[0][0] < diff[0][1]


def _fit_hint(
    model: nn.Module, section: dict | None, has_widths: bool, key_: str | None = None, thinned: bool = False
) -> str:
    """Why a file may not fit: thinned weights without widths, or the recorded sizes that differ."""
    if thinned:
        if not has_widths:
            return (
                " (thinned weights? Lotus records their widths in the file's metadata and this file has none: "
                "was it written by another tool?)"
            )
        return " (thinned weights whose shapes disagree with the widths in the file's metadata: another tool?)"
    if section:
        own = model_metadata(None, model)
        diffs = [
            k for k in MODEL_KEYS[:5] if section.get(k) is not None and own.get(k) is not None and section[k] != own[k]
        ]
        if diffs:
            return (
                f" (the file was written for {', '.join(f'model.{k}: {section[k]}' for k in diffs)}; this model "
                f"has {', '.join(str(own[k]) for k in diffs)})"
            )
    if key_ in ("pos_embed", "patch_embed.proj.weight"):
        return " (another model.img_size or model.patch_size?)"
    return ""


def load_weights(model: nn.Module, path: str | os.PathLike, key: str = "checkpoint") -> nn.Module:
    """Load weights into ``model`` (rebuilding thinned block widths first when the file records them).

    A classifier whose shape differs (another number of classes) is left at its fresh initialisation
    with a warning; every other missing, unexpected or mis-shaped tensor is a one-line error naming the
    file and the tensor (an OP-block file in a Pre-LN model, or the reverse, says which block to set).
    """
    path = os.fspath(path)
    sd = read_state_dict(path, key)
    meta = read_metadata(path, key)
    section = _section(meta)
    file_block = (section or {}).get("block") or _block_of(sd)
    model_block = _block_of(model.state_dict())
    if file_block and model_block and file_block != model_block:
        raise LotusError(
            f"{key}: {path} was trained with model.block: {file_block} (this model has {model_block} "
            f"blocks); set model.block: {file_block} (or --set model.block={file_block})"
        )
    widths = meta.get("widths")
    if widths:
        try:
            if get_widths(model) != widths:
                apply_widths(model, widths)
        except ValueError as e:
            raise LotusError(
                f"{key}: {path} does not fit model: its block widths do not apply ({_first_line(e)})"
                f"{_fit_hint(model, section, True)}"
            ) from None
    own = model.state_dict()
    head = _classifier_prefix(model)
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    head_only = [k for k in mismatched if head and k.startswith(head)]
    if head_only and len(head_only) == len(mismatched):
        warnings.warn(
            f"{key}: classifier {head} has another shape in {path}; it keeps its fresh initialisation", stacklevel=2
        )
        sd = {k: v for k, v in sd.items() if k not in head_only}
    elif mismatched:
        k = mismatched[0]
        theirs, ours = tuple(sd[k].shape), tuple(own[k].shape)
        thinned = all(_thinned_shape(n, tuple(sd[n].shape), tuple(own[n].shape)) for n in mismatched)
        raise LotusError(
            f"{key}: {path} does not fit model: it has {k} of shape {theirs}, the model expects "
            f"{ours}{_fit_hint(model, section, bool(widths), k, thinned)}"
        )
    missing = [k for k in own if k not in sd and k not in head_only]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]})")
        op = (section or {}).get("op") if file_block == "op" else None
        hint = f" (it was trained with model.op: {json.dumps(op)})" if op else _fit_hint(model, section, bool(widths))
        raise LotusError(f"{key}: {path} does not fit model: {'; '.join(parts)}{hint}")
    model.load_state_dict(sd, strict=not head_only)
    return model


def _classifier_prefix(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    return f"{name}." if isinstance(name, str) else None


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically save the training state (tensors and plain containers only)."""
    atomic_write_stream(path, lambda f: torch.save(state, f))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training state saved by :func:`save_state` without unpickling arbitrary objects."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LotusError(f"resume: no training state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise LotusError(f"resume: {path} is corrupt or not a Lotus training state ({_first_line(e)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise LotusError(f"resume: {path} is not a Lotus training state")
    return state
