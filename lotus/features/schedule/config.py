"""The ``lotus:`` config section: the LOTUS schedule's phases and on-the-fly sample tickets.

Only the user's choices live here; :class:`lotus.features.schedule.plan.Schedule` turns them (with the
other sections) into a per-epoch plan, without writing anything back into the config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ScheduleConfig", "ReselectConfig"]

_FRACTION = {"min": 0.0, "max": 1.0, "min_exclusive": True}


@dataclass
class ReselectConfig:
    """On-the-fly sample tickets scored with the model being trained (single-pass scorers)."""

    enabled: bool = False
    scorer: str = "loss"
    policy: str = "ccs"
    fraction: float = field(default=0.5, metadata=_FRACTION)
    class_balanced: bool = True
    epochs: list[float] = field(default_factory=list)  # default: [warmup_epochs]
    every: int = field(default=0, metadata={"min": 0})  # then re-select every N epochs (0: no more)
    options: dict[str, Any] = field(default_factory=dict)  # scorer/policy options (e.g. beta for ccs)


@dataclass
class ScheduleConfig:
    """``lotus:``: dense warm-up, a reduced phase (tickets, dynamic pruning, patch tickets, pruning events),
    then a full-data anneal, in (fractional) epochs."""

    enabled: bool = False
    warmup_epochs: float = field(default=0.0, metadata={"min": 0.0})
    anneal_epochs: float = field(default=0.0, metadata={"min": 0.0})
    reselect: ReselectConfig = field(default_factory=ReselectConfig)
