"""Per-block widths of a thinned model: read them (``get_widths``) and rebuild a fresh model to them
(``apply_widths``), so a thinned checkpoint loads into ``timm.create_model(...)`` with ``strict=True``."""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
import torch.nn as nn

from .structured_units import Unit, find_blocks

__all__ = ["get_widths", "apply_widths", "check_thinnable"]


def check_thinnable(units: Sequence[Unit]) -> None:
    """One error naming every layer that cannot be sliced, before anything is changed."""
    problems = []
    for u in units:
        try:
            u.check_thinnable()
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("structured pruning does not support " + "; ".join(problems))


def get_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per-block widths, ``{block: {"heads": num_heads, "mlp": hidden}}`` (JSON-serialisable).

    Saved next to a thinned model's weights, this is what :func:`apply_widths` needs to rebuild it.
    """
    out = {}
    for name, b in find_blocks(model).items():
        w = {}
        if b.attn is not None:
            w["heads"] = b.attn.num_groups
        if b.mlp is not None:
            w["mlp"] = b.mlp.num_groups
        out[name] = w
    return out


def apply_widths(model: nn.Module, widths: dict | str) -> nn.Module:
    """Shrink a freshly created model of the same timm architecture to ``widths`` (in place; returned).

    Keeps the first heads/neurons of each block: the values are meant to be overwritten by loading the thinned
    model's state dict, which then loads with ``strict=True``. ``widths`` is :func:`get_widths` output (or its
    JSON text).
    """
    if isinstance(widths, str):
        try:
            widths = json.loads(widths)
        except json.JSONDecodeError as e:
            raise ValueError(f"widths: not valid JSON ({e})") from None
    if not isinstance(widths, dict):
        raise ValueError(
            f"widths: expected a dict {{block: {{'heads': int, 'mlp': int}}}}, got {type(widths).__name__}"
        )
    blocks = find_blocks(model)
    plan: list[tuple[Unit, int]] = []
    for bname, w in widths.items():
        if bname not in blocks:
            names = list(blocks)
            raise ValueError(f"widths: unknown block {bname!r} (model blocks: {names[0]} .. {names[-1]})")
        if not isinstance(w, dict):
            raise ValueError(f"widths[{bname!r}]: expected a dict with 'heads'/'mlp', got {type(w).__name__}")
        for key, v in w.items():
            unit = {"heads": blocks[bname].attn, "mlp": blocks[bname].mlp}.get(key, False)
            if unit is False:
                raise ValueError(f"widths[{bname!r}]: unknown key {key!r} (expected 'heads' or 'mlp')")
            if unit is None:
                raise ValueError(f"widths[{bname!r}][{key!r}]: block {bname} has no {key} module")
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= unit.num_groups:
                raise ValueError(f"widths[{bname!r}][{key!r}]: expected an int in [1, {unit.num_groups}], got {v!r}")
            plan.append((unit, v))
    check_thinnable([u for u, v in plan if v < u.num_groups])
    for unit, v in plan:
        unit.thin(torch.arange(v))
    return model
