"""The ``tickets.dynamic`` config section (see :mod:`lotus.features.dynamic.callback` for what ``ratio`` means)."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DynamicConfig"]


@dataclass
class DynamicConfig:
    """``tickets.dynamic``: InfoBatch-style dynamic data pruning (see the module docstring for ``ratio``)."""

    enabled: bool = False
    ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    anneal: float = field(default=0.125, metadata={"min": 0.0, "max": 1.0})
    seed: int | None = None  # default: train.seed
    export_ticket: bool = False  # write <run_dir>/dynamic_ticket.npz (final kept set + last losses) at the end
