"""Keep rates of patch tickets: the kept patch count for a rate, and the rate per epoch.

The kept count for N patches and keep rate k is ``K = max(1, floor(k * N + 0.5))`` (:func:`num_kept`);
:class:`KeepRateSchedule` gives k per epoch (step or linear between ``(epoch, keep_rate)`` points).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["num_kept", "KeepRateSchedule"]


def num_kept(num_patches: int, keep_rate: float) -> int:
    """Number of patches kept out of ``num_patches`` at ``keep_rate``: ``max(1, floor(k*N + 0.5))``."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate: expected a float in (0, 1], got {keep_rate!r}")
    return max(1, min(num_patches, int(math.floor(keep_rate * num_patches + 0.5))))


@dataclass
class KeepRateSchedule:
    """Keep rate per epoch from ``(epoch, keep_rate)`` points.

    ``mode="step"``: the rate of the last point whose epoch is <= the current epoch (before the first point:
    the first point's rate). ``mode="linear"``: linear interpolation between points, constant outside.
    Example: ``[(0, 1.0), (2, 0.5), (9, 1.0)]`` = full tokens for 2 epochs, half until epoch 9, full after.
    """

    points: Sequence[tuple[float, float]] = field(default_factory=lambda: [(0.0, 0.5)])
    mode: Literal["step", "linear"] = "step"

    def __post_init__(self) -> None:
        pts = []
        for i, p in enumerate(self.points):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise ValueError(f"schedule[{i}]: expected an [epoch, keep_rate] pair, got {p!r}")
            try:
                e, r = float(p[0]), float(p[1])
            except (TypeError, ValueError):
                raise ValueError(f"schedule[{i}]: expected numbers [epoch, keep_rate], got {list(p)!r}") from None
            if e < 0:
                raise ValueError(f"schedule[{i}]: epoch must be >= 0, got {p[0]!r}")
            if not 0.0 < r <= 1.0:
                raise ValueError(f"schedule[{i}]: keep_rate must be in (0, 1], got {p[1]!r}")
            if pts and e <= pts[-1][0]:
                raise ValueError(f"schedule[{i}]: epochs must increase, got {p[0]!r} after {pts[-1][0]!r}")
            pts.append((e, r))
        if not pts:
            raise ValueError("schedule: expected at least one [epoch, keep_rate] point")
        if self.mode not in ("step", "linear"):
            raise ValueError(f"schedule mode: expected 'step' or 'linear', got {self.mode!r}")
        self.points = pts

    def __call__(self, epoch: float) -> float:
        pts = self.points
        if epoch <= pts[0][0]:
            return pts[0][1]
        for (e0, r0), (e1, r1) in zip(pts, pts[1:]):
            if epoch < e1:
                if self.mode == "step":
                    return r0
                return r0 + (r1 - r0) * (epoch - e0) / (e1 - e0)
        return pts[-1][1]

    @property
    def min_rate(self) -> float:
        """Lowest keep rate of the schedule (the share of patches a stored ranking must cover)."""
        return min(r for _, r in self.points)
