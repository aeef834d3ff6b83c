"""``schedule.mode: auto``: the phases and rates of the LOTUS schedule, decided during training.

Given only the epoch budget, the controller (:class:`lotus.features.schedule.auto_callback.AutoScheduleCallback`)
measures signals at every epoch end (:mod:`lotus.features.schedule.auto_probes`), passes them to the rules
(:mod:`lotus.features.schedule.auto_rules`, which holds the rule table) and records the *decisions* here;
:class:`lotus.features.schedule.phases.Schedule` answers ``plan(epoch)`` from them. A decision taken at the end of
epoch ``e`` applies from epoch ``e + 1`` (``reduce``, ``dynamic_ratio``, ``keep_rate``, ``side``, ``thin``,
``anneal``).

The decisions are the whole state: the controller saves them with its checkpoint and :meth:`AutoState.load`
replays them on resume, so a resumed run plans exactly what the uninterrupted one did.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["AutoState", "AutoKeepRates", "DECISIONS"]

DECISIONS = ("reduce", "dynamic_ratio", "keep_rate", "side", "thin", "anneal")


class AutoState:
    """The decisions of one auto-scheduled run and what they imply per epoch.

    Args:
        epochs: the epoch budget (``train.epochs``).
        anneal_share: share of the budget always kept for the final anneal.
        max_warmup: share of the budget after which warm-up ends without its signal.
    """

    def __init__(self, epochs: int, anneal_share: float, max_warmup: float):
        self.epochs = int(epochs)
        self.latest_anneal = self.epochs - int(math.ceil(anneal_share * self.epochs - 1e-9))
        self.latest_reduce = min(int(math.ceil(max_warmup * self.epochs - 1e-9)), self.latest_anneal)
        self.decisions: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self.reduce_start: int | None = None
        self.anneal_start: int | None = None
        self.ratios: list[tuple[int, float]] = []
        self.keep_rates: list[tuple[int, float]] = []
        self.sides: list[tuple[int, int]] = []
        self.thin: dict[str, Any] | None = None

    # ------------------------------------------------------------------ decisions
    def record(self, decision: dict[str, Any]) -> None:
        """Apply and keep one decision (``what``, ``from_epoch``: the epoch it applies from, ``value``, ...)."""
        what, epoch, value = decision["what"], int(decision["from_epoch"]), decision["value"]
        if what == "reduce":
            self.reduce_start = epoch
        elif what == "anneal":
            self.anneal_start = epoch
        elif what == "dynamic_ratio":
            self.ratios.append((epoch, float(value)))
        elif what == "keep_rate":
            self.keep_rates.append((epoch, float(value)))
        elif what == "side":
            self.sides.append((epoch, int(value)))
        elif what == "thin":
            self.thin = {"epoch": epoch, "heads": float(value["heads"]), "mlp": float(value["mlp"])}
        else:
            raise ValueError(f"auto decision: unknown kind {what!r} (expected one of {', '.join(DECISIONS)})")
        self.decisions.append(dict(decision))

    def load(self, decisions: list[dict[str, Any]]) -> None:
        """Replace the decisions by a saved list (resume) and replay them."""
        self.decisions = []
        self._reset()
        for d in decisions:
            self.record(d)

    # ------------------------------------------------------------------ queries
    def phase(self, epoch: float) -> str:
        """``warmup`` until the reduce decision (or ``max_warmup``), ``anneal`` from its decision (or the
        reserved end), ``reduce`` in between."""
        anneal = self.latest_anneal if self.anneal_start is None else min(self.anneal_start, self.latest_anneal)
        if epoch >= anneal:
            return "anneal"
        reduce = self.latest_reduce if self.reduce_start is None else min(self.reduce_start, self.latest_reduce)
        return "warmup" if epoch < reduce else "reduce"

    @staticmethod
    def _step_value(points: list[tuple[int, float]], epoch: float, default: float) -> float:
        value = default
        for e, v in points:
            if e <= epoch:
                value = v
        return value

    def dynamic_ratio(self, epoch: float) -> float:
        """The decided dynamic-pruning ratio in force (0.0 outside the reduced phase)."""
        return self._step_value(self.ratios, epoch, 0.0) if self.phase(epoch) == "reduce" else 0.0

    def keep_rate(self, epoch: float) -> float:
        """The decided patch keep rate in force (1.0 in the anneal; random patches may start in the warm-up)."""
        return self._step_value(self.keep_rates, epoch, 1.0) if self.phase(epoch) != "anneal" else 1.0

    def side(self, epoch: float) -> int | None:
        """The decided training image side in force (px), or None: full size (no decision, or the anneal)."""
        if self.phase(epoch) == "anneal":
            return None
        side = self._step_value(self.sides, epoch, 0)
        return int(side) if side else None

    def lever_changed(self, epoch: int) -> bool:
        """Whether thinning, a patch keep rate or a side took effect at ``epoch``: then its train loss is not
        comparable with the epoch before's (asked from epoch 1 on; the start decisions apply from epoch 0)."""
        return (
            (self.thin is not None and self.thin["epoch"] == epoch)
            or any(e == epoch for e, _ in self.keep_rates)
            or any(e == epoch for e, _ in self.sides)
        )

    def thin_due(self, progress: float) -> tuple[float, float] | None:
        """``(heads, mlp)`` ratios once the decided thinning epoch is reached, else ``None``."""
        if self.thin is None or progress < self.thin["epoch"]:
            return None
        return self.thin["heads"], self.thin["mlp"]


class AutoKeepRates:
    """A :class:`data_tickets.KeepRateSchedule` look-alike over the auto decisions (what the patch-tickets
    callback reads): ``rate(epoch)``, ``min_rate`` (the floor, ``tickets.patches.keep_rate``) and ``points``
    (the decided changes so far)."""

    def __init__(self, state: AutoState, floor: float):
        self.state = state
        self.floor = float(floor)

    def __call__(self, epoch: float) -> float:
        return self.state.keep_rate(epoch)

    @property
    def min_rate(self) -> float:
        return self.floor

    @property
    def points(self) -> list[tuple[float, float]]:
        st = self.state
        pts: list[tuple[float, float]] = [(0.0, st.keep_rate(0))]
        changes = sorted({int(e) for e, _ in st.keep_rates} | {st.anneal_start or st.latest_anneal})
        for e in changes:
            r = st.keep_rate(e)
            if r != pts[-1][1]:
                pts.append((float(e), r))
        return pts
