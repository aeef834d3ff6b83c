"""The LOTUS schedule as an object: built once from the user's config, it answers per epoch with a plan.

Phases, in fractional epochs (``schedule.enabled``; without it every epoch is phase ``train``)::

    0 ........ warmup_epochs ............................ epochs - anneal_epochs ........ epochs
    dense, full data, all tokens | data reduction (tickets, dynamic pruning,   | full data, all tokens
                                 | patch tickets), pruning events              | (the final anneal)

What the schedule decides for the features (each keeps its own config section; nothing is written back):

* ``schedule.reselect``: on-the-fly sample tickets are scored at :attr:`Schedule.reselect_epochs` (default: the
  end of warm-up, then every ``reselect.every`` epochs) and trained on until the anneal.
* ``tickets.dynamic``: its anneal fraction is at least ``anneal_epochs / epochs``
  (:attr:`Schedule.dynamic_anneal`).
* ``tickets.patches``: without an explicit ``schedule``, the keep rate is 1.0 during warm-up and anneal and
  ``keep_rate`` in between (:attr:`Schedule.patch_keep_rates`).
* ``pruning``: one-shot / gradual masks and structured thinning happen at their own epochs, which must fall
  after warm-up and before the end (:attr:`Schedule.pruning_events`).

:meth:`Schedule.plan` gives one epoch's :class:`EpochPlan`; the Trainer asks for it at every epoch start,
logs phase changes, and the features read ``trainer.plan``. Resume needs no schedule state: the plan is a
function of the config and the epoch.

With ``schedule.mode: auto`` the phases, the dynamic ratio, the patch keep rate and the structured thinning
come from the decisions in :attr:`Schedule.auto` (:class:`lotus.features.schedule.auto.AutoState`), which the
auto controller records at epoch ends (and saves with its checkpoint state; see
:mod:`lotus.features.schedule.auto`); ``schedule.warmup_epochs``/``anneal_epochs``, ``tickets.patches.schedule``,
``tickets.dynamic.anneal`` and ``pruning.structured.at_epoch`` are then decided, not given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from data_tickets import POLICIES, KeepRateSchedule
from data_tickets.dynamic_plan import prune_epochs
from data_tickets.rules import DataRule, get_rule
from lotus.errors import ConfigError
from lotus.features.schedule.auto import AutoKeepRates, AutoState

Config = Any  # lotus.config.Config (which imports this module to validate schedules)

__all__ = ["Schedule", "EpochPlan", "Phase"]

Phase = Literal["train", "warmup", "reduce", "anneal"]
_OFFLINE_SCORERS = ("el2n", "forgetting")


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch does. ``full_data``: warm-up or anneal, on-the-fly tickets give way to all data;
    ``reselect``: score and select a new on-the-fly ticket now; ``patch_keep_rate``: share of patch tokens
    trained on (1.0 = all); ``dynamic_ratio``: dynamic-pruning ratio in force (0.0 = off or annealing);
    ``pruning``: the ``pruning.*`` event keys that fall in this epoch."""

    epoch: int
    phase: Phase
    full_data: bool
    reselect: bool
    patch_keep_rate: float
    dynamic_ratio: float
    pruning: tuple[str, ...]


