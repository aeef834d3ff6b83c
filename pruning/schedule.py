"""When to prune: Zhu & Gupta's gradual cubic schedule, one-shot pruning, and a pruner for plain training loops.

Zhu & Gupta (2017), "To prune, or not to prune": sparsity grows from ``s_i`` to ``s_f`` over ``n`` pruning
steps spaced ``dt`` apart starting at ``t0``:  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3``.
Pruning fast early (while the network can recover) and slowly near the target.

Time is whatever clock the caller counts in: optimiser steps (ints) or fractional epochs (floats, e.g. a ramp
from epoch 1.5 to 6.0); schedules and ``GradualPruner.step`` accept both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from .api import prune_
from .config import MagnitudeConfig, check_sparsity
from .masks import FilterFn, enforce_masks_, load_masks, masks_state
from .registry import method_for, method_names, methods
from .registry import needs_calibration as _needs_calibration

__all__ = ["GradualSchedule", "OneShotSchedule", "cubic_sparsity", "GradualPruner", "CalibSource"]

CalibSource = Iterable[Any] | Callable[[], Iterable[Any]]
_EPS = 1e-9  # float clocks: 0.3 / 0.1 is 2.999..., which still counts as the third update


def _check_time(value: object, field: str) -> None:
    """One-line ``ValueError`` naming ``field`` unless ``value`` is a finite int/float >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{field}: expected a number >= 0, got {value!r}")


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
    t = step if frequency is None else start_step + math.floor((step - start_step) / frequency + _EPS) * frequency
    frac = (t - start_step) / (end_step - start_step)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3)


@dataclass
class GradualSchedule:
    """Cubic sparsity ramp from ``initial_sparsity`` at ``start_step`` to ``final_sparsity`` at ``end_step``,
    updated every ``frequency`` time units (and always at ``end_step``).

    Times are ints (steps) or floats (fractional epochs). ``frequency=None`` evaluates the ramp continuously:
    the target rises at every time between ``start_step`` and ``end_step``.
    """

    final_sparsity: float
    start_step: float = 0
    end_step: float = 1000
    frequency: float | None = 100
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        self.final_sparsity = check_sparsity(self.final_sparsity, "final_sparsity")
        self.initial_sparsity = check_sparsity(self.initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity: expected <= final_sparsity ({self.final_sparsity}), got {self.initial_sparsity}"
            )
        _check_time(self.start_step, "start_step")
        _check_time(self.end_step, "end_step")
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step: expected > start_step ({self.start_step}), got {self.end_step}")
        f = self.frequency
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0):
            raise ValueError(f"frequency: expected a number > 0 or None (continuous), got {f!r}")

    def sparsity_at(self, step: float) -> float:
        """Target sparsity at time ``step``."""
        return cubic_sparsity(
            step, self.final_sparsity, self.start_step, self.end_step, self.frequency, self.initial_sparsity
        )

    def update_steps(self) -> list[float]:
        """Times at which the target changes: ``start_step + k * frequency`` before ``end_step``, then
        ``end_step``. A continuous schedule has no discrete updates (``ValueError``)."""
        if self.frequency is None:
            raise ValueError("frequency: a continuous schedule (frequency=None) has no discrete update steps")
        n = math.ceil((self.end_step - self.start_step) / self.frequency - _EPS)
        return [self.start_step + k * self.frequency for k in range(n)] + [self.end_step]

    def is_update_step(self, step: float) -> bool:
        """True when the target changes at ``step`` (every time in ``[start_step, end_step]`` if continuous)."""
        if step == self.end_step:
            return True
        if not self.start_step <= step < self.end_step:
            return False
        if self.frequency is None:
            return True
        k = (step - self.start_step) / self.frequency
        return abs(k - round(k)) <= _EPS


@dataclass
class OneShotSchedule:
    """Prune once, to ``sparsity``, at time ``step`` (an int step or a float epoch)."""

    sparsity: float
    step: float = 0

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        _check_time(self.step, "step")

    def sparsity_at(self, step: float) -> float:
        """Target sparsity at time ``step``: 0 before the prune, ``sparsity`` from it on."""
        return self.sparsity if step >= self.step else 0.0

    def update_steps(self) -> list[float]:
        """The one time the target changes."""
        return [self.step]

    def is_update_step(self, step: float) -> bool:
        """True at the prune time."""
        return step == self.step


