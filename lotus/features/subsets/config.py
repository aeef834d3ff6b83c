"""The ``tickets.random`` config section: the random-subset baselines (see :mod:`data_tickets.random_subsets`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["RandomSubsetConfig"]


@dataclass
class RandomSubsetConfig:
    """``tickets.random``: train each epoch on ``fraction`` of the training split, drawn at random:
    ``fixed`` = one class-stratified subset for the run; ``rs2`` = a fresh share each epoch, without replacement
    across epochs (RS2, ICLR 2024)."""

    enabled: bool = False
    mode: Literal["rs2", "fixed"] = "rs2"
    fraction: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    seed: int | None = None  # default: train.seed
