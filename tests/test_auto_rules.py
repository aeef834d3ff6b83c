"""The rules of ``schedule.mode: auto`` (:mod:`lotus.features.schedule.auto_rules`, ``auto_patch_rules``) as pure
functions: signals as plain numbers, no Trainer, no model. Thresholds exactly met, no signal yet, resumed state."""

from __future__ import annotations

import math

import pytest

from lotus.features.schedule import auto_patch_rules as pr
from lotus.features.schedule import auto_rules as r
from lotus.features.schedule.auto import AutoState
from lotus.features.schedule.config import AutoConfig

LN10 = math.log(10)


def _state(*decisions: dict, epochs: int = 10) -> AutoState:
    """10 epochs: warm-up ends at 5 at the latest, the anneal starts at 8 at the latest."""
    st = AutoState(epochs=epochs, anneal_share=0.2, max_warmup=0.5)
    for d in decisions:
        st.record(d)
    return st


def _resumed(st: AutoState) -> AutoState:
    again = AutoState(epochs=st.epochs, anneal_share=0.2, max_warmup=0.5)
    again.load(st.decisions)
    return again


REDUCE_AT_2 = {"what": "reduce", "from_epoch": 2, "value": 2}


# ---------------------------------------------------------------------- Decision
def test_decision_record_applies_next_epoch_and_rounds():
    d = r.Decision("reduce", 3, "x", 0.1234567891, 1 / 3, "why")
    assert d.record(2) == {
        "what": "reduce",
        "from_epoch": 3,
        "value": 3,
        "signal": "x",
        "measured": 0.123457,
        "threshold": 0.333333,
        "reason": "why",
    }
    assert r.Decision("keep_rate", 0.5, "s", None, None, "w", from_epoch=0).record(-1)["from_epoch"] == 0


# ---------------------------------------------------------------------- phases
def test_warmup_ends_when_the_loss_improves_by_less_than_the_threshold():
    a = AutoConfig(warmup_improvement=0.25)
    st = _state()
    assert r.warmup_end(st, a, 0, loss=2.0, prev_loss=None) is None  # no epoch before: no signal yet
    assert r.warmup_end(st, a, 1, loss=0.75, prev_loss=1.0) is None  # exactly 25 %: not less than it
    d = r.warmup_end(st, a, 1, loss=0.76, prev_loss=1.0)
    assert (d.what, d.value, d.signal, d.threshold) == ("reduce", 2, "train_loss_improvement", 0.25)
    assert d.measured == pytest.approx(0.24) and d.record(1)["from_epoch"] == 2
    assert "fell by 24.0%" in d.reason


def test_warmup_ends_at_the_budget_and_only_once():
    a = AutoConfig(warmup_improvement=0.0)
    st = _state()
    assert r.warmup_end(st, a, 3, loss=0.5, prev_loss=1.0) is None  # next epoch 4 < latest reduce 5
    d = r.warmup_end(st, a, 4, loss=0.5, prev_loss=1.0)  # next epoch 5 == latest reduce: exactly met
    assert (d.signal, d.value, d.measured, d.threshold) == ("warmup_budget", 5, 5, 5)
    decided = _state(REDUCE_AT_2)
    for s in (decided, _resumed(decided)):  # resumed: the replayed decision blocks a second one
        assert r.warmup_end(s, AutoConfig(warmup_improvement=1.0), 1, 0.9, 1.0) is None
        assert r.warmup_end(s, AutoConfig(warmup_improvement=1.0), 3, 0.9, 1.0) is None  # reduced already


def test_plateau_counts_reduced_epochs_without_a_gain_above_delta():
    p = r.Plateau()
    assert r.track_plateau(p, None, "reduce", 0.0) == p  # not evaluated: no signal
    p = r.track_plateau(p, 0.5, "warmup", 0.01)
    assert p == r.Plateau(0.5, 0)
    assert r.track_plateau(p, 0.5, "warmup", 0.0) == p  # no gain in the warm-up: not counted
    p = r.track_plateau(p, 0.51, "reduce", 0.01)  # a gain of exactly delta is no gain
    assert p.best_acc == 0.5 and p.since_best == 1
    assert r.track_plateau(p, 0.52, "reduce", 0.01) == r.Plateau(0.52, 0)


