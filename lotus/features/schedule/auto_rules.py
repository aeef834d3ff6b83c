"""The rules of ``schedule.mode: auto``: pure functions from measured signals to decisions.

Each rule takes plain numbers (what :mod:`lotus.features.schedule.auto_probes` measured), the thresholds
(:class:`~lotus.features.schedule.config.AutoConfig`, ``schedule.auto``) and the decisions so far
(:class:`~lotus.features.schedule.auto.AutoState`), and returns a :class:`Decision` or ``None``; it builds no
model, reads no trainer and changes nothing (the controller,
:class:`~lotus.features.schedule.auto_callback.AutoScheduleCallback`, records what it returns). A decision
taken at the end of epoch ``e`` applies from epoch ``e + 1``.

The rule table (threshold keys under ``schedule.auto``; ``patch_rules`` = :mod:`.auto_patch_rules`):

================= ================================================================= ==========================
decision          signal -> rule                                                    drives
================= ================================================================= ==========================
``reduce``        an epoch (from the second on) lowered the train loss by less      phase warm-up -> reduce
                  than ``warmup_improvement`` of the epoch before's, or
                  ``max_warmup`` of the budget is spent -> :func:`warmup_end`
``anneal``        val accuracy: no gain > ``plateau_delta`` for                     phase reduce -> anneal
                  ``plateau_patience`` reduced epochs, or the last
                  ``anneal_share`` begins -> :func:`anneal_start`
``dynamic_ratio`` the last-seen per-sample losses: 1 - (mean of the rule's drop      ``tickets.dynamic`` ratio
                  candidates' losses (InfoBatch: the below-mean ones) - min) /
                  (mean - min), at most the share of them that is
                  learned (loss < ``learned_loss`` x ln(classes)), capped at
                  ``tickets.dynamic.ratio``, in ``ratio_step`` steps
                  -> :func:`dynamic_ratio`
``keep_rate``     scorer cls_attention: one ``keep_rate_step`` lower while the      ``tickets.patches`` rate
                  next lower rate's patches hold >= ``attention_mass`` of the CLS
                  attention -> ``patch_rules.cls_attention_keep_rate``
``keep_rate``     scorer random: the floor (``tickets.patches.keep_rate``) from     ``tickets.patches`` rate
                  epoch 0 (``patch_rules.random_patches_start``); raised to the
                  lowest rung whose random patches give back at most
                  ``keep_tolerance`` of the loss learned so far when the current
                  rate gives back more (once the probe batches are learned), or
                  one rung when the train loss fell by < ``keep_stall``; never
                  lowered -> ``patch_rules.random_keep_rate``
``keep_rate`` 1.0 ``patches_must_pay``, before the first lowering: timed steps say   patch tickets off (run)
                  the seconds saved per epoch are not more than re-ranking costs
                  -> ``patch_rules.patches_stay_off``
``side``          resolution: ``resolution.start`` of the full side from epoch 0     ``resolution`` side
                  (``side_rules.side_start``; full size when timed steps save
                  nothing); raised to the lowest side whose probe loss is within
                  ``keep_tolerance`` of the loss learned of full size's (either
                  way: lower means the model fits the small side, not the full
                  size it is evaluated at) when the current side is not, or one
                  patch larger on a train-loss stall (< ``keep_stall``) that the
                  side takes: with random patches on, the lever whose probe is
                  further off takes it (``side_rules.stall_lever``); full size
                  in the anneal
                  -> ``side_rules.side_decision``
``thin``          a thinned copy's probe-batch loss gives back at most              ``pruning.structured``
                  ``thin_tolerance`` of the loss learned so far (the largest of     (once)
                  ``thin_candidates``; at ``thin_by`` the largest within it; no
                  probe before ``thin_after``) -> :func:`thin_candidates`,
                  :func:`thin_decision`
================= ================================================================= ==========================

"The loss learned so far" is ln(classes) - the probe loss on all patches of the unthinned model
(:func:`loss_rise_of_learned`); ``side_rules`` = :mod:`.auto_side_rules`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_tickets.rules import DEFAULT_RULE, make_rule
from lotus.features.schedule.auto import AutoState
from lotus.features.schedule.config import AutoConfig

__all__ = [
    "Decision",
    "Plateau",
    "ThinCandidate",
    "track_plateau",
    "warmup_end",
    "anneal_start",
    "dynamic_ratio_signal",
    "dynamic_ratio",
    "loss_rise_of_learned",
    "thin_candidates",
    "thin_decision",
    "decisions_digest",
    "check_agreement",
]


@dataclass(frozen=True)
class Decision:
    """One decision (see the table above); ``from_epoch`` None: the epoch after the one it is taken at."""

    what: str
    value: Any
    signal: str
    measured: float | None
    threshold: float | None
    reason: str
    from_epoch: int | None = None

    def record(self, epoch: int) -> dict[str, Any]:
        """The logged / saved form, for a decision taken at the end of ``epoch``."""
        return {
            "what": self.what,
            "from_epoch": epoch + 1 if self.from_epoch is None else self.from_epoch,
            "value": self.value,
            "signal": self.signal,
            "measured": None if self.measured is None else round(float(self.measured), 6),
            "threshold": None if self.threshold is None else round(float(self.threshold), 6),
            "reason": self.reason,
        }


# ---------------------------------------------------------------------- phases
@dataclass(frozen=True)
class Plateau:
    """Best val accuracy so far and the reduced epochs since it improved by more than ``plateau_delta``."""

    best_acc: float = -math.inf
    since_best: int = 0


def track_plateau(p: Plateau, acc: float | None, phase: str, delta: float) -> Plateau:
    """``p`` after an epoch with val accuracy ``acc`` (None: not evaluated) in ``phase``."""
    if acc is None:
        return p
    if acc > p.best_acc + delta:
        return Plateau(float(acc), 0)
    return Plateau(p.best_acc, p.since_best + 1) if phase == "reduce" else p


def warmup_end(state: AutoState, a: AutoConfig, epoch: int, loss: float, prev_loss: float | None) -> Decision | None:
    """``reduce`` from ``epoch + 1``: the train loss fell by less than ``warmup_improvement`` (epoch over epoch:
    the first epoch's mean includes the untrained start, so it is never a signal), or ``max_warmup`` is spent."""
    if state.phase(epoch) != "warmup" or state.reduce_start is not None:
        return None
    nxt = epoch + 1
    gain = (prev_loss - loss) / prev_loss if prev_loss else None
    if gain is not None and gain < a.warmup_improvement:
        return Decision(
            "reduce",
            nxt,
            "train_loss_improvement",
            gain,
            a.warmup_improvement,
            f"the train loss fell by {gain:.1%} this epoch, less than the threshold: no fast initial "
            "descent left to protect",
        )
    if nxt >= state.latest_reduce:
        return Decision(
            "reduce",
            nxt,
            "warmup_budget",
            epoch + 1,
            state.latest_reduce,
            "schedule.auto.max_warmup of the budget spent",
        )
    return None


def anneal_start(state: AutoState, a: AutoConfig, epoch: int, p: Plateau) -> Decision | None:
    """``anneal`` from ``epoch + 1``: val accuracy plateaued for ``plateau_patience`` reduced epochs, or the
    reserved ``anneal_share`` begins."""
    if state.phase(epoch) != "reduce" or state.anneal_start is not None:
        return None
    nxt = epoch + 1
    if p.since_best >= a.plateau_patience:
        return Decision(
            "anneal",
            nxt,
            "epochs_without_val_gain",
            p.since_best,
            a.plateau_patience,
            f"val accuracy plateaued at {p.best_acc:.4f}",
        )
    if nxt >= state.latest_anneal:
        return Decision(
            "anneal",
            nxt,
            "anneal_budget",
            epoch + 1,
            state.latest_anneal,
            "schedule.auto.anneal_share of the budget reserved for the anneal",
        )
    return None


# ---------------------------------------------------------------------- dynamic ratio
Candidates = Callable[[np.ndarray], "np.ndarray | None"]


def dynamic_ratio_signal(
    losses: Any, num_classes: int, cap: float, step: float, learned_loss: float, candidates: Candidates | None = None
) -> tuple[float, float, float]:
    """``(ratio, share, learned)`` from the last-seen per-sample losses and the data rule's
    ``candidates(losses)`` (:meth:`data_tickets.rules.DataRule.drop_candidates`: the losses of what it would
    drop; default: the default rule's, InfoBatch's below-mean ones): ``share`` = 1 - (mean of the candidates'
    losses - min) / (mean - min) (how much less the samples the rule would drop carry), ``learned`` = the share
    of the candidates whose loss is under ``learned_loss * ln(num_classes)`` (the premise is that what is
    dropped is learned), and ``ratio`` = min of both, in ``step`` steps, at most ``cap``; all 0 without
    candidates."""
    scores = np.asarray(losses, dtype=np.float64).reshape(-1)
    if scores.size < 2:
        return 0.0, 0.0, 0.0
    mean, low = float(scores.mean()), float(scores.min())
    candidates = candidates or make_rule(DEFAULT_RULE, scores.size).drop_candidates
    below = candidates(scores)
    if below is None or not below.size or mean <= low:
        return 0.0, 0.0, 0.0
    share = 1.0 - (float(below.mean()) - low) / (mean - low)
    learned = float((below < learned_loss * math.log(num_classes)).mean())
    ratio = round(min(math.floor(min(share, learned) / step + 1e-9) * step, cap), 6)
    return ratio, share, learned


def dynamic_ratio(
    state: AutoState, a: AutoConfig, losses: Any, num_classes: int, cap: float, candidates: Candidates | None = None
) -> Decision | None:
    """A new ``dynamic_ratio`` when :func:`dynamic_ratio_signal` (with the rule's ``candidates``) differs from
    the ratio in force (none from fewer than two seen losses)."""
    scores = np.asarray(losses, dtype=np.float64).reshape(-1)
    if scores.size < 2:
        return None
    ratio, share, learned = dynamic_ratio_signal(scores, num_classes, cap, a.ratio_step, a.learned_loss, candidates)
    current = state.ratios[-1][1] if state.ratios else 0.0
    if ratio == current:
        return None
    return Decision(
        "dynamic_ratio",
        ratio,
        "below_mean_loss_share_learned",
        min(share, learned),
        cap,
        f"the samples the data rule may drop carry {share:.0%} less loss than the mean and {learned:.0%} of them are "
        "learned (capped at tickets.dynamic.ratio)",
    )


def loss_rise_of_learned(loss: float, base: float, num_classes: int) -> float:
    """(``loss`` - ``base``) / (ln(classes) - ``base``): how much of the loss learned so far is given back."""
    return (loss - base) / max(math.log(num_classes) - base, 1e-3)


# ---------------------------------------------------------------------- thinning
@dataclass(frozen=True)
class ThinCandidate:
    share: float  # of pruning.structured's heads / mlp
    heads: float
    mlp: float


def thin_candidates(state: AutoState, a: AutoConfig, epoch: int, heads: float, mlp: float) -> list[ThinCandidate]:
    """The thinned copies to probe at the end of ``epoch``, largest first: none once decided or before
    ``thin_after``; the largest share, or at the last chance (``thin_by``, or the epoch before the reserved
    anneal) every share."""
    if state.thin is not None or epoch + 1 < math.ceil(a.thin_after * state.epochs - 1e-9):
        return []
    last_chance = epoch + 1 >= min(state.latest_anneal - 1, int(math.ceil(a.thin_by * state.epochs - 1e-9)))
    shares = sorted(set(a.thin_candidates), reverse=True)
    return [ThinCandidate(s, round(heads * s, 6), round(mlp * s, 6)) for s in (shares if last_chance else shares[:1])]


def thin_decision(a: AutoConfig, cand: ThinCandidate, rise: float) -> Decision | None:
    """``thin`` to ``cand`` when its probe-loss rise is within ``thin_tolerance`` (the controller probes the
    candidates in order and takes the first)."""
    if rise > a.thin_tolerance:
        return None
    return Decision(
        "thin",
        {"heads": cand.heads, "mlp": cand.mlp},
        "probe_loss_rise_of_learned",
        rise,
        a.thin_tolerance,
        f"thinning to {cand.share:g} of pruning.structured gives back "
        f"{max(rise, 0.0):.1%} of the loss learned so far (probe batches)",
    )


# ---------------------------------------------------------------------- ranks
def decisions_digest(decisions: list[dict[str, Any]]) -> str:
    """A short stable hash of a decision list."""
    return hashlib.sha1(json.dumps(decisions, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def check_agreement(digests: list[str], epoch: int) -> None:
    """Raise when the ranks' decision digests (rank order) differ after the round at the end of ``epoch`` (-1:
    before the first), naming which ranks hold which digest."""
    groups: dict[str, list[int]] = {}
    for r, d in enumerate(digests):
        groups.setdefault(d, []).append(r)
    if len(groups) > 1:
        parts = "; ".join(
            f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {d}" for d, rs in groups.items()
        )
        when = "before the first epoch" if epoch < 0 else f"at the end of epoch {epoch + 1}"
        raise RuntimeError(f"schedule.mode: auto: ranks took different decisions {when} (decision digests {parts})")
