"""The ``lotus:`` config section: the LOTUS schedule's phases and on-the-fly sample tickets.

Only the user's choices live here; :class:`lotus.features.schedule.plan.Schedule` turns them (with the
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
    scorer: str = "loss"
    policy: str = "ccs"
    fraction: float = field(default=0.5, metadata=_FRACTION)
    class_balanced: bool = True
    epochs: list[float] = field(default_factory=list)  # default: [warmup_epochs]
    every: int = field(default=0, metadata={"min": 0})  # then re-select every N epochs (0: no more)
    options: dict[str, Any] = field(default_factory=dict)  # scorer/policy options (e.g. beta for ccs)


_SHARE = {"min": 0.0, "max": 1.0}


@dataclass
class AutoConfig:
    """``lotus.auto``: the thresholds of ``lotus.schedule: auto`` (see :mod:`lotus.features.schedule.auto`).
    Every decision is taken at an epoch boundary and applies from the next epoch on."""

    # warm-up ends after the first epoch (from the second on) that lowers the mean train loss by less than this
    # share of the epoch before's, and at the latest after max_warmup of the budget
    warmup_improvement: float = field(default=0.05, metadata=_SHARE)
    max_warmup: float = field(default=0.25, metadata=_SHARE)
    # anneal (full data, all tokens): once val accuracy has not improved by more than plateau_delta for
    # plateau_patience evaluated epochs of the reduced phase, and at the latest for the last anneal_share
    anneal_share: float = field(default=0.15, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    plateau_patience: int = field(default=4, metadata={"min": 1})
    plateau_delta: float = field(default=0.0, metadata={"min": 0.0})
    # structured thinning (reduced phase, once): at each epoch end the probe thins a copy to the largest of these
    # shares of pruning.structured's heads/mlp and thins the model when the copy's loss on the probe batches gives
    # back at most thin_tolerance of the loss learned so far (ln(classes) - probe loss); at thin_by of the budget
    # it takes the largest candidate within tolerance (or none). thin_after: no probe before this share of the
    # budget (the probe sees only the loss right after thinning; a model thinned early can converge lower)
    thin_candidates: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    thin_tolerance: float = field(default=0.1, metadata={"min": 0.0})
    thin_by: float = field(default=0.5, metadata=_SHARE)
    thin_after: float = field(default=0.0, metadata=_SHARE)
    # patch keep rate, scorer cls_attention: lowered by keep_rate_step (down to tickets.patches.keep_rate) while
    # the CLS attention mass on the patches the lower rate keeps is at least attention_mass. scorer random: the
    # floor (tickets.patches.keep_rate) from epoch 0, raised (keep_rate_step rungs) once the probe batches are
    # learned when the model gives back more than keep_tolerance of the loss learned so far (ln(classes) - probe
    # loss on all patches) on that many random patches, or when the train loss fell by less than keep_stall (0: off)
    attention_mass: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    keep_tolerance: float = field(default=0.25, metadata={"min": 0.0})
    keep_stall: float = field(default=0.05, metadata=_SHARE)
    keep_rate_step: float = field(default=0.125, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    # before the first lowering: time one training step on all patches and on the lowest rate the signal
    # allows now, and the re-ranking (online cls_attention); patch tickets stay off for the run when the time
    # they would save per epoch is not more than what re-ranking costs per epoch
    patches_must_pay: bool = True
    # dynamic ratio: 1 - (mean below-mean loss - min) / (mean - min), at most the share of below-mean samples
    # that are learned (loss < learned_loss * ln(classes)), capped at tickets.dynamic.ratio, in ratio_step steps
    ratio_step: float = field(default=0.05, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    learned_loss: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    probe_batches: int = field(default=2, metadata={"min": 1})  # fixed, un-augmented train batches

    def check(self, prefix: str) -> None:
        if not self.thin_candidates or not all(0.0 < c <= 1.0 for c in self.thin_candidates):
            raise ConfigError(f"{prefix}.thin_candidates: expected a non-empty list of shares in (0, 1], "
                              f"got {self.thin_candidates!r}")
        if self.thin_after > self.thin_by:
            raise ConfigError(f"{prefix}.thin_after: expected at most {prefix}.thin_by ({self.thin_by:g}), "
                              f"got {self.thin_after:g}")


@dataclass
class ScheduleConfig:
    """``lotus:``: dense warm-up, a reduced phase (tickets, dynamic pruning, patch tickets, pruning events),
    then a full-data anneal, in (fractional) epochs."""

    enabled: bool = False
    warmup_epochs: float = field(default=0.0, metadata={"min": 0.0})
    anneal_epochs: float = field(default=0.0, metadata={"min": 0.0})
    reselect: ReselectConfig = field(default_factory=ReselectConfig)
    # fixed: the phases above; auto: Lotus picks them from signals measured during training (lotus.auto)
    schedule: Literal["fixed", "auto"] = "fixed"
    auto: AutoConfig = field(default_factory=AutoConfig)
