"""The ``schedule:`` config section: the LOTUS schedule's phases and on-the-fly sample tickets.

Only the user's choices live here; :class:`lotus.features.schedule.phases.Schedule` turns them (with the
other sections) into a per-epoch plan, without writing anything back into the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lotus.errors import ConfigError

__all__ = ["ScheduleConfig", "ReselectConfig", "AutoConfig"]

_FRACTION = {"min": 0.0, "max": 1.0, "min_exclusive": True}


@dataclass
class ReselectConfig:
    """On-the-fly sample tickets scored with the model being trained (single-pass scorers)."""

    enabled: bool = False
    """Re-select the sample ticket during training, scored with the model being trained."""
    scorer: str = "loss"
    """Single-pass scorer (loss, el2n, entropy, margin, prototype, cls_attention, ...)."""
    policy: str = "ccs"
    """Selection policy (top, bottom, random, ccs, moderate)."""
    fraction: float = field(default=0.5, metadata=_FRACTION)
    """Share of the training split kept."""
    class_balanced: bool = True
    """Per-class quotas proportional to the class frequencies."""
    epochs: list[float] = field(default_factory=list)
    """Epochs at which to re-select; default: [schedule.warmup_epochs]."""
    every: int = field(default=0, metadata={"min": 0})
    """Then re-select every N epochs; 0: no more."""
    options: dict[str, Any] = field(default_factory=dict)
    """Scorer / policy options (e.g. beta for ccs)."""


_SHARE = {"min": 0.0, "max": 1.0}


@dataclass
class AutoConfig:
    """``schedule.auto``: the thresholds of ``schedule.mode: auto`` (see :mod:`lotus.features.schedule.auto`).
    Every decision is taken at an epoch boundary and applies from the next epoch on."""

    warmup_improvement: float = field(default=0.05, metadata=_SHARE)
    """Warm-up ends after the first epoch (from the second on) that lowers the train loss by less than this share of
    the epoch before's."""
    max_warmup: float = field(default=0.25, metadata=_SHARE)
    """Warm-up ends at the latest after this share of the budget."""
    anneal_share: float = field(default=0.15, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    """The anneal (full data, all patches) covers at least the last share of the budget."""
    plateau_patience: int = field(default=4, metadata={"min": 1})
    """The anneal starts after this many reduced-phase evaluations without a val accuracy gain above plateau_delta."""
    plateau_delta: float = field(default=0.0, metadata={"min": 0.0})
    """Smallest val accuracy gain that counts as an improvement."""
    thin_candidates: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    """Shares of pruning.structured's heads/mlp ratios the thinning probe tries, largest first."""
    thin_tolerance: float = field(default=0.1, metadata={"min": 0.0})
    """Thin when a thinned copy gives back at most this share of the loss learned so far on the probe batches."""
    thin_by: float = field(default=0.5, metadata=_SHARE)
    """Share of the budget by which thinning is decided (the largest candidate within tolerance, or none)."""
    thin_after: float = field(default=0.0, metadata=_SHARE)
    """No thinning probe before this share of the budget."""
    attention_mass: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    """scorer cls_attention: lower the keep rate while the kept patches hold at least this share of the CLS
    attention."""
    keep_tolerance: float = field(default=0.25, metadata={"min": 0.0})
    """scorer random: raise the keep rate when that many random patches give back more than this share of the loss
    learned so far (resolution: raise the side when its probe loss is further than this from full size's)."""
    keep_stall: float = field(default=0.05, metadata=_SHARE)
    """scorer random (and resolution): raise the keep rate (or the side, whichever probe is further off) one rung
    when the train loss fell by less than this share in an epoch; 0: off."""
    keep_rate_step: float = field(default=0.125, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    """Step between keep-rate rungs."""
    patches_must_pay: bool = True
    """Keep patch tickets off for the run when a timed step shows they save no more time per epoch than their ranking
    costs (resolution: train at full size when a timed step at the lowest side saves nothing)."""
    ratio_step: float = field(default=0.05, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    """The dynamic-pruning ratio moves in steps of this size."""
    learned_loss: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    """A sample or probe batch counts as learned below this share of the chance-level loss ln(classes)."""
    probe_batches: int = field(default=2, metadata={"min": 1})
    """Fixed, un-augmented training batches the probes use."""

    def check(self, prefix: str) -> None:
        if not self.thin_candidates or not all(0.0 < c <= 1.0 for c in self.thin_candidates):
            raise ConfigError(
                f"{prefix}.thin_candidates: expected a non-empty list of shares in (0, 1], got {self.thin_candidates!r}"
            )
        if self.thin_after > self.thin_by:
            raise ConfigError(
                f"{prefix}.thin_after: expected at most {prefix}.thin_by ({self.thin_by:g}), got {self.thin_after:g}"
            )


@dataclass
class ScheduleConfig:
    """``schedule:``: dense warm-up, a reduced phase (tickets, dynamic pruning, patch tickets, pruning events),
    then a full-data anneal, in (fractional) epochs."""

    enabled: bool = False
    """Run the LOTUS schedule: dense warm-up, a reduced phase (the enabled data-ticket and pruning features), then a
    full-data anneal."""
    warmup_epochs: float = field(default=0.0, metadata={"min": 0.0})
    """Dense, full-data epochs before the reduced phase (fractional allowed)."""
    anneal_epochs: float = field(default=0.0, metadata={"min": 0.0})
    """Full-data, all-patch epochs at the end (fractional allowed)."""
    reselect: ReselectConfig = field(default_factory=ReselectConfig)
    """On-the-fly sample tickets scored with the model being trained."""
    mode: Literal["fixed", "auto"] = "fixed"
    """fixed: the phases set here; auto: Lotus decides them during training from measured signals (schedule.auto)."""
    auto: AutoConfig = field(default_factory=AutoConfig)
    """Thresholds of schedule.mode: auto (see docs/schedule.md for the rules)."""
