"""The ``tickets.dynamic`` config section (see :mod:`lotus.features.dynamic.callback` for what ``ratio`` means)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DynamicConfig"]


@dataclass
class DynamicConfig:
    """``tickets.dynamic``: InfoBatch-style dynamic data pruning (see the module docstring for ``ratio``)."""

    enabled: bool = False
    """InfoBatch-style dynamic data pruning: each epoch skip part of the samples whose last loss is below the mean."""
    ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    """Share of the below-mean-loss samples skipped each epoch (not of the dataset); the kept ones are weighted 1/(1
    - ratio)."""
    anneal: float = field(default=0.125, metadata={"min": 0.0, "max": 1.0})
    """The last share of the epochs trains on all data (at least the lotus: schedule's anneal)."""
    seed: int | None = None
    """Seed of the random skips; default: train.seed."""
    export_ticket: bool = False
    """Write RUN_DIR/dynamic_ticket.npz (the final kept set and last losses) at the end."""
