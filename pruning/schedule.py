"""When to prune: Zhu & Gupta's gradual cubic schedule, one-shot pruning, and a pruner for plain training loops.

Zhu & Gupta (2017), "To prune, or not to prune": sparsity grows from ``s_i`` to ``s_f`` over ``n`` pruning
steps spaced ``dt`` apart starting at ``t0``:  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3``.
Pruning fast early (while the network can recover) and slowly near the target.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from .config import MagnitudeConfig, SemiStructuredConfig, WandaConfig, check_sparsity
from .masks import FilterFn, enforce_masks_, load_masks, masks_state

__all__ = ["GradualSchedule", "OneShotSchedule", "cubic_sparsity", "GradualPruner"]


def cubic_sparsity(
    step: float,
    final_sparsity: float,
    start_step: float,
    end_step: float,
    frequency: float | None = 1,
    initial_sparsity: float = 0.0,
) -> float:
    """Target sparsity at ``step``: 0 before ``start_step``, the cubic ramp evaluated at the last pruning step
    (``start_step + k * frequency``, and ``end_step`` itself) not after ``step``, ``final_sparsity`` from
    ``end_step`` on. Time may be fractional (e.g. epochs); ``frequency=None`` evaluates the ramp continuously."""
    if step < start_step:
        return 0.0
    if step >= end_step:
        return float(final_sparsity)
    t = step if frequency is None else start_step + ((step - start_step) // frequency) * frequency
    frac = (t - start_step) / (end_step - start_step)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3)


@dataclass
class GradualSchedule:
    """Cubic sparsity ramp from ``initial_sparsity`` at ``start_step`` to ``final_sparsity`` at ``end_step``,
    updated every ``frequency`` steps (and always at ``end_step``)."""

    final_sparsity: float
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        self.final_sparsity = check_sparsity(self.final_sparsity, "final_sparsity")
        self.initial_sparsity = check_sparsity(self.initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity: expected <= final_sparsity ({self.final_sparsity}), got {self.initial_sparsity}"
            )
        if self.start_step < 0:
            raise ValueError(f"start_step: expected an int >= 0, got {self.start_step}")
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step: expected > start_step ({self.start_step}), got {self.end_step}")
        if self.frequency < 1:
            raise ValueError(f"frequency: expected an int >= 1, got {self.frequency}")

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, self.final_sparsity, self.start_step, self.end_step,
                              self.frequency, self.initial_sparsity)

    def update_steps(self) -> list[int]:
        steps = list(range(self.start_step, self.end_step, self.frequency))
        return steps + [self.end_step]

    def is_update_step(self, step: int) -> bool:
        return step == self.end_step or (
            self.start_step <= step < self.end_step and (step - self.start_step) % self.frequency == 0
        )


@dataclass
class OneShotSchedule:
    """Prune once, to ``sparsity``, at ``step``."""

    sparsity: float
    step: int = 0

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        if self.step < 0:
            raise ValueError(f"step: expected an int >= 0, got {self.step}")

    def sparsity_at(self, step: int) -> float:
        return self.sparsity if step >= self.step else 0.0

    def update_steps(self) -> list[int]:
        return [self.step]

    def is_update_step(self, step: int) -> bool:
        return step == self.step


class GradualPruner:
    """Drives a schedule from a plain training loop: call ``pruner.step(step)`` after every optimiser step.

    It re-zeroes the stored weights under the masks (weight decay/momentum move them) and, when the schedule's
    target sparsity rises, re-scores and re-masks the selected layers. Catching up after a resume is
    automatic: the target is a function of the step, not of how many updates ran.

    ``method`` chooses the scoring (its own sparsity is ignored, the schedule's is used). N:M has a fixed
    sparsity, so it only works with a ``OneShotSchedule`` (the schedule's sparsity must then be ``1 - n/m``
    or is ignored). Wanda re-runs calibration at every update.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: GradualSchedule | OneShotSchedule,
        method: MagnitudeConfig | WandaConfig | SemiStructuredConfig | None = None,
        filter_fn: FilterFn | None = None,
        calib_loader: Any = None,
    ) -> None:
        method = method if method is not None else MagnitudeConfig()
        if isinstance(method, SemiStructuredConfig) and not isinstance(schedule, OneShotSchedule):
            raise ValueError(
                "schedule: N:M sparsity is fixed by n:m, use a OneShotSchedule (gradual needs magnitude or wanda)"
            )
        if isinstance(method, WandaConfig) and calib_loader is None:
            raise ValueError("calib_loader: Wanda scoring needs calibration data")
        self.model, self.schedule, self.method = model, schedule, method
        self.filter_fn, self.calib_loader = filter_fn, calib_loader
        self.current = 0.0
        self.history: list[dict[str, Any]] = []

    def target(self, step: int) -> float:
        if isinstance(self.method, SemiStructuredConfig):
            return self.method.sparsity if step >= self.schedule.update_steps()[0] else 0.0
        return self.schedule.sparsity_at(step)

    def step(self, step: int) -> dict[str, Any] | None:
        """Enforce masks, prune if the target rose; returns the prune report when pruning happened."""
        enforce_masks_(self.model)
        target = self.target(step)
        if target <= self.current + 1e-12 or target <= 0.0:
            return None
        from .api import prune_  # late import: api imports nothing from here, avoids a cycle on package import

        cfg = self.method
        if isinstance(cfg, MagnitudeConfig):
            cfg = MagnitudeConfig(sparsity=target, scope=cfg.scope)
        elif isinstance(cfg, WandaConfig):
            cfg = WandaConfig(sparsity=target, scope=cfg.scope, max_calib_batches=cfg.max_calib_batches)
        report = prune_(self.model, cfg, calib_loader=self.calib_loader, filter_fn=self.filter_fn)
        self.current = target
        event = {"step": int(step), "target": target, "sparsity": report["total"]["sparsity"]}
        self.history.append(event)
        return report

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "history": list(self.history), "masks": masks_state(self.model),
                "schedule": asdict(self.schedule)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks: dict[str, Tensor] = state.get("masks", {})
        load_masks(self.model, masks)
        self.current = float(state.get("current", 0.0))
        self.history = list(state.get("history", []))