class Schedule:
    """The per-epoch plan of a run; raises :class:`ConfigError` for overlapping or impossible schedules."""

    def __init__(self, cfg: Config):
        s = cfg.schedule
        self.epochs = int(cfg.train.epochs)
        self.auto: AutoState | None = None
        if s.mode == "auto":
            self._check_auto(cfg)
            self.auto = AutoState(self.epochs, s.auto.anneal_share, s.auto.max_warmup)
        self.enabled = bool(s.enabled) or self.auto is not None
        self.warmup_epochs = float(s.warmup_epochs) if self.enabled else 0.0
        self.anneal_epochs = float(s.anneal_epochs) if self.enabled else 0.0
        self.reduce_end = self.epochs - self.anneal_epochs
        if not self.enabled and s.reselect.enabled:
            raise ConfigError("schedule.reselect.enabled: needs schedule.enabled: true")
        if self.enabled and self.warmup_epochs + self.anneal_epochs >= self.epochs:
            raise ConfigError(
                f"schedule.anneal_epochs: warmup_epochs + anneal_epochs ({self.warmup_epochs:g} + "
                f"{self.anneal_epochs:g}) must be < train.epochs ({self.epochs}), leaving room for the reduced phase"
            )
        self.reselect_epochs: tuple[int, ...] = self._reselect_epochs(cfg)
        self.patch_keep_rates: KeepRateSchedule | None = self._patch_keep_rates(cfg)
        d = cfg.tickets.dynamic
        self.dynamic_ratio = float(d.ratio) if d.enabled else 0.0
        self.dynamic_anneal = float(d.anneal)
        if d.enabled and self.anneal_epochs > 0:
            self.dynamic_anneal = max(self.dynamic_anneal, self.anneal_epochs / self.epochs)
        if self.auto is not None:
            self.dynamic_anneal = 0.0  # the anneal is a decision: the pruner follows plan.dynamic_ratio
        self.pruning_events: dict[str, float] = self._pruning_events(cfg)

    # ------------------------------------------------------------------ queries
    def phase(self, epoch: float) -> Phase:
        if not self.enabled:
            return "train"
        if self.auto is not None:
            return self.auto.phase(epoch)  # type: ignore[return-value]
        if epoch < self.warmup_epochs:
            return "warmup"
        if epoch >= self.reduce_end:
            return "anneal"
        return "reduce"

    def dynamic_prune_epochs(self) -> int:
        """Epochs ``0 .. n-1`` prune dynamically, the rest anneal (the sampler's anneal, whatever the data rule)."""
        return prune_epochs(self.epochs, self.dynamic_anneal)

    def plan(self, epoch: int) -> EpochPlan:
        if self.auto is not None:
            return self._auto_plan(epoch)
        phase = self.phase(epoch)
        keep = float(self.patch_keep_rates(epoch)) if self.patch_keep_rates is not None else 1.0
        dyn = self.dynamic_ratio if epoch < self.dynamic_prune_epochs() else 0.0
        due = tuple(k for k, e in self.pruning_events.items() if epoch <= e < epoch + 1)
        return EpochPlan(
            epoch=epoch,
            phase=phase,
            full_data=phase in ("warmup", "anneal"),
            reselect=phase == "reduce" and epoch in self.reselect_epochs,
            patch_keep_rate=keep,
            dynamic_ratio=dyn,
            pruning=due,
        )

    def _auto_plan(self, epoch: int) -> EpochPlan:
        a = self.auto
        phase = a.phase(epoch)
        keep = float(self.patch_keep_rates(epoch)) if self.patch_keep_rates is not None else 1.0
        thin = a.thin is not None and a.thin["epoch"] == epoch
        return EpochPlan(
            epoch=epoch,
            phase=phase,
            full_data=phase in ("warmup", "anneal"),  # type: ignore[arg-type]
            reselect=False,
            patch_keep_rate=keep,
            dynamic_ratio=a.dynamic_ratio(epoch) if self.dynamic_ratio else 0.0,
            pruning=("pruning.structured",) if thin else (),
        )

    def plans(self) -> list[EpochPlan]:
        """The whole run, one plan per epoch (for reports and ``--print-plan``-style inspection)."""
        return [self.plan(e) for e in range(self.epochs)]

    # ----------------------------------------------------------------- building
    def _reselect_epochs(self, cfg: Config) -> tuple[int, ...]:
        r = cfg.schedule.reselect
        if not r.enabled:
            return ()
        from data_tickets import SCORERS  # the scorer registry imports torch: read only when reselect is on

        if r.scorer not in SCORERS:
            raise ConfigError(
                f"schedule.reselect.scorer: expected one of {', '.join(sorted(SCORERS))}, got {r.scorer!r}"
            )
        if r.scorer in _OFFLINE_SCORERS:
            raise ConfigError(
                f"schedule.reselect.scorer: {r.scorer} needs proxy trainings; use lotus select offline "
                "and tickets.file, or a single-pass scorer (loss, entropy, margin, grand)"
            )
        if r.policy not in POLICIES:
            raise ConfigError(
                f"schedule.reselect.policy: expected one of {', '.join(sorted(POLICIES))}, got {r.policy!r}"
            )
        if cfg.tickets.file:
            raise ConfigError(
                "schedule.reselect: cannot be combined with tickets.file (choose offline or on-the-fly tickets)"
            )
        first = [int(e) for e in r.epochs] if r.epochs else [int(np.ceil(self.warmup_epochs))]
        out = set(first)
        if r.every:
            e = max(first) + r.every
            while e < self.reduce_end:
                out.add(e)
                e += r.every
        for e in sorted(out):
            if e < self.warmup_epochs or e >= self.reduce_end:
                raise ConfigError(
                    f"schedule.reselect.epochs: epoch {e} is outside the reduced phase "
                    f"[{self.warmup_epochs:g}, {self.reduce_end:g})"
                )
        return tuple(sorted(out))

    def _check_auto(self, cfg: Config) -> None:
        """What ``schedule.mode: auto`` decides itself must not also be given, and it needs something to drive."""
        s, t = cfg.schedule, cfg.tickets
        given = [
            (s.warmup_epochs > 0, "schedule.warmup_epochs"),
            (s.anneal_epochs > 0, "schedule.anneal_epochs"),
            (bool(t.patches.schedule), "tickets.patches.schedule"),
        ]
        for bad, key in given:
            if bad:
                raise ConfigError(f"{key}: decided by schedule.mode: auto; remove it (or use schedule.mode: fixed)")
        if s.reselect.enabled:
            raise ConfigError("schedule.reselect.enabled: not driven by schedule.mode: auto; use schedule.mode: fixed")
        if t.patches.enabled and t.patches.source != "online":
            raise ConfigError(
                "tickets.patches.source: schedule.mode: auto lowers the keep rate from signals of the "
                "model being trained; needs source: online (scorer: cls_attention or random)"
            )
        if cfg.pruning.masks_enabled and cfg.pruning.structured.enabled:
            raise ConfigError(
                "pruning.method: masks cannot be combined with schedule.mode: auto thinning "
                "(pruning.structured), which must come first and happens when the probe says so"
            )
        if t.dynamic.enabled and get_rule(t.dynamic.rule).drop_candidates is DataRule.drop_candidates:
            raise ConfigError(
                f"tickets.dynamic.rule: schedule.mode: auto moves the ratio from the data rule's drop_candidates; "
                f"{t.dynamic.rule!r} has none (use schedule.mode: fixed)"
            )
        if not (t.dynamic.enabled or t.patches.enabled or cfg.pruning.structured.enabled or cfg.resolution.enabled):
            raise ConfigError(
                "schedule.mode: auto needs something to drive: enable tickets.dynamic, "
                "tickets.patches, resolution or pruning.structured"
            )

    def _patch_keep_rates(self, cfg: Config) -> KeepRateSchedule | AutoKeepRates | None:
        p = cfg.tickets.patches
        if not p.enabled:
            return None
        if self.auto is not None:
            return AutoKeepRates(self.auto, p.keep_rate)
        if p.schedule:
            if self.enabled:
                for e, rate in p.schedule:
                    if rate < 1.0 and (e < self.warmup_epochs or e >= self.reduce_end):
                        raise ConfigError(
                            f"tickets.patches.schedule: keep rate {rate:g} at epoch {e:g} overlaps the lotus "
                            f"warm-up/anneal (full tokens before {self.warmup_epochs:g} and from {self.reduce_end:g})"
                        )
            return KeepRateSchedule(p.schedule, p.schedule_mode)
        if not self.enabled:
            return KeepRateSchedule([(0.0, p.keep_rate)], p.schedule_mode)
        points = [(0.0, 1.0)] if self.warmup_epochs > 0 else []
        points.append((self.warmup_epochs, float(p.keep_rate)))
        if self.anneal_epochs > 0:
            points.append((self.reduce_end, 1.0))
        return KeepRateSchedule(points, p.schedule_mode)

    def _pruning_events(self, cfg: Config) -> dict[str, float]:
        pr = cfg.pruning
        events: dict[str, float] = {}
        if pr.masks_enabled:
            if pr.schedule == "one_shot":
                events["pruning.at_epoch"] = pr.at_epoch
            else:
                events["pruning.start_epoch"] = pr.start_epoch
                if pr.end_epoch is not None and pr.end_epoch > self.epochs:
                    raise ConfigError(
                        f"pruning.end_epoch: expected a value <= train.epochs ({self.epochs}), got {pr.end_epoch:g}"
                    )
        if pr.structured.enabled and self.auto is None:  # auto: the thinning epoch is a decision
            events["pruning.structured.at_epoch"] = pr.structured.at_epoch
        for key, e in events.items():
            if e >= self.epochs:
                raise ConfigError(f"{key}: expected a value < train.epochs ({self.epochs}), got {e:g}")
            if self.enabled and self.auto is None and e < self.warmup_epochs:
                raise ConfigError(
                    f"{key}: epoch {e:g} falls inside the lotus warm-up (< {self.warmup_epochs:g}); "
                    "prune after warm-up or shorten schedule.warmup_epochs"
                )
        return events
