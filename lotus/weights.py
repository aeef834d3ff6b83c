"""Weights files and training states: plain safetensors weights (with the model section of
:mod:`lotus.weights_meta`), loading them into a model with errors that say what does not fit, and the
resumable training state.

Every write goes through :mod:`lotus.safe_io` (a Lotus-named temporary file beside the target, then one
rename), so a kill at any moment leaves either the old file or the new one, never a truncated one.
Loading never unpickles arbitrary objects: weights come from safetensors or ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch.nn.utils import parametrize

from lotus.errors import LotusError
from lotus.safe_io import atomic_write_stream
from lotus.weights_meta import (
    MODEL_KEYS,
    block_of,
    first_line,
    is_safetensors,
    model_metadata,
    model_section,
    read_metadata,
    structured_widths,
)
from pruning import apply_widths, get_widths

__all__ = ["export_state_dict", "save_weights", "load_weights", "read_state_dict", "save_state", "load_state"]


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
    widths = structured_widths(model) if state_dict is None else None
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


def read_state_dict(path: str | os.PathLike, key: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch state-dict file (``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LotusError(f"{key}: file not found: {path}")
    try:
        if is_safetensors(path):
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt/unsupported file
        raise LotusError(
            f"{key}: {path} is not a readable safetensors or PyTorch state-dict file ({first_line(e)})"
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
    section = model_section(meta)
    file_block = (section or {}).get("block") or block_of(sd)
    model_block = block_of(model.state_dict())
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
                f"{key}: {path} does not fit model: its block widths do not apply ({first_line(e)})"
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
        raise LotusError(f"resume: {path} is corrupt or not a Lotus training state ({first_line(e)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise LotusError(f"resume: {path} is not a Lotus training state")
    return state
