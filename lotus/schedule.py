"""The ``lotus:`` section: one schedule that interleaves data tickets and pruning in a training run.

Phases, in fractional epochs::

    0 ........ warmup_epochs ............................ epochs - anneal_epochs ........ epochs
    dense, full data, all tokens | data reduction (tickets, dynamic pruning,   | full data, all tokens
                                 | patch tickets), pruning events              | (the final anneal)

What it composes (each feature keeps its own section, the schedule fits them into the phases):

* ``reselect``: sample tickets scored **on the fly with the current model** (single-pass scorers such as
  ``loss``/``entropy``/``margin``/``grand``) at ``reselect.epochs`` (default: the end of warm-up), then
  every ``reselect.every`` epochs; the trainer trains on the selected subset until the anneal.
  An offline ticket file (``tickets.file``) is the alternative (not both).
* ``tickets.dynamic`` (InfoBatch-style): its anneal is stretched to cover ``anneal_epochs``.
* ``tickets.patches``: without an explicit ``schedule``, the keep rate is 1.0 during warm-up and anneal
  and ``tickets.patches.keep_rate`` in between.
* ``pruning``: one-shot / gradual masks, 2:4, or structured thinning (the optimiser is rebuilt for the new
  shapes) at their own epochs, which must fall after warm-up and before the end.

Every event is logged with ``trainer.log`` (what, when, how long, fraction/sparsity after it), and the
schedule's state is saved with the training state, so a resumed run continues at the same phase.
The callbacks live in ``lotus.schedule_callbacks`` (imported lazily: ``lotus.config`` imports this module).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lotus.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from lotus.config import Config

__all__ = ["ScheduleConfig", "ReselectConfig", "resolve", "callbacks", "phase_of", "reselect_epochs"]

_FRACTION = {"min": 0.0, "max": 1.0, "min_exclusive": True}


@dataclass
class ReselectConfig:
    """On-the-fly sample tickets scored with the model being trained."""

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
    enabled: bool = False
    warmup_epochs: float = field(default=0.0, metadata={"min": 0.0})
    anneal_epochs: float = field(default=0.0, metadata={"min": 0.0})
    reselect: ReselectConfig = field(default_factory=ReselectConfig)


def phase_of(epoch: float, cfg: "Config") -> Literal["warmup", "reduce", "anneal"]:
    s = cfg.lotus
    if epoch < s.warmup_epochs:
        return "warmup"
    if epoch >= cfg.train.epochs - s.anneal_epochs:
        return "anneal"
    return "reduce"


def reselect_epochs(cfg: "Config") -> list[int]:
    s, total = cfg.lotus, cfg.train.epochs
    r = s.reselect
    first = [int(e) for e in r.epochs] if r.epochs else [int(np.ceil(s.warmup_epochs))]
    out = set(first)
    if r.every:
        e = max(first) + r.every
        while e < total - s.anneal_epochs:
            out.add(e)
            e += r.every
    return sorted(out)


def resolve(cfg: "Config") -> None:
    """Check the schedule against the other sections and derive their phase settings (in place).

    Raises ConfigError for overlapping or impossible schedules.
    """
    s = cfg.lotus
    if not s.enabled:
        if s.reselect.enabled:
            raise ConfigError("lotus.reselect.enabled: needs lotus.enabled: true")
        return
    total = cfg.train.epochs
    if s.warmup_epochs + s.anneal_epochs >= total:
        raise ConfigError(
            f"lotus.anneal_epochs: warmup_epochs + anneal_epochs ({s.warmup_epochs:g} + {s.anneal_epochs:g}) must be "
            f"< train.epochs ({total}), leaving room for the reduced phase")
    reduce_end = total - s.anneal_epochs
    r = s.reselect
    if r.enabled:
        from data_tickets import POLICIES, SCORERS

        if r.scorer not in SCORERS:
            raise ConfigError(f"lotus.reselect.scorer: expected one of {', '.join(sorted(SCORERS))}, got {r.scorer!r}")
        if r.scorer in ("el2n", "forgetting"):
            raise ConfigError(f"lotus.reselect.scorer: {r.scorer} needs proxy trainings; use lotus select offline "
                              "and tickets.file, or a single-pass scorer (loss, entropy, margin, grand)")
        if r.policy not in POLICIES:
            raise ConfigError(f"lotus.reselect.policy: expected one of {', '.join(sorted(POLICIES))}, got {r.policy!r}")
        if cfg.tickets.file:
            raise ConfigError("lotus.reselect: cannot be combined with tickets.file (choose offline or on-the-fly tickets)")
        for e in reselect_epochs(cfg):
            if e < s.warmup_epochs or e >= reduce_end:
                raise ConfigError(f"lotus.reselect.epochs: epoch {e} is outside the reduced phase "
                                  f"[{s.warmup_epochs:g}, {reduce_end:g})")
    derived: dict[str, Any] = {}  # what resolve() filled in: config_to_dict writes the user's value back
    s.__dict__["_derived"] = derived
    p = cfg.tickets.patches
    if p.enabled:
        if not p.schedule:
            derived["tickets.patches.schedule"] = []
            sched = [[0.0, 1.0]] if s.warmup_epochs > 0 else []
            sched.append([float(s.warmup_epochs), float(p.keep_rate)])
            if s.anneal_epochs > 0:
                sched.append([float(reduce_end), 1.0])
            p.schedule = sched
        else:
            for e, rate in p.schedule:
                if rate < 1.0 and (e < s.warmup_epochs or e >= reduce_end):
                    raise ConfigError(f"tickets.patches.schedule: keep rate {rate:g} at epoch {e:g} overlaps the "
                                      f"lotus warm-up/anneal (full tokens before {s.warmup_epochs:g} and from {reduce_end:g})")
    d = cfg.tickets.dynamic
    if d.enabled and s.anneal_epochs > 0 and d.anneal < s.anneal_epochs / total:
        derived["tickets.dynamic.anneal"] = d.anneal
        d.anneal = s.anneal_epochs / total
    pr = cfg.pruning
    events = []
    if getattr(pr, "masks_enabled", False):
        events.append(("pruning.at_epoch" if pr.schedule == "one_shot" else "pruning.start_epoch", pr.mask_epoch))
    if getattr(pr, "structured", None) is not None and pr.structured.enabled:
        events.append(("pruning.structured.at_epoch", pr.structured.at_epoch))
    for name, e in events:
        if e < s.warmup_epochs:
            raise ConfigError(f"{name}: epoch {e:g} falls inside the lotus warm-up (< {s.warmup_epochs:g}); "
                              "prune after warm-up or shorten lotus.warmup_epochs")
        if e >= total:
            raise ConfigError(f"{name}: epoch {e:g} is not before the end of training ({total})")


def callbacks(cfg: "Config") -> list:
    s = cfg.lotus
    if not s.enabled:
        return []
    from lotus.schedule_callbacks import PhaseLogger, ReselectCallback

    out: list = [PhaseLogger(cfg)]
    if s.reselect.enabled:
        out.append(ReselectCallback(cfg))
    return out
