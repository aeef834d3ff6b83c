"""Weights-file metadata: the model section a Lotus weights file records (so it rebuilds its model), read back
from safetensors metadata, with the formats of older versions (where ``"model"`` was only the name).

A weights file is self-describing: its safetensors metadata holds one JSON entry ``"lotus"`` whose ``"model"``
is the model section that rebuilds it (:func:`model_metadata`: name, img_size, patch_size, in_chans,
num_classes as actually built, kwargs, block, op, widths).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import timm
import torch.nn as nn
from safetensors import safe_open

from lotus.errors import ConfigError, LotusError
from lotus.schema import to_dict, validate
from pruning import get_widths

__all__ = [
    "MODEL_KEYS",
    "model_metadata",
    "read_metadata",
    "read_model_metadata",
    "model_config_from_checkpoint",
    "model_section",
    "block_of",
    "structured_widths",
    "is_safetensors",
    "first_line",
]

MODEL_KEYS = ("name", "img_size", "patch_size", "in_chans", "num_classes", "kwargs", "block", "op")


def structured_widths(model: nn.Module) -> dict | None:
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


def block_of(keys: Any) -> str | None:
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
    block = getattr(model_cfg, "block", None) or block_of(n for n, _ in model.named_parameters()) or "pre_ln"
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
        "widths": structured_widths(model) if widths else None,
        "timm_version": timm.__version__,
    }


def is_safetensors(path: str) -> bool:
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
    if not is_safetensors(path):
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        where = f"{key}: {path} is" if key else f"{path}:"
        raise LotusError(f"{where} not a readable safetensors file ({first_line(e)})") from None
    try:
        out = json.loads(meta.get("lotus", "{}"))
    except json.JSONDecodeError:
        return {}
    return out if isinstance(out, dict) else {}


def model_section(meta: dict) -> dict | None:
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
    return model_section(read_metadata(path, key))


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


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
