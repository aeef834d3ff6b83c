"""Zhu & Gupta cubic schedule values, one-shot schedule, and GradualPruner in a plain training loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pruning
from pruning import GradualPruner, GradualSchedule, MagnitudeConfig, OneShotSchedule, SemiStructuredConfig, WandaConfig
from pruning.masks import get_mask, is_masked, masked_modules, masks_state
from pruning.schedule import cubic_sparsity


def test_cubic_values():
    s = GradualSchedule(final_sparsity=0.8, start_step=10, end_step=110, frequency=10)
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(9) == 0.0
    assert s.sparsity_at(10) == pytest.approx(0.0)
    # formula: s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3
    assert s.sparsity_at(60) == pytest.approx(0.8 * (1 - 0.5**3))
    assert s.sparsity_at(35) == pytest.approx(0.8 * (1 - (1 - 20 / 100) ** 3))  # held at the last update (30)
    assert s.sparsity_at(110) == pytest.approx(0.8) and s.sparsity_at(10_000) == pytest.approx(0.8)
    vals = [s.sparsity_at(t) for t in range(0, 130)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))  # monotone
    # increments shrink: prune fast early, slowly near the end
    ups = [s.sparsity_at(t) for t in s.update_steps()]
    deltas = [b - a for a, b in zip(ups, ups[1:])]
    assert all(b <= a + 1e-12 for a, b in zip(deltas, deltas[1:]))
    assert s.update_steps() == list(range(10, 110, 10)) + [110]
    assert s.is_update_step(20) and not s.is_update_step(25) and s.is_update_step(110)
    # non-aligned end: the final value still lands at end_step
    t = GradualSchedule(0.5, start_step=0, end_step=25, frequency=10)
    assert t.update_steps() == [0, 10, 20, 25] and t.sparsity_at(25) == pytest.approx(0.5)
    assert t.sparsity_at(24) < 0.5
    assert cubic_sparsity(5, 0.9, 0, 10, 1, initial_sparsity=0.1) == pytest.approx(0.9 - 0.8 * 0.5**3)


def test_schedule_validation_and_one_shot():
    with pytest.raises(ValueError, match="end_step"):
        GradualSchedule(0.5, start_step=10, end_step=10)
    with pytest.raises(ValueError, match="frequency"):
        GradualSchedule(0.5, 0, 10, frequency=0)
    with pytest.raises(ValueError, match="final_sparsity"):
        GradualSchedule(1.0, 0, 10)
    with pytest.raises(ValueError, match="initial_sparsity"):
        GradualSchedule(0.5, 0, 10, initial_sparsity=0.6)
    o = OneShotSchedule(0.7, step=5)
    assert o.sparsity_at(4) == 0.0 and o.sparsity_at(5) == 0.7 and o.is_update_step(5)
    with pytest.raises(ValueError, match="step"):
        OneShotSchedule(0.5, step=-1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


def _train(model: nn.Module, pruner: GradualPruner, steps: range, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    seen = []
    for step in steps:
        x = torch.randn(16, 8, generator=g)
        loss = nn.functional.mse_loss(model(x), x[:, :4])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pruner.step(step + 1) is not None:
            seen.append(pruner.current)
    return seen


def test_gradual_pruner_reaches_target_monotonically_and_resumes():
    sched = GradualSchedule(final_sparsity=0.75, start_step=2, end_step=20, frequency=4)
    # the default filter cannot know that Sequential index "4" is the output layer: say it explicitly
    keep = lambda mod, fqn: isinstance(mod, nn.Linear) and fqn in ("0", "2")  # noqa: E731
    model = _model()
    pruner = GradualPruner(model, sched, MagnitudeConfig(scope="global"), filter_fn=keep)
    masks_over_time = []
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(1, 13):
        x = torch.randn(16, 8, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), x[:, :4]).backward()
        opt.step()
        if pruner.step(step):
            masks_over_time.append(masks_state(model))
    assert [h["step"] for h in pruner.history] == [6, 10]  # step 2 is the ramp start: target 0
    for a, b in zip(masks_over_time, masks_over_time[1:]):
        for k in a:
            assert not (b[k] & ~a[k]).any()  # a pruned weight never comes back
    # "resume": a fresh model + pruner restored from state continues to the same final masks
    state = pruner.state_dict()
    clone = _model()
    clone.load_state_dict(
        {
            k.replace("parametrizations.weight.original", "weight"): v
            for k, v in model.state_dict().items()
            if ".0.mask" not in k
        }
    )
    pruner2 = GradualPruner(clone, sched, MagnitudeConfig(scope="global"), filter_fn=keep)
    pruner2.load_state_dict(state)
    assert pruner2.current == pruner.current
    assert set(masked_modules(clone)) == {"0", "2"}
    _train(clone, pruner2, range(12, 25), seed=1)
    rep = pruning.sparsity_report(clone)
    assert rep["total"]["nonzeros"] == rep["total"]["params"] - round(0.75 * rep["total"]["params"])
    assert not is_masked(clone[4])
    for mod in masked_modules(clone).values():  # stored weights stay exactly zero under the mask
        assert (mod.parametrizations.weight.original[~get_mask(mod)] == 0).all()


def test_gradual_pruner_catches_up_after_skipping_updates_and_wanda_needs_data():
    model = _model()
    pruner = GradualPruner(model, GradualSchedule(0.5, 0, 10, 2))
    rep = pruner.step(7)  # e.g. resumed at step 7 without state: jumps straight to the step-6 target
    assert rep is not None and pruner.current == pytest.approx(0.5 * (1 - 0.4**3))
    with pytest.raises(ValueError, match="calib_loader"):
        GradualPruner(model, GradualSchedule(0.5, 0, 10, 2), WandaConfig())
    loader = [torch.randn(8, 8)]
    wp = GradualPruner(_model(), GradualSchedule(0.5, 0, 4, 2), WandaConfig(), calib_loader=loader)
    wp.step(4)
    assert wp.current == pytest.approx(0.5)


def test_float_epoch_clock():
    s = GradualSchedule(final_sparsity=0.8, start_step=1.5, end_step=6.0, frequency=0.5)
    assert s.sparsity_at(1.4) == 0.0 and s.sparsity_at(1.5) == pytest.approx(0.0)
    assert s.sparsity_at(6.0) == pytest.approx(0.8) and s.sparsity_at(7.25) == pytest.approx(0.8)
    assert s.update_steps() == pytest.approx([1.5 + 0.5 * k for k in range(9)] + [6.0])
    held = 0.8 * (1 - (1 - 1.5 / 4.5) ** 3)  # updates at 1.5, 2.0, ...: 3.2 holds the value of 3.0
    assert s.sparsity_at(3.2) == pytest.approx(held) and s.sparsity_at(3.0) == pytest.approx(held)
    assert s.is_update_step(3.0) and not s.is_update_step(3.2) and s.is_update_step(6.0)
    # float clocks do not lose an update to rounding: 0.3 / 0.1 is 2.999... in floating point
    tenth = GradualSchedule(0.5, start_step=0.0, end_step=1.0, frequency=0.1)
    assert tenth.sparsity_at(0.3) == pytest.approx(cubic_sparsity(0.3, 0.5, 0.0, 1.0, None))
    assert len(tenth.update_steps()) == 11 and tenth.is_update_step(0.3)
    o = OneShotSchedule(0.6, step=2.5)
    assert o.sparsity_at(2.4) == 0.0 and o.sparsity_at(2.5) == 0.6 and o.update_steps() == [2.5]
    for bad, field in (
        (dict(start_step=-0.5), "start_step"),
        (dict(start_step=float("nan")), "start_step"),
        (dict(start_step=2.0, end_step=1.5), "end_step"),
        (dict(frequency=0.0), "frequency"),
        (dict(frequency="1"), "frequency"),
        (dict(end_step=True), "end_step"),
    ):
        with pytest.raises(ValueError, match=rf"^{field}: "):
            GradualSchedule(0.5, **bad)
    with pytest.raises(ValueError, match="^step: "):
        OneShotSchedule(0.5, step=float("inf"))


def test_continuous_schedule():
    s = GradualSchedule(0.8, start_step=1.5, end_step=6.0, frequency=None)
    ts = [1.5 + 0.01 * k for k in range(451)]
    vals = [s.sparsity_at(t) for t in ts]
    assert all(b > a for a, b in zip(vals, vals[1:]))  # rises at every time between start and end
    assert s.sparsity_at(3.2) == pytest.approx(0.8 * (1 - (1 - 1.7 / 4.5) ** 3))
    assert s.sparsity_at(6.0) == pytest.approx(0.8) and s.sparsity_at(1.0) == 0.0
    assert s.is_update_step(3.21) and s.is_update_step(6.0) and not s.is_update_step(6.5)
    with pytest.raises(ValueError, match="^frequency: "):
        s.update_steps()
    # the pruner follows the continuous ramp on a fractional-epoch clock
    keep = lambda mod, fqn: isinstance(mod, nn.Linear) and fqn in ("0", "2")  # noqa: E731
    pruner = GradualPruner(_model(), s, MagnitudeConfig(), filter_fn=keep)
    steps_per_epoch = 4
    for i in range(0, 7 * steps_per_epoch + 1):
        pruner.step(i / steps_per_epoch)
    times = [h["step"] for h in pruner.history]
    assert times == [1.75 + 0.25 * k for k in range(18)]  # every call in (1.5, 6.0] raised the target
    assert isinstance(times[0], float) and pruner.current == pytest.approx(0.8)
    assert pruner.step(6.5) is None


def test_calib_loader_factory_is_lazy():
    calls = []

    def factory():
        calls.append(1)
        return [torch.randn(8, 8), torch.randn(8, 8)]

    keep = lambda mod, fqn: isinstance(mod, nn.Linear) and fqn in ("0", "2")  # noqa: E731
    sched = GradualSchedule(0.5, start_step=0.0, end_step=2.0, frequency=0.5)
    mag = GradualPruner(_model(), sched, MagnitudeConfig(), filter_fn=keep, calib_loader=factory)
    for t in (0.0, 0.5, 1.0, 1.5, 2.0):
        mag.step(t)
    assert len(mag.history) == 4 and calls == []  # magnitude never needs calibration data
    wanda = GradualPruner(_model(), sched, WandaConfig(), filter_fn=keep, calib_loader=factory)
    assert calls == []  # building the pruner does not build the batches either
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        wanda.step(t)
    assert len(wanda.history) == 2 and len(calls) == 2  # once per prune (0.5 and 1.0), not per call
    wanda.step(2.0)
    assert len(wanda.history) == 3 and len(calls) == 3 and wanda.current == pytest.approx(0.5)
    # N:M scored by Wanda needs data too, and takes the same factory
    nm_calls = len(calls)
    nm = GradualPruner(
        nn.Sequential(nn.Linear(8, 8)),
        OneShotSchedule(0.5, step=1.5),
        SemiStructuredConfig(score="wanda"),
        filter_fn=lambda m, f: f == "0",
        calib_loader=factory,
    )
    assert nm.step(1.0) is None and len(calls) == nm_calls
    assert nm.step(1.5) is not None and len(calls) == nm_calls + 1
    with pytest.raises(ValueError, match="^calib_loader: "):
        GradualPruner(_model(), OneShotSchedule(0.5), SemiStructuredConfig(score="wanda"))