def test_anneal_on_plateau_patience_or_the_reserved_share():
    a = AutoConfig(plateau_patience=2)
    st = _state(REDUCE_AT_2)
    assert r.anneal_start(st, a, 3, r.Plateau(0.7, 1)) is None
    d = r.anneal_start(st, a, 3, r.Plateau(0.7, 2))  # exactly the patience
    assert (d.what, d.value, d.signal, d.measured, d.threshold) == ("anneal", 4, "epochs_without_val_gain", 2, 2)
    assert "plateaued at 0.7000" in d.reason
    d = r.anneal_start(st, a, 7, r.Plateau(0.7, 0))  # next epoch 8 == latest anneal
    assert (d.signal, d.value) == ("anneal_budget", 8)
    assert r.anneal_start(st, a, 1, r.Plateau(0.7, 9)) is None  # still in the warm-up
    annealed = _resumed(_state(REDUCE_AT_2, {"what": "anneal", "from_epoch": 5, "value": 5}))
    assert r.anneal_start(annealed, a, 4, r.Plateau(0.7, 9)) is None  # decided before the resume


# ---------------------------------------------------------------------- dynamic ratio
def test_dynamic_ratio_changes_only_when_the_signal_does():
    a = AutoConfig(ratio_step=0.05, learned_loss=0.5)
    losses = [0.1] * 50 + [2.0] * 50  # below-mean half learned, and far below the mean: capped at 0.5
    st = _state(REDUCE_AT_2)
    assert r.dynamic_ratio(st, a, [1.0], 10, cap=0.5) is None  # fewer than two seen losses: no signal
    d = r.dynamic_ratio(st, a, losses, 10, cap=0.5)
    assert (d.what, d.value, d.signal, d.threshold) == ("dynamic_ratio", 0.5, "below_mean_loss_share_learned", 0.5)
    assert d.measured == pytest.approx(1.0) and "capped at tickets.dynamic.ratio" in d.reason
    st.record(d.record(2))
    assert r.dynamic_ratio(_resumed(st), a, losses, 10, cap=0.5) is None  # the same ratio is in force
    unlearned = [1.3] * 50 + [2.3] * 50
    assert r.dynamic_ratio(st, a, unlearned, 10, cap=0.5).value == 0.0  # back to 0: nothing is learned
    assert r.dynamic_ratio_signal([0.2] * 20 + [1.3] * 30 + [LN10] * 50, 10, 0.9, 0.05, 0.5)[2] == pytest.approx(0.4)


# ---------------------------------------------------------------------- cls_attention keep rate
def test_attention_probe_steps_down_from_all_patches_to_the_floor():
    a = AutoConfig(keep_rate_step=0.125)
    p = pr.attention_probe(_state(), a, floor=0.5, n=16)
    assert (p.rate, p.k, p.ks) == (0.875, 14, (8, 10, 12, 14))
    at_floor = _state({"what": "keep_rate", "from_epoch": 2, "value": 0.5})
    assert pr.attention_probe(at_floor, a, 0.5, 16) is None
    off = _resumed(_state({"what": "keep_rate", "from_epoch": 2, "value": 1.0}))  # did not pay: ruled out
    assert pr.attention_probe(off, a, 0.5, 16) is None
    assert pr.attention_probe(_state(), AutoConfig(keep_rate_step=0.01), 0.5, 16) is None  # keeps 16 of 16 still


def test_attention_rate_needs_the_mass_and_the_first_lowering_must_pay():
    a = AutoConfig(attention_mass=0.75, patches_must_pay=True)
    p = pr.AttentionProbe(0.875, 14, (8, 10, 12, 14))
    masses = {8: 0.5, 10: 0.75, 12: 0.8, 14: 0.9}
    assert pr.attention_pay_k(_state(), a, p, masses) == 10  # the lowest count at exactly the mass
    assert pr.attention_pay_k(_state(), a, p, {**masses, 14: 0.7}) is None  # no lowering now: nothing to time
    assert pr.attention_pay_k(_state(), AutoConfig(attention_mass=0.75, patches_must_pay=False), p, masses) is None
    lowered = _state({"what": "keep_rate", "from_epoch": 2, "value": 0.875})
    assert pr.attention_pay_k(lowered, a, p, masses) is None  # checked at the first lowering only
    assert pr.cls_attention_keep_rate(a, p, {**masses, 14: 0.7499}, 16) is None
    d = pr.cls_attention_keep_rate(a, p, {**masses, 14: 0.75}, 16)  # exactly the mass
    assert (d.value, d.signal, d.measured, d.threshold) == (0.875, "cls_attention_mass_kept", 0.75, 0.75)
    assert d.reason == "the top 14 of 16 patches hold 75.0% of the CLS attention"
    off = pr.cls_attention_keep_rate(a, p, masses, 16, pr.PatchPay(10, 16, saved=2.0, cost=2.0))  # saved == cost
    assert (off.value, off.signal, off.measured, off.threshold) == (1.0, "patch_seconds_saved_per_epoch", 2.0, 2.0)
    assert off.reason.endswith(": patch tickets stay off") and "would save 2 s" in off.reason
    pays = pr.cls_attention_keep_rate(a, p, masses, 16, pr.PatchPay(10, 16, saved=2.5, cost=2.0))
    assert pays.value == 0.875 and "(training on 10 of 16 patches would save 2.5 s" in pays.reason


