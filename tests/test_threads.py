"""ThreadTuner on made-up step times (picks the fastest, ties to fewer threads, cuts an oversubscribed count after
one step, re-tunes on a sustained slowdown only, accounts its overhead) and on a real tiny Trainer run."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from lotus.config import config_from_dict
from lotus.training import Trainer
from lotus.training.threads import ThreadTuner, default_candidates, parallel_stalls


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


Cost = dict[int, float] | Callable[[int, int], float]


Check = Callable[[int, float], tuple[bool, float]]


def _run(tuner: ThreadTuner, cost: Cost, steps: int, check: Check | None = None) -> tuple[list[int], list[int]]:
    """Feed ``steps`` fake steps, each costing ``cost[threads]`` (or ``cost(threads, step)``), with the stall
    checks of ``check`` before each step when given: the count each step ran at, and the steps at (after the
    checks before) which a tune settled."""
    used, settled = [], []
    for i in range(steps):
        if check is not None and tuner.apply(check):
            settled.append(i - 1)
        n = tuner.next_threads
        used.append(n)
        if tuner.observe(cost(n, i) if callable(cost) else cost[n]):
            settled.append(i)
    return used, settled


def test_default_candidates():
    assert default_candidates(1) == [1]
    assert default_candidates(2) == [1, 2]
    assert default_candidates(4) == [1, 2, 4]
    assert default_candidates(6) == [1, 2, 4, 6]
    assert default_candidates(16) == [1, 2, 8, 16]
    assert default_candidates(64) == [1, 4, 16, 64]
    assert all(len(default_candidates(n)) <= 4 for n in range(1, 300))
    assert default_candidates()[-1] >= 1
    assert ThreadTuner([2, 1, 2]).candidates == [1, 2]
    with pytest.raises(ValueError):
        ThreadTuner([0, 1])
    with pytest.raises(ValueError):
        ThreadTuner([1], slow_factor=1.0)


@pytest.mark.parametrize(
    "cost, expected",
    [({1: 0.01, 2: 0.1}, 1), ({1: 0.1, 2: 0.01}, 2), ({1: 0.1, 2: 0.02, 4: 0.05}, 2), ({1: 0.1, 2: 0.05, 4: 0.03}, 4)],
)
def test_cycles_the_real_steps_and_picks_the_fastest(cost, expected):
    tuner = ThreadTuner(sorted(cost), abort_factor=100)
    assert tuner.tuning and tuner.next_threads == 1
    used, settled = _run(tuner, cost, 30)
    k = len(cost)
    assert used[: 4 * k] == [n for n in sorted(cost) for _ in range(4)]  # 1 warm-up + 3 timed steps each
    assert settled == [4 * k - 1] and not tuner.tuning
    assert tuner.threads == expected and set(used[4 * k :]) == {expected}
    assert tuner.medians == pytest.approx(cost)
    assert tuner.apply() is False and torch.get_num_threads() == expected


def test_ties_go_to_fewer_threads():
    # 2 and 4 are within 5% of each other: the smaller wins even though 4 is a hair faster
    for cost, tol, expected in [
        ({1: 0.1, 2: 0.0104, 4: 0.0100}, 0.05, 2),
        ({1: 0.1, 2: 0.0110, 4: 0.0100}, 0.05, 4),  # outside the tolerance the faster one wins
        ({1: 0.0110, 2: 0.0100}, 0.2, 1),
    ]:
        tuner = ThreadTuner(sorted(cost), tie_tolerance=tol, abort_factor=100)
        _run(tuner, cost, 12)
        assert tuner.threads == expected, cost


def test_oversubscribed_candidate_is_cut_after_one_step():
    tuner = ThreadTuner([1, 2])
    used, settled = _run(tuner, {1: 0.1, 2: 2.0}, 10)
    assert used[:6] == [1, 1, 1, 1, 2, 1]  # one (warm-up) step at 2 threads showed it cannot win
    assert settled == [4] and tuner.threads == 1 and tuner.aborted == [2]
    assert tuner.medians[2] == pytest.approx(2.0)
    assert tuner.overhead_s == pytest.approx(1.9)
    # a merely slower candidate runs in full
    tuner = ThreadTuner([1, 2])
    used, _ = _run(tuner, {1: 0.1, 2: 0.15}, 10)
    assert used[:8] == [1] * 4 + [2] * 4 and tuner.aborted == []


def test_stall_check_skips_a_count_before_any_step_at_it():
    calls = []

    def check(n: int, cap_s: float) -> tuple[bool, float]:
        calls.append((n, cap_s))
        return n >= 4, 0.01

    tuner = ThreadTuner([1, 2, 4], abort_factor=100)
    used, settled = _run(tuner, {1: 0.1, 2: 0.08, 4: 3.0}, 20, check)
    assert calls == [(2, pytest.approx(0.025)), (4, pytest.approx(0.02))]  # cap: 1/4 of the best median so far
    assert used[:8] == [1] * 4 + [2] * 4 and 4 not in used  # 4 threads never ran a step
    assert settled == [7] and tuner.threads == 2 and tuner.stalled == [4] and tuner.aborted == [4]
    assert tuner.overhead_s == pytest.approx(3 * 0.02 + 2 * 0.01)  # slower steps at 1 thread + both checks
    assert torch.get_num_threads() == 2


def test_parallel_stalls_is_cheap_and_leaves_the_thread_count():
    torch.set_num_threads(1)
    stalled, seconds = parallel_stalls(2, cap_s=0.05)
    assert isinstance(stalled, bool) and 0 < seconds < 1.0
    assert torch.get_num_threads() == 1


def test_trial_uses_the_median_after_the_warmup():
    times = iter([5.0, 0.01, 0.5, 0.01, 0.03, 0.02, 0.02, 0.02])  # n=1: warm-up 5, then 0.01 0.5 0.01; n=2 ...
    tuner = ThreadTuner([1, 2], abort_factor=1000)
    _run(tuner, lambda n, i: next(times), 8)
    assert tuner.threads == 1 and tuner.medians == pytest.approx({1: 0.01, 2: 0.02})


def test_overhead_is_the_extra_time_of_the_trial_steps():
    tuner = ThreadTuner([1, 2])
    _run(tuner, {1: 0.1, 2: 0.05}, 20)
    # the run's first step pays one-off costs at any count and is not counted: 3 steps x 0.05 s extra at 1 thread
    assert tuner.overhead_s == pytest.approx(0.15) and tuner.total_overhead_s == pytest.approx(0.15)
    assert tuner.tune_s == pytest.approx(4 * 0.1 + 4 * 0.05) and tuner.tune_steps == 8
    event = json.loads(json.dumps(tuner.describe()))
    assert event["threads"] == 2 and event["step_s"] == {"1": 0.1, "2": 0.05} and event["reason"] == "start"
    assert event["overhead_s"] == pytest.approx(0.15) and event["tunes"] == 1


def _noise(i: int, level: float) -> float:
    """+-20% jitter, a 3.5x spike every 4th step (at most 4 in any 15) and a 0.4x dip every 7th."""
    return level * (1 + 0.2 * ((i * 7) % 5 - 2) / 2) * (3.5 if i % 4 == 3 else 0.4 if i % 7 == 5 else 1.0)


def test_no_retune_on_noise_or_speed_ups():
    tuner = ThreadTuner([1, 2])
    _run(tuner, {1: 0.1, 2: 0.2}, 8)
    assert tuner.threads == 1 and tuner.tunes == 1
    _, settled = _run(tuner, lambda n, i: _noise(i, 0.1), 400)
    assert settled == [] and not tuner.tuning
    _, settled = _run(tuner, lambda n, i: _noise(i, 0.04), 200)  # e.g. the model was pruned
    assert settled == [] and not tuner.tuning and tuner.tunes == 1
    assert tuner.baseline == pytest.approx(0.04, rel=0.3)  # the baseline followed the speed-up


def test_retunes_on_a_sustained_slowdown_on_real_steps():
    tuner = ThreadTuner([1, 2], window=15)
    _run(tuner, {1: 0.1, 2: 0.06}, 40)
    assert tuner.threads == 2
    # a neighbour arrives: 2 threads are oversubscribed, 1 thread is barely slower than before
    busy = {1: 0.12, 2: 1.5}
    used, settled = _run(tuner, busy, 30)
    assert used[:8] == [2] * 8 and tuner.reason == "slower"  # flagged once 8 of 15 steps are slow
    assert used[8:13] == [1, 1, 1, 1, 2] and settled == [12]  # re-tune: 4 steps at 1, 2 cut after one step
    assert tuner.threads == 1 and tuner.tunes == 2 and set(used[13:]) == {1}
    assert tuner.overhead_s == pytest.approx(1.5 - 0.12)  # a re-tune counts its first step too


def test_retune_waits_while_the_overhead_budget_is_spent():
    slow_later: Callable[[int, int], float] = lambda n, i: {1: 0.1, 2: 0.06}[n] * (5 if i >= 60 else 1)  # noqa: E731
    tuner = ThreadTuner([1, 2], max_share=0.001)  # the first tune's 0.12 s is more than 0.1 % of the run so far
    _run(tuner, slow_later, 200)
    assert tuner.tunes == 1 and not tuner.tuning
    tuner = ThreadTuner([1, 2], max_share=0.05)  # 0.12 s <= 5 % of ~3.6 s: re-tunes
    _run(tuner, slow_later, 200)
    assert tuner.tunes == 2 and tuner.reason == "slower"


def test_periodic_retune_is_opt_in():
    tuner = ThreadTuner([1, 2], every_n_steps=50)
    _, settled = _run(tuner, {1: 0.1, 2: 0.2}, 130)
    assert settled == [7, 65, 123] and tuner.reason == "periodic"  # 8 trial steps + 50 settled steps


def test_single_candidate():
    tuner = ThreadTuner([1])
    used, settled = _run(tuner, {1: 0.1}, 20)
    assert set(used) == {1} and settled == [3] and tuner.overhead_s == pytest.approx(0.0)


def test_real_trainer_run_with_threads_auto(tiny_cfg_dict):
    tiny_cfg_dict["train"].update(epochs=1, threads="auto", device="cpu")
    trainer = Trainer(config_from_dict(tiny_cfg_dict), write=False, quiet=True)
    trainer.fit()
    tuner = trainer.thread_tuner
    events = [e for e in trainer.events if e["event"] == "threads_tuned"]
    assert events and events[0]["reason"] == "start" and events[0]["threads"] in tuner.candidates
    assert events[0]["tune_steps"] <= 4 * len(tuner.candidates) and 0 < events[0]["step"] <= events[0]["tune_steps"]
    assert set(events[0]["step_s"]) | {str(n) for n in events[0]["stalled"]} == {str(n) for n in tuner.candidates}
    assert torch.get_num_threads() == tuner.threads
    assert tuner.steps == trainer.step and tuner.observed_s > 0
    # the only cost is the extra time of the steps at slower counts: small next to the run's step time
    assert tuner.total_overhead_s <= 0.15 * tuner.observed_s, tuner.describe()