class GradualPruner:
    """Drives a schedule from a training loop: call ``pruner.step(t)`` after every optimiser step, with ``t``
    on the schedule's clock (the step count, or fractional epochs such as ``epoch + batch / steps_per_epoch``).

    It re-zeroes the stored weights under the masks (weight decay/momentum move them) and, when the schedule's
    target sparsity rises, re-scores and re-masks the selected layers. Catching up after a resume is
    automatic: the target is a function of the time, not of how many updates ran.

    ``method`` is any registered mask config (:mod:`pruning.registry`) and chooses the scoring; for a method
    whose sparsity is a setting (``gradual``: magnitude, Wanda, Taylor) the schedule's sparsity replaces it.
    N:M has a fixed sparsity, so it only works with a ``OneShotSchedule`` (the schedule's sparsity must then
    be ``1 - n/m`` or is ignored). Methods that need calibration data (Wanda, Taylor, N:M with
    ``score="wanda"``) re-run calibration at every prune. ``calib_loader`` is an iterable of batches or a
    zero-argument callable returning one; the callable is called once per prune that needs calibration data,
    and never for magnitude scoring. ``reduce_sum`` and ``loss_fn`` are passed to :func:`pruning.prune_`
    (data-parallel calibration: each process passes its share of the batches).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: GradualSchedule | OneShotSchedule,
        method: Any | None = None,
        filter_fn: FilterFn | None = None,
        calib_loader: CalibSource | None = None,
        reduce_sum: Callable[[Tensor], Tensor] | None = None,
        loss_fn: Callable[[Tensor, Tensor | None], Tensor] | None = None,
    ) -> None:
        method = method if method is not None else MagnitudeConfig()
        info = method_for(method)
        if info.structured:
            raise ValueError(
                f"method: {info.name} changes shapes; GradualPruner applies masks "
                f"(one of {', '.join(method_names(structured=False))})"
            )
        if not info.gradual and not isinstance(schedule, OneShotSchedule):
            gradual = " or ".join(m.name for m in methods() if m.gradual)
            raise ValueError(
                f"schedule: {info.name} sparsity is fixed by its config, use a OneShotSchedule "
                f"(gradual needs {gradual})"
            )
        self.model, self.schedule, self.method = model, schedule, method
        self.filter_fn, self.calib_loader, self.reduce_sum, self.loss_fn = filter_fn, calib_loader, reduce_sum, loss_fn
        if self.needs_calibration and calib_loader is None:
            raise ValueError(f"calib_loader: {info.name} scoring needs calibration data")
        self.current = 0.0
        self.history: list[dict[str, Any]] = []

    @property
    def needs_calibration(self) -> bool:
        """True when the method scores with calibration data (the registry's ``needs_calibration``)."""
        return _needs_calibration(self.method)

    def target(self, step: float) -> float:
        """The sparsity the schedule asks for at time ``step`` (a fixed-sparsity method: its own, once due)."""
        if not method_for(self.method).gradual:
            return self.method.sparsity if step >= self.schedule.step else 0.0
        return self.schedule.sparsity_at(step)

    def step(self, step: float) -> dict[str, Any] | None:
        """Enforce masks, prune if the target rose; returns the prune report when pruning happened."""
        enforce_masks_(self.model)
        target = self.target(step)
        if target <= self.current + 1e-12 or target <= 0.0:
            return None
        cfg = self.method
        if method_for(cfg).gradual:
            cfg = dataclasses.replace(cfg, sparsity=target)
        calib = self._calibration_data() if self.needs_calibration else None
        report = prune_(self.model, cfg, calib, self.filter_fn, loss_fn=self.loss_fn, reduce_sum=self.reduce_sum)
        self.current = target
        when = int(step) if isinstance(step, int) else float(step)
        self.history.append({"step": when, "target": target, "sparsity": report["total"]["sparsity"]})
        return report

    def _calibration_data(self) -> Iterable[Any] | None:
        """The calibration batches for one prune: the iterable itself, or what the factory returns now."""
        src = self.calib_loader
        if callable(src) and not isinstance(src, Iterable):
            return src()
        return src

    def state_dict(self) -> dict[str, Any]:
        """Current target, prune history, masks and schedule (masks as CPU tensors)."""
        return {
            "current": self.current,
            "history": list(self.history),
            "masks": masks_state(self.model),
            "schedule": asdict(self.schedule),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: re-attaches the masks, then the target and history."""
        masks: dict[str, Tensor] = state.get("masks", {})
        load_masks(self.model, masks)
        self.current = float(state.get("current", 0.0))
        self.history = list(state.get("history", []))
