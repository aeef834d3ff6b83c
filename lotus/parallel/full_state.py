"""Full, CPU, rank-agnostic training state for plain, DDP and FSDP2 models.

Built on ``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True, cpu_offload=True``:
parameter and optimizer-state keys are the plain model's names (no ``module.`` or checkpoint-wrapper
prefixes, no DTensor shards), so a state saved on 4 ranks with FSDP2 resumes on 2 ranks with DDP, or on
one process, and the reverse. Under a process group the full dicts are gathered on rank 0 (other ranks
get empty dicts: only rank 0 writes files); every rank must call :func:`get_full_state`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from lotus.errors import LotusError
from lotus.weights_meta import first_line

__all__ = ["get_full_state", "set_full_state", "is_sharded", "fold_parametrized_state"]


def get_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_state, optimizer_state)`` as full CPU state dicts keyed by parameter names.

    Collective under FSDP2 (all ranks call it); rank 0 gets the dicts, other ranks empty ones.
    ``optimizer`` None gives an empty optimizer state.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else {}
    return model_sd, optim_sd


def set_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: dict[str, Any] | None,
    optim_sd: dict[str, Any] | None,
) -> None:
    """Load full state dicts from :func:`get_full_state` (saved at any world size) into this rank's model
    and optimizer. Every rank passes the full dicts; ``None`` skips that part (e.g. the Trainer loads the
    model weights before wrapping and only the optimizer state after)."""
    opts = StateDictOptions(full_state_dict=True, strict=True)
    if model_sd is not None:
        try:
            set_model_state_dict(model, model_sd, options=opts)
        except (RuntimeError, KeyError, ValueError) as e:
            raise LotusError(f"checkpoint: model state does not match this model ({first_line(e)})") from None
    if optimizer is not None and optim_sd:
        try:
            set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        except (RuntimeError, KeyError, ValueError) as e:
            raise LotusError(
                f"checkpoint: optimizer state does not match this model/optimizer ({first_line(e)})"
            ) from None


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` holds FSDP2-sharded (DTensor) parameters: its own ``state_dict()`` is then
    per-rank shards, so weights must be written from :func:`get_full_state` instead."""
    return any(isinstance(p, DTensor) for p in model.parameters())


_PARAMETRIZED = re.compile(r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<name>[^.]+)\.(?P<rest>.+)$")


def fold_parametrized_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict with masked parametrizations (``X.parametrizations.w.original`` and
    ``X.parametrizations.w.<i>.mask``, as FSDP2 gathers them) folded into plain ``X.w`` = original * masks:
    the keys of :func:`export_state_dict`, so the file loads into a fresh ``timm`` model."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict] = {}
    for k, v in sd.items():
        m = _PARAMETRIZED.match(k)
        if m is None:
            out[k] = v
            continue
        g = groups.setdefault(m["prefix"] + m["name"], {"original": None, "masks": []})
        rest = m["rest"]
        if rest == "original":
            g["original"] = v
        elif re.fullmatch(r"\d+\.mask", rest):
            g["masks"].append((int(rest.split(".")[0]), v))
        else:
            raise ValueError(f"checkpoint: cannot fold the parametrization state {k!r} (only masks are known)")
    for name, g in groups.items():
        if g["original"] is None:
            raise ValueError(f"checkpoint: parametrized {name!r} has no 'original' tensor")
        w = g["original"]
        for _, mask in sorted(g["masks"], key=lambda t: t[0]):
            w = w * mask.to(w.dtype)
        out[name] = w
    return out