def test_patch_seconds():
    assert pr.seconds_saved(0.1, 0.2, steps=10) == 0.0  # slower on fewer patches saves nothing
    assert pr.seconds_saved(0.3, 0.1, steps=10) == pytest.approx(2.0)
    assert (
        pr.rerank_seconds(0.01, online=False, refresh_every=1, ranked=100, epoch_samples=100, probe_samples=64) == 0.0
    )
    assert pr.rerank_seconds(0.01, True, 0, 50, 100, 64) == pytest.approx(1.0 + 0.64)  # every training batch
    assert pr.rerank_seconds(0.01, True, 2, 50, 100, 64) == pytest.approx(0.25 + 0.64)


# ---------------------------------------------------------------------- random keep rate
def test_random_patches_start_at_the_floor_unless_they_save_nothing():
    d = pr.random_patches_start(0.5, 16, saved=None)
    assert (d.value, d.from_epoch, d.signal, d.measured) == (0.5, 0, "random_patches_at_start", None)
    assert "not checked" in d.reason and d.reason.startswith("8 of 16 random patches from the start")
    off = pr.random_patches_start(0.5, 16, saved=0.0)  # exactly nothing saved
    assert (off.value, off.from_epoch, off.signal, off.threshold) == (1.0, 0, "patch_seconds_saved_per_epoch", 0.0)
    assert off.reason == "training on 8 of 16 random patches saves 0 s per epoch (timed steps): patch tickets stay off"
    assert "saves 1.5 s per epoch" in pr.random_patches_start(0.5, 16, saved=1.5).reason


def test_random_keep_signal_readiness_and_rungs():
    a = AutoConfig(keep_tolerance=0.2, keep_rate_step=0.125, learned_loss=0.5)
    assert pr.random_keep_gate(a, 10) == pytest.approx(0.5 * LN10)
    st = _state({"what": "keep_rate", "from_epoch": 0, "value": 0.5, "signal": "random_patches_at_start"}, REDUCE_AT_2)
    assert not pr.random_keep_ready(st, 1, None)  # nothing learned, epoch 0 was warm-up
    assert pr.random_keep_ready(st, 1, 0.0)
    assert pr.random_keep_ready(st, 3, None)  # epoch 2 was reduced: the stall signal alone
    assert pr.random_keep_rungs(st, a, None) == [] and pr.random_keep_rungs(st, a, 0.2) == []  # within: exactly
    assert pr.random_keep_rungs(st, a, 0.21) == [0.625, 0.75, 0.875]
    assert pr.within_keep_tolerance(0.2, a) and not pr.within_keep_tolerance(0.2001, a)


def test_random_keep_rate_rises_to_the_first_rung_within_tolerance():
    a = AutoConfig(keep_tolerance=0.2, keep_stall=0.0)
    st = _state({"what": "keep_rate", "from_epoch": 0, "value": 0.5})
    d = pr.random_keep_rate(st, a, 1, 16, rise=0.5, rungs=[(0.625, 0.5), (0.75, 0.2)], loss=1.0, prev_loss=2.0)
    assert (d.value, d.signal, d.measured, d.threshold) == (0.75, "random_keep_loss_rise_of_learned", 0.5, 0.2)
    assert "with 8 of 16 random patches gives back 50.0%" in d.reason and d.reason.endswith("12 patches from now on")
    to_all = pr.random_keep_rate(st, a, 1, 16, 0.5, [(0.625, 0.5), (0.75, 0.4), (0.875, 0.3)], 1.0, 2.0)
    assert to_all.value == 1.0
    assert pr.random_keep_rate(st, a, 1, 16, 0.2, [], 1.0, 2.0) is None  # exactly the tolerance; stall off


