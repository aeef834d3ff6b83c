"""ThreadTuner: picks the fastest thread count, prefers fewer on ties, flags step-time jumps, leaves state alone."""

from __future__ import annotations

import json
import time

import pytest
import timm
import torch

import lotus.models  # noqa: F401 - registers lotus_vit_* with timm
from lotus.training import threads
from lotus.training.threads import ThreadTuner, default_candidates, probe_step_fn


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class FakeClock:
    """A clock that only moves when a fake step 'costs' time: exact, noise-free probe timings."""

    def __init__(self, cost: dict[int, float]):
        self.now = 0.0
        self.cost = cost
        self.calls: dict[int, int] = {}

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        n = torch.get_num_threads()
        self.calls[n] = self.calls.get(n, 0) + 1
        self.now += self.cost[n]


def _tune(monkeypatch, cost: dict[int, float], **kwargs) -> tuple[ThreadTuner, FakeClock, int]:
    clock = FakeClock(cost)
    monkeypatch.setattr(threads, "_clock", clock)
    tuner = ThreadTuner(sorted(cost), **kwargs)
    return tuner, clock, tuner.tune(clock.step)


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


@pytest.mark.parametrize(
    "cost, expected",
    [({1: 0.01, 2: 0.1}, 1), ({1: 0.1, 2: 0.01}, 2), ({1: 0.1, 2: 0.02, 4: 0.05}, 2), ({1: 0.1, 2: 0.05, 4: 0.02}, 4)],
)
def test_tune_picks_the_fastest_and_sets_it(monkeypatch, cost, expected):
    torch.set_num_threads(1)
    tuner, _, chosen = _tune(monkeypatch, cost)
    assert chosen == expected == tuner.threads
    assert torch.get_num_threads() == expected
    assert set(tuner.last_probe) == set(cost)
    assert tuner.last_probe[expected] == pytest.approx(cost[expected])


def test_ties_go_to_fewer_threads(monkeypatch):
    # 2 and 4 are within 5% of each other: the smaller wins even though 4 is a hair faster
    _, _, chosen = _tune(monkeypatch, {1: 0.1, 2: 0.0104, 4: 0.0100})
    assert chosen == 2
    # outside the tolerance the faster one wins
    _, _, chosen = _tune(monkeypatch, {1: 0.1, 2: 0.0110, 4: 0.0100})
    assert chosen == 4
    _, _, chosen = _tune(monkeypatch, {1: 0.0110, 2: 0.0100}, tie_tolerance=0.2)
    assert chosen == 1


def test_oversubscribed_candidate_is_cut_short(monkeypatch):
    tuner, clock, chosen = _tune(monkeypatch, {1: 0.1, 2: 2.0}, probe_steps=3, warmup_steps=1)
    assert chosen == 1
    assert clock.calls == {1: 4, 2: 1}  # one (warm-up) call at 2 threads showed it cannot win
    assert tuner.aborted == [2]
    assert tuner.last_probe[2] == pytest.approx(2.0)
    # a merely slower candidate is probed in full
    tuner, clock, _ = _tune(monkeypatch, {1: 0.1, 2: 0.2}, probe_steps=3, warmup_steps=1)
    assert clock.calls == {1: 4, 2: 4} and tuner.aborted == []


def test_probe_uses_the_median(monkeypatch):
    clock = FakeClock({1: 0.0, 2: 0.0})
    monkeypatch.setattr(threads, "_clock", clock)
    costs = iter([5.0, 0.01, 0.5, 0.01, 5.0, 0.02, 0.02, 0.02])  # n=1: warm-up 5, then 0.01 0.5 0.01; n=2: ...

    def step() -> None:
        clock.now += next(costs)

    tuner = ThreadTuner([1, 2], probe_steps=3, warmup_steps=1, abort_factor=1000)
    assert tuner.tune(step) == 1  # median 0.01 beats 0.02 despite the 0.5 outlier
    assert tuner.last_probe == pytest.approx({1: 0.01, 2: 0.02})


def test_error_restores_threads_and_rng_is_preserved():
    torch.set_num_threads(1)

    def boom() -> None:
        if torch.get_num_threads() == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ThreadTuner([1, 2]).tune(boom)
    assert torch.get_num_threads() == 1

    torch.manual_seed(123)
    state = torch.get_rng_state()
    ThreadTuner([1, 2], probe_steps=1).tune(lambda: torch.rand(100))
    assert torch.equal(torch.get_rng_state(), state)


def _feed(tuner: ThreadTuner, values) -> list[int]:
    return [i for i, v in enumerate(values) if tuner.observe(v)]


def test_observe_flags_a_3x_jump_and_not_noise():
    tuner = ThreadTuner([1], window=9, jump_factor=2.0)
    # noise: +-20% jitter, a 3.5x spike every 4th step (at most 3 in any 9) and a 0.4x dip every 7th:
    # never a re-tune
    noise = [
        0.1 * (1 + 0.2 * ((i * 7) % 5 - 2) / 2) * (3.5 if i % 4 == 3 else 0.4 if i % 7 == 5 else 1.0)
        for i in range(300)
    ]
    assert _feed(tuner, noise) == []
    assert tuner.baseline == pytest.approx(0.1, rel=0.25)
    # a sustained 3x jump: flagged once the slow steps are the majority of the window (5 of 9)
    flagged = _feed(tuner, [0.3] * 40)
    assert flagged and flagged[0] <= 5 and tuner.reason == "slower"
    # after a flag a new baseline forms (nobody re-tuned): the new level is not flagged again
    assert flagged == [flagged[0]]


def test_observe_flags_a_drop_and_periodic():
    tuner = ThreadTuner([1], window=5)
    assert _feed(tuner, [0.3] * 5 + [0.1] * 10) == [7]  # 5 baseline steps, then 3 of 5 below 0.15
    assert tuner.reason == "faster"
    tuner = ThreadTuner([1], window=5, every_n_steps=50)
    assert _feed(tuner, [0.1] * 120) == [49, 99]
    assert tuner.reason == "periodic"
    with pytest.raises(ValueError):
        ThreadTuner([1], jump_factor=1.0)
    with pytest.raises(ValueError):
        ThreadTuner([0, 1])


def test_tune_resets_observation(monkeypatch):
    tuner, _, _ = _tune(monkeypatch, {1: 0.01, 2: 0.1}, window=3)
    _feed(tuner, [0.1] * 3)
    assert tuner.baseline == pytest.approx(0.1)
    tuner.tune(lambda: None)
    assert tuner.baseline is None and tuner.tunes == 2


def test_real_tiny_vit_tune_is_fast_and_side_effect_free():
    torch.manual_seed(0)
    model = timm.create_model("lotus_vit_micro", num_classes=10, in_chans=1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
    state = torch.get_rng_state()
    tuner = ThreadTuner()  # this machine's defaults
    t0 = time.perf_counter()
    chosen = tuner.tune(probe_step_fn(model, x, y))
    assert time.perf_counter() - t0 < 5.0
    assert chosen in tuner.candidates and torch.get_num_threads() == chosen
    assert set(tuner.last_probe) == set(tuner.candidates) and all(t > 0 for t in tuner.last_probe.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), state)
    event = json.loads(json.dumps(tuner.describe()))
    assert event["threads"] == chosen and set(event["probe_s"]) == {str(n) for n in tuner.candidates}
