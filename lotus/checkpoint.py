"""Checkpoint files: atomic writes, plain safetensors weights, and the resumable training state.

Every write goes to a temporary file in the same folder followed by ``os.replace``, so a kill at any
moment leaves either the old file or the new one, never a truncated one. Loading never unpickles
arbitrary objects: weights come from safetensors or ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from lotus.errors import LotusError
from pruning import apply_widths, get_widths

__all__ = [
    "atomic_write", "atomic_write_text", "export_state_dict", "save_weights", "load_weights",
    "read_state_dict", "read_metadata", "save_state", "load_state",
]


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None]) -> None:
    """Call ``write_fn(tmp_path)`` then atomically move the temporary file onto ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and safetensors) make 0600; use what open() would give
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


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


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the plain weights as safetensors; block widths (for thinned models) go in the metadata.

    ``state_dict``: write these full tensors instead of ``model``'s own (FSDP2-sharded models, whose
    gathered state comes from ``lotus.parallel.get_full_state``)."""
    meta = dict(metadata or {})
    widths = _structured_widths(model) if state_dict is None else None
    if widths is not None:
        meta.setdefault("widths", widths)
    tensors = export_state_dict(model) if state_dict is None else {
        k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"lotus": json.dumps(meta)}))


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then '{'
    return len(head) == 9 and head[8:9] == b"{"


def read_metadata(path: str | os.PathLike) -> dict:
    """The Lotus metadata stored in a safetensors file ({} for other files)."""
    path = os.fspath(path)
    if not _is_safetensors(path):
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise LotusError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        return json.loads(meta.get("lotus", "{}"))
    except json.JSONDecodeError:
        return {}


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


def load_weights(model: nn.Module, path: str | os.PathLike, key: str = "checkpoint") -> nn.Module:
    """Load weights into ``model`` (rebuilding thinned block widths first when the file records them).

    A classifier whose shape differs (another number of classes) is left at its fresh initialisation
    with a warning; every other missing, unexpected or mis-shaped tensor is an error.
    """
    path = os.fspath(path)
    sd = read_state_dict(path, key)
    widths = read_metadata(path).get("widths")
    if widths:
        if get_widths(model) != widths:
            apply_widths(model, widths)
    own = model.state_dict()
    head = _classifier_prefix(model)
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    head_only = [k for k in mismatched if head and k.startswith(head)]
    if head_only and len(head_only) == len(mismatched):
        warnings.warn(f"{key}: classifier {head} has another shape in {path}; it keeps its fresh initialisation")
        sd = {k: v for k, v in sd.items() if k not in head_only}
    elif mismatched:
        k = mismatched[0]
        raise LotusError(
            f"{key}: {path} does not fit model: {k} has shape {tuple(sd[k].shape)}, model expects {tuple(own[k].shape)}"
        )
    missing = [k for k in own if k not in sd and k not in head_only]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]})")
        raise LotusError(f"{key}: {path} does not fit model: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=not head_only)
    return model


def _classifier_prefix(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    return f"{name}." if isinstance(name, str) else None


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically save the training state (tensors and plain containers only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


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