def test_random_keep_rate_stall_rises_one_rung():
    a = AutoConfig(keep_tolerance=0.2, keep_stall=0.25)
    st = _state({"what": "keep_rate", "from_epoch": 0, "value": 0.5})
    d = pr.random_keep_rate(st, a, 3, 16, rise=None, rungs=[], loss=0.76, prev_loss=1.0)
    assert (d.value, d.signal, d.threshold) == (0.625, "train_loss_improvement_on_kept_patches", 0.25)
    assert d.reason.endswith("10 patches from now on") and "fell by 24.0%" in d.reason
    assert pr.random_keep_rate(st, a, 3, 16, None, [], loss=0.75, prev_loss=1.0) is None  # exactly 25 %
    assert pr.random_keep_rate(st, a, 3, 16, None, [], loss=0.76, prev_loss=None) is None  # no epoch before
    raised = _resumed(
        _state(
            {"what": "keep_rate", "from_epoch": 0, "value": 0.5}, {"what": "keep_rate", "from_epoch": 3, "value": 0.625}
        )
    )
    assert pr.random_keep_rate(raised, a, 3, 16, None, [], 0.76, 1.0) is None  # epoch 3 started on other patches
    assert pr.random_keep_rate(raised, a, 4, 16, None, [], 0.76, 1.0).value == 0.75
    thinned = _state(
        {"what": "keep_rate", "from_epoch": 0, "value": 0.5},
        {"what": "thin", "from_epoch": 3, "value": {"heads": 0.0, "mlp": 0.5}},
    )
    assert pr.random_keep_rate(thinned, a, 3, 16, None, [], 0.76, 1.0) is None  # right after thinning
    assert pr.random_keep_rate(st, AutoConfig(keep_stall=0.0), 3, 16, None, [], 1.0, 1.0) is None  # off
    full = _state({"what": "keep_rate", "from_epoch": 0, "value": 1.0})
    assert pr.random_keep_rate(full, a, 3, 16, None, [], 1.0, 1.0) is None  # all patches already


# ---------------------------------------------------------------------- thinning
def test_thin_candidates_largest_first_and_all_only_at_the_last_chance():
    a = AutoConfig(thin_candidates=[0.5, 1.0, 0.25], thin_by=0.5, thin_after=0.2)
    st = _state(REDUCE_AT_2)
    assert r.thin_candidates(st, a, 0, heads=0.25, mlp=0.5) == []  # next epoch 1 < thin_after (2 of 10)
    first = r.thin_candidates(st, a, 1, 0.25, 0.5)  # next epoch 2: exactly thin_after
    assert first == [r.ThinCandidate(1.0, 0.25, 0.5)]
    assert [c.share for c in r.thin_candidates(st, a, 3, 0.25, 0.5)] == [1.0]
    last = r.thin_candidates(st, a, 4, 0.25, 0.5)  # next epoch 5 == thin_by of the budget
    assert last == [
        r.ThinCandidate(1.0, 0.25, 0.5),
        r.ThinCandidate(0.5, 0.125, 0.25),
        r.ThinCandidate(0.25, 0.0625, 0.125),
    ]
    thinned = _resumed(_state(REDUCE_AT_2, {"what": "thin", "from_epoch": 3, "value": {"heads": 0.0, "mlp": 0.5}}))
    assert r.thin_candidates(thinned, a, 4, 0.25, 0.5) == []  # once


def test_thin_decision_within_tolerance_and_the_rise_of_learned():
    a = AutoConfig(thin_tolerance=0.1)
    c = r.ThinCandidate(0.5, 0.0, 0.25)
    assert r.loss_rise_of_learned(1.2, 1.0, 10) == pytest.approx(0.2 / (LN10 - 1.0))
    assert r.loss_rise_of_learned(3.0, 2.5, 10) == pytest.approx(0.5 / 1e-3)  # nothing learned: a large rise
    assert r.thin_decision(a, c, 0.1000001) is None
    d = r.thin_decision(a, c, 0.1)  # exactly the tolerance
    assert (d.what, d.value, d.signal, d.threshold) == (
        "thin",
        {"heads": 0.0, "mlp": 0.25},
        "probe_loss_rise_of_learned",
        0.1,
    )
    assert (
        d.reason == "thinning to 0.5 of pruning.structured gives back 10.0% of the loss learned so far (probe batches)"
    )
    assert "gives back 0.0%" in r.thin_decision(a, c, -0.2).reason  # a copy that does better gives back nothing


# ---------------------------------------------------------------------- ranks
def test_rank_agreement_names_the_ranks_that_differ():
    st = _state(REDUCE_AT_2)
    same = r.decisions_digest(st.decisions)
    assert same == r.decisions_digest(_resumed(st).decisions) and len(same) == 16
    other = r.decisions_digest(_state({"what": "reduce", "from_epoch": 3, "value": 3}).decisions)
    assert other != same
    r.check_agreement([same, same], 2)
    with pytest.raises(
        RuntimeError,
        match=rf"at the end of epoch 3 \(decision digests ranks 0, 2: {same}; "
        rf"rank 1: {other}\)",
    ):
        r.check_agreement([same, other, same], 2)
    with pytest.raises(RuntimeError, match="before the first epoch"):
        r.check_agreement([same, other], -1)
