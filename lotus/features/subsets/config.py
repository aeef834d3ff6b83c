"""The ``tickets.random`` config section: the random-subset baselines (see :mod:`data_tickets.random_subsets`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["RandomSubsetConfig"]


@dataclass
class RandomSubsetConfig:
    """``tickets.random``: random-subset baselines (RS2: Okanovic et al., ICLR 2024)."""

    enabled: bool = False
    """Train each epoch on a random fraction of the training split (the random-subset baselines)."""
    mode: Literal["rs2", "fixed"] = "rs2"
    """fixed: one class-stratified subset for the whole run; rs2: a fresh share each epoch, without replacement
    across epochs (RS2)."""
    fraction: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    """Share of the training split used per epoch."""
    seed: int | None = None
    """Seed of the draws; default: train.seed."""
