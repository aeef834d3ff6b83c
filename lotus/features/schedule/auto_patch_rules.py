"""The patch keep-rate rules of ``schedule.mode: auto`` (scorer ``cls_attention``, scorer ``random``, and
``patches_must_pay``): pure functions from measured signals to a ``keep_rate``
:class:`~lotus.features.schedule.auto_rules.Decision`; the rule table is in
:mod:`lotus.features.schedule.auto_rules`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from data_tickets.keep_rate import num_kept
from lotus.features.schedule.auto import AutoState
from lotus.features.schedule.auto_rules import Decision
from lotus.features.schedule.config import AutoConfig

__all__ = [
    "AttentionProbe",
    "PatchPay",
    "current_keep_rate",
    "attention_probe",
    "attention_pay_k",
    "seconds_saved",
    "rerank_seconds",
    "patches_stay_off",
    "cls_attention_keep_rate",
    "random_patches_start",
    "random_keep_gate",
    "random_keep_ready",
    "random_keep_rungs",
    "within_keep_tolerance",
    "random_keep_rate",
]


def current_keep_rate(state: AutoState) -> float:
    """The last decided keep rate (1.0 before any)."""
    return state.keep_rates[-1][1] if state.keep_rates else 1.0


@dataclass(frozen=True)
class AttentionProbe:
    """What the cls_attention rule needs measured: the candidate rate, its kept count and every count the
    descent could still reach (CLS-attention mass on each image's top ``k`` patches)."""

    rate: float
    k: int
    ks: tuple[int, ...]


@dataclass(frozen=True)
class PatchPay:
    """Seconds per epoch that training on ``k`` of ``n`` patches saves and that re-ranking them costs."""

    k: int
    n: int
    saved: float
    cost: float

    def text(self) -> str:
        return (
            f"training on {self.k} of {self.n} patches would save {self.saved:.3g} s per epoch and re-ranking them "
            f"costs {self.cost:.3g} s per epoch"
        )


def attention_probe(state: AutoState, a: AutoConfig, floor: float, n: int) -> AttentionProbe | None:
    """The next lower rate to check, or None: at the floor, ruled out (1.0 decided: did not pay), or the step
    keeps as many patches as now."""
    rates = state.keep_rates
    current = current_keep_rate(state)
    if current <= floor or (rates and current >= 1.0):
        return None
    cand = round(max(current - a.keep_rate_step, floor), 6)
    k = num_kept(n, cand)
    if k >= num_kept(n, current):
        return None
    ladder = [cand]  # every rate this descent could still reach, highest first
    while ladder[-1] > floor:
        ladder.append(round(max(ladder[-1] - a.keep_rate_step, floor), 6))
    return AttentionProbe(cand, k, tuple(sorted({num_kept(n, r) for r in ladder})))


def attention_pay_k(state: AutoState, a: AutoConfig, probe: AttentionProbe, masses: dict[int, float]) -> int | None:
    """The kept count to time for ``patches_must_pay`` (the lowest the attention allows now), or None: no
    lowering now, not the first, or the check is off."""
    if masses[probe.k] < a.attention_mass or state.keep_rates or not a.patches_must_pay:
        return None
    return min(kk for kk, m in masses.items() if m >= a.attention_mass)


def seconds_saved(full_step: float, kept_step: float, steps: int) -> float:
    """Seconds per epoch saved by ``steps`` training steps each ``full_step - kept_step`` faster (never < 0)."""
    return steps * max(full_step - kept_step, 0.0)


def rerank_seconds(
    rank_s: float, online: bool, refresh_every: int, ranked: int, epoch_samples: int, probe_samples: int
) -> float:
    """Seconds per epoch that online cls_attention re-ranking costs at ``rank_s`` per sample: every training
    sample (``refresh_every`` 0) or the ``ranked`` samples of a refresh every ``refresh_every`` epochs, plus
    this probe's ``probe_samples``; 0 when nothing is re-ranked during training."""
    if not online:
        return 0.0
    probe = rank_s * probe_samples
    if refresh_every == 0:
        return epoch_samples * rank_s + probe
    return ranked * rank_s / refresh_every + probe


def patches_stay_off(pay: PatchPay, from_epoch: int | None = None, random: bool = False) -> Decision | None:
    """``keep_rate`` 1.0 for the run when ``pay.saved <= pay.cost`` (``patches_must_pay``)."""
    if pay.saved > pay.cost:
        return None
    text = (
        f"training on {pay.k} of {pay.n} random patches saves {pay.saved:.3g} s per epoch (timed steps)"
        if random
        else pay.text()
    )
    return Decision(
        "keep_rate",
        1.0,
        "patch_seconds_saved_per_epoch",
        pay.saved,
        pay.cost,
        f"{text}: patch tickets stay off",
        from_epoch,
    )


def cls_attention_keep_rate(
    a: AutoConfig, probe: AttentionProbe, masses: dict[int, float], n: int, pay: PatchPay | None = None
) -> Decision | None:
    """One step lower when the candidate's top patches hold ``attention_mass`` of the CLS attention and, when
    timed (``pay``), they pay; else None (or the stay-off decision)."""
    mass = masses[probe.k]
    if mass < a.attention_mass:
        return None
    if pay is not None:
        off = patches_stay_off(pay)
        if off is not None:
            return off
    pays = "" if pay is None else f" ({pay.text()})"
    return Decision(
        "keep_rate",
        probe.rate,
        "cls_attention_mass_kept",
        mass,
        a.attention_mass,
        f"the top {probe.k} of {n} patches hold {mass:.1%} of the CLS attention{pays}",
    )


def random_patches_start(floor: float, n: int, saved: float | None) -> Decision:
    """scorer random, before epoch 0: the floor from epoch 0 (random patches need no scores, and an untrained
    model has learned nothing they could take away), unless the timed steps save nothing (``saved`` <= 0;
    ``saved`` None: ``patches_must_pay`` off)."""
    k = num_kept(n, floor)
    if saved is not None:
        off = patches_stay_off(PatchPay(k, n, saved, 0.0), from_epoch=0, random=True)
        if off is not None:
            return off
        times = f"training on {k} of {n} random patches saves {saved:.3g} s per epoch (timed steps)"
    else:
        times = "the time saved is not checked (schedule.auto.patches_must_pay: false)"
    return Decision(
        "keep_rate",
        floor,
        "random_patches_at_start",
        None,
        None,
        f"{k} of {n} random patches from the start: {times}; the keep rate rises when the probe says "
        "the model needs more",
        from_epoch=0,
    )


def random_keep_gate(a: AutoConfig, num_classes: int) -> float:
    """The probe loss on all patches under which the probe batches count as learned."""
    return a.learned_loss * math.log(num_classes)


def random_keep_ready(state: AutoState, epoch: int, rise: float | None) -> bool:
    """Whether the random-patch rule looks at all this epoch: a rise was measured (probe batches learned), or
    the epoch before was already reduced (the stall signal alone)."""
    return rise is not None or state.phase(epoch - 1) == "reduce"


def random_keep_rungs(state: AutoState, a: AutoConfig, rise: float | None) -> list[float]:
    """The rates to probe, lowest first, when the current rate gives back more than ``keep_tolerance``; the
    controller stops at the first :func:`within_keep_tolerance`."""
    if rise is None or rise <= a.keep_tolerance:
        return []
    ladder = [current_keep_rate(state)]
    while ladder[-1] < 1.0:
        ladder.append(round(min(ladder[-1] + a.keep_rate_step, 1.0), 6))
    return ladder[1:-1]


def within_keep_tolerance(rise: float, a: AutoConfig) -> bool:
    """Whether a random-patch rise is at most ``keep_tolerance``."""
    return rise <= a.keep_tolerance


def random_keep_rate(
    state: AutoState,
    a: AutoConfig,
    epoch: int,
    n: int,
    rise: float | None,
    rungs: Sequence[tuple[float, float]],
    loss: float,
    prev_loss: float | None,
    stall_taken: bool = False,
) -> Decision | None:
    """scorer random: raise to the first of the probed ``rungs`` (rate, rise) within tolerance (else all
    patches) when ``rise`` (current rate) exceeds ``keep_tolerance``; else one rung when the train loss fell by
    less than ``keep_stall`` (0: off) in an epoch that started on the same patches, side and model as the one
    before, unless the resolution rule takes that stall (``stall_taken``: see
    :func:`~lotus.features.schedule.auto_side_rules.stall_lever`)."""
    current = current_keep_rate(state)
    k = num_kept(n, current)
    if rise is not None and rise > a.keep_tolerance:
        to = next((r for r, x in rungs if within_keep_tolerance(x, a)), 1.0)
        return Decision(
            "keep_rate",
            to,
            "random_keep_loss_rise_of_learned",
            rise,
            a.keep_tolerance,
            f"the loss on the probe batches with {k} of {n} random patches gives back {rise:.1%} of the "
            f"loss learned: {num_kept(n, to)} patches from now on",
        )
    if prev_loss is None or stall_taken or state.lever_changed(epoch) or current >= 1.0:
        return None
    gain = (prev_loss - loss) / prev_loss
    if a.keep_stall > 0 and gain < a.keep_stall:
        to = round(min(current + a.keep_rate_step, 1.0), 6)
        return Decision(
            "keep_rate",
            to,
            "train_loss_improvement_on_kept_patches",
            gain,
            a.keep_stall,
            f"the train loss on {k} of {n} random patches fell by {gain:.1%} this epoch: "
            f"{num_kept(n, to)} patches from now on",
        )
    return None
