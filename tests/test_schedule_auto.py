"""``schedule.mode: auto``: decisions logged with their signals, config errors, bit-identical resume, and
the fixed schedule untouched."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from lotus.config import config_from_dict, load_config
from lotus.errors import ConfigError
from lotus.features.registry import build_callbacks
from lotus.features.schedule import auto_probes
from lotus.features.schedule.auto import AutoState
from lotus.features.schedule.auto_callback import AutoScheduleCallback
from lotus.features.schedule.phases import Schedule
from lotus.training import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AUTO = {
    "tickets": {
        "dynamic": {"enabled": True, "ratio": 0.7},
        "patches": {"enabled": True, "keep_rate": 0.5, "refresh_every": 1},
    },
    "pruning": {"structured": {"mlp": 0.5, "importance": "taylor"}},
    # loose thresholds so that a 4-epoch run takes every kind of decision
    "schedule": {
        "mode": "auto",
        "auto": {
            "thin_tolerance": 10.0,
            "attention_mass": 0.05,
            "anneal_share": 0.25,
            "learned_loss": 1.0,
            "patches_must_pay": False,
        },
    },
}


def _auto_dict(tiny_cfg_dict: dict, epochs: int = 4) -> dict:
    d = copy.deepcopy(tiny_cfg_dict)
    d["data"]["limit_train"] = 128
    d["train"]["epochs"] = epochs
    d.update(copy.deepcopy(AUTO))
    return d


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_decisions_are_logged_with_their_signal_and_the_features_follow(tmp_path, tiny_cfg_dict, one_thread):
    run = tmp_path / "run"
    summary = Trainer(config_from_dict(_auto_dict(tiny_cfg_dict)), run_dir=str(run), quiet=True).fit()
    decisions = [e for e in summary["events"] if e["event"] == "auto_decision"]
    kinds = [d["what"] for d in decisions]
    assert kinds[0] == "reduce" and {"dynamic_ratio", "keep_rate", "thin", "anneal"} <= set(kinds)
    for d in decisions:
        assert d["signal"] and d["reason"] and "threshold" in d and "measured" in d
        assert d["from_epoch"] == d["epoch"] + 1  # taken at an epoch end, for the next epoch
    assert summary["auto_schedule"]["decisions"] == [
        {k: v for k, v in d.items() if k not in ("type", "event", "epoch", "step", "wall_s")} for d in decisions
    ]
    # the same events reach metrics.jsonl, and the epoch records name what was decided
    logged = [r for r in _records(run) if r.get("event") == "auto_decision"]
    assert [r["what"] for r in logged] == kinds
    epochs = [r for r in _records(run) if r.get("type") == "epoch"]
    assert [k for r in epochs for k in r.get("auto_decisions", [])] == kinds
    # the features followed: thinning at the decided epoch and ratios, patches at the decided rates
    thin = next(d for d in decisions if d["what"] == "thin")
    pruned = [e for e in summary["events"] if e["event"] == "prune_structured"]
    assert len(pruned) == 1 and pruned[0]["epoch"] == thin["from_epoch"] and pruned[0]["mlp"] == thin["value"]["mlp"]
    anneal = next(d for d in decisions if d["what"] == "anneal")
    for r in epochs:
        e = r["epoch"] - 1
        rates = [d["value"] for d in decisions if d["what"] == "keep_rate" and d["from_epoch"] <= e]
        expected = 1.0 if e == 0 or e >= anneal["from_epoch"] else (rates[-1] if rates else 1.0)
        assert r["patch_keep_rate"] == pytest.approx(expected)
        if e >= anneal["from_epoch"]:
            assert r["dyn_pruned"] == 0


def test_resume_after_a_decision_is_bit_identical(tmp_path, tiny_cfg_dict, one_thread):
    d = _auto_dict(tiny_cfg_dict)
    full = tmp_path / "full"
    summary = Trainer(config_from_dict(d), run_dir=str(full), quiet=True).fit()
    steps_after_2 = next(r["step"] for r in _records(full) if r.get("type") == "epoch" and r["epoch"] == 2)
    part = tmp_path / "part"
    d1 = copy.deepcopy(d)
    d1["train"]["max_steps"] = steps_after_2  # stops after epoch 2, once decisions were taken
    first = Trainer(config_from_dict(d1), run_dir=str(part), quiet=True).fit()
    assert first["auto_schedule"]["decisions"]
    resumed = Trainer(config_from_dict(d), run_dir=str(part), resume=True, quiet=True).fit()
    assert resumed["auto_schedule"]["decisions"] == summary["auto_schedule"]["decisions"]
    assert resumed["steps"] == summary["steps"] and resumed["final_val_acc"] == summary["final_val_acc"]
    from safetensors.torch import load_file

    a, b = load_file(full / "last.safetensors"), load_file(part / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # each decision is logged once, not again on resume
    logged = [r["what"] for r in _records(part) if r.get("event") == "auto_decision"]
    assert logged == [x["what"] for x in summary["auto_schedule"]["decisions"]]


@pytest.mark.parametrize(
    "change, key",
    [
        ({"schedule": {"mode": "sometimes"}}, "schedule.mode"),
        ({"schedule": {"mode": "auto", "auto": {"patience": 2}}}, "schedule.auto.patience"),
        ({"schedule": {"mode": "auto", "auto": {"thin_tolerance": -1}}}, "schedule.auto.thin_tolerance"),
        ({"schedule": {"mode": "auto", "auto": {"thin_candidates": [0.0]}}}, "schedule.auto.thin_candidates"),
        ({"schedule": {"mode": "auto", "anneal_epochs": 1}}, "schedule.anneal_epochs"),
        ({"schedule": {"mode": "auto", "reselect": {"enabled": True}}}, "schedule.reselect.enabled"),
        ({"tickets": {"patches": {"enabled": True, "source": "file", "file": "ticket.npz"}}}, "tickets.patches.source"),
        ({"pruning": {"method": "magnitude", "at_epoch": 2}}, "pruning.method"),
        ({"tickets": {"patches": {"enabled": True, "schedule": [[0, 1.0], [1, 0.5]]}}}, "tickets.patches.schedule"),
    ],
)
def test_invalid_auto_settings_name_the_key(tiny_cfg_dict, change, key):
    d = _auto_dict(tiny_cfg_dict)
    for section, values in change.items():
        for k, v in values.items():
            if isinstance(v, dict) and isinstance(d[section].get(k), dict):
                d[section][k].update(v)
            else:
                d[section][k] = v
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        config_from_dict(d)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_auto_is_accepted_data_parallel(tiny_cfg_dict, mode):
    # its signals are reduced across ranks and the ranks' decisions compared (tests/test_parallel_auto.py)
    d = _auto_dict(tiny_cfg_dict)
    d["parallel"] = {"mode": mode}
    cfg = config_from_dict(d)
    assert cfg.schedule.mode == "auto" and cfg.parallel.mode == mode


def test_auto_needs_a_feature_to_drive(tiny_cfg_dict):
    d = copy.deepcopy(tiny_cfg_dict)
    d["schedule"] = {"mode": "auto"}
    with pytest.raises(ConfigError, match="^schedule.mode: auto needs something to drive"):
        config_from_dict(d)


def test_decision_log_replays_to_the_same_plan():
    st = AutoState(epochs=10, anneal_share=0.2, max_warmup=0.5)
    assert [st.phase(e) for e in range(10)] == ["warmup"] * 5 + ["reduce"] * 3 + ["anneal"] * 2  # budget limits
    log = [
        {"what": "reduce", "from_epoch": 2, "value": 2},
        {"what": "keep_rate", "from_epoch": 2, "value": 0.75},
        {"what": "dynamic_ratio", "from_epoch": 3, "value": 0.4},
        {"what": "anneal", "from_epoch": 6, "value": 6},
    ]
    for d in log:
        st.record(d)
    again = AutoState(epochs=10, anneal_share=0.2, max_warmup=0.5)
    again.load(st.decisions)
    for s in (st, again):
        assert [s.phase(e) for e in range(10)] == ["warmup"] * 2 + ["reduce"] * 4 + ["anneal"] * 4
        assert [s.keep_rate(e) for e in (1, 2, 5, 6)] == [1.0, 0.75, 0.75, 1.0]
        assert [s.dynamic_ratio(e) for e in (2, 3, 6)] == [0.0, 0.4, 0.0]
    with pytest.raises(ValueError, match="unknown kind"):
        st.record({"what": "sometimes", "from_epoch": 1, "value": 0})


def test_fixed_schedule_is_unchanged():
    cfg = load_config(CONFIGS / "digits_lotus.yaml")
    assert cfg.schedule.mode == "fixed"
    s = Schedule(cfg)
    assert s.auto is None
    plans = s.plans()
    assert [p.phase for p in plans] == ["reduce"] * 17 + ["anneal"] * 3
    assert [p.dynamic_ratio for p in plans] == [0.5] * 17 + [0.0] * 3
    assert [p.pruning for p in plans if p.pruning] == [("pruning.structured.at_epoch",)] and plans[5].pruning
    cbs = build_callbacks(cfg, s)
    assert not any(isinstance(cb, AutoScheduleCallback) for cb in cbs)
    assert all(not getattr(cb, "follow_plan", False) and getattr(cb, "auto", None) is None for cb in cbs)


@pytest.mark.parametrize("name", ["digits_auto", "digits32_auto", "shapes32_auto"])
def test_auto_configs_load_through_base(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    s = Schedule(cfg)
    assert cfg.schedule.mode == "auto" and s.auto is not None and s.enabled
    assert any(isinstance(cb, AutoScheduleCallback) for cb in build_callbacks(cfg, s))


def _thin_run(tmp_path, tiny_cfg_dict, monkeypatch, rise_of, auto: dict | None = None) -> tuple[dict, list[dict]]:
    """An 8-epoch auto run (reduce from epoch 1, anneal at 7) whose probe losses are scripted: the live model's
    falls by 0.1 per epoch below ln(classes); a thinned copy's is higher by ``rise_of(mlp share kept)``."""
    import math

    d = _auto_dict(tiny_cfg_dict, epochs=8)
    d["tickets"] = {}
    d["schedule"]["auto"] = {"thin_tolerance": 0.2, "max_warmup": 0.125, "anneal_share": 0.125, "thin_by": 1.0}
    d["schedule"]["auto"].update(auto or {})
    seen: dict = {}

    def probe(trainer, model, data, keep=None):
        width = model.blocks[0].mlp.fc1.out_features
        full = seen.setdefault("width", trainer.unwrapped_model.blocks[0].mlp.fc1.out_features)
        dense = math.log(trainer.data.num_classes) - 0.1 * (trainer.epoch + 1)
        return dense if model is trainer.unwrapped_model else dense + rise_of(width / full)

    monkeypatch.setattr(auto_probes, "probe_loss", probe)
    summary = Trainer(config_from_dict(d), run_dir=str(tmp_path / "run"), quiet=True).fit()
    return summary, [e for e in summary["events"] if e["event"] == "auto_decision" and e["what"] == "thin"]


def test_thinning_waits_until_the_model_has_learned_enough(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    # a rise of 0.05 is 0.05 / (0.1 * (epoch + 1)) of the loss learned: within 0.2 from epoch 2 on, not before
    summary, thin = _thin_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda kept: 0.05)
    assert len(thin) == 1 and thin[0]["epoch"] == 2 and thin[0]["value"] == {"heads": 0.0, "mlp": 0.5}
    assert (
        thin[0]["measured"] == pytest.approx(0.05 / 0.3, abs=1e-5) and thin[0]["signal"] == "probe_loss_rise_of_learned"
    )
    pruned = [e for e in summary["events"] if e["event"] == "prune_structured"]
    assert [e["epoch"] for e in pruned] == [3]


def test_thinning_waits_for_thin_after(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    # the same scripted probe passes from epoch 2 on (previous test), but thin_after 0.5 of 8 epochs holds the
    # first probe back to the end of epoch 3, so thinning applies from epoch 4; thin_after > thin_by is an error
    summary, thin = _thin_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda kept: 0.05, {"thin_after": 0.5})
    assert len(thin) == 1 and thin[0]["epoch"] == 3 and thin[0]["from_epoch"] == 4
    assert [e["epoch"] for e in summary["events"] if e["event"] == "prune_structured"] == [4]
    d = _auto_dict(tiny_cfg_dict, epochs=8)
    d["schedule"]["auto"].update({"thin_after": 0.75, "thin_by": 0.5})
    with pytest.raises(ConfigError, match=r"schedule\.auto\.thin_after: expected at most schedule\.auto\.thin_by"):
        config_from_dict(d)


def test_thinning_takes_a_smaller_share_only_at_thin_by(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    # the full share (half the MLP) always costs too much, 3/4 of it (3/8 of the MLP) nothing: that smaller share
    # is taken only at the last chance (thin_by 1.0: the epoch before the reserved anneal), not at the first epoch
    summary, thin = _thin_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda kept: 1.0 if kept < 0.6 else 0.0)
    assert len(thin) == 1 and thin[0]["value"] == {"heads": 0.0, "mlp": 0.375} and thin[0]["epoch"] == 5


def test_warmup_never_ends_on_the_first_epoch(tmp_path, tiny_cfg_dict, one_thread):
    # every epoch "improves too little" (threshold 1.0), yet the first one is no signal: it starts untrained
    d = _auto_dict(tiny_cfg_dict, epochs=6)
    d["schedule"]["auto"].update({"warmup_improvement": 1.0, "max_warmup": 0.9})
    summary = Trainer(config_from_dict(d), run_dir=str(tmp_path / "run"), quiet=True).fit()
    reduce = [e for e in summary["events"] if e["event"] == "auto_decision" and e["what"] == "reduce"]
    assert len(reduce) == 1 and reduce[0]["from_epoch"] == 2 and reduce[0]["signal"] == "train_loss_improvement"


def test_dynamic_ratio_is_at_most_the_learned_share():
    from lotus.features.schedule.auto_rules import dynamic_ratio_signal

    ln10 = 2.302585
    learned_low = [0.1] * 50 + [2.0] * 50  # below-mean half all learned (loss < 0.5 ln 10)
    ratio, share, learned = dynamic_ratio_signal(learned_low, 10, cap=0.5, step=0.05, learned_loss=0.5)
    assert learned == 1.0 and share == pytest.approx(1.0) and ratio == 0.5  # capped
    unlearned = [1.3] * 50 + [2.3] * 50  # below the mean but above 0.5 ln 10: nothing may be dropped
    assert dynamic_ratio_signal(unlearned, 10, 0.5, 0.05, 0.5) == (0.0, pytest.approx(1.0), 0.0)
    mixed = [0.2] * 20 + [1.3] * 30 + [ln10] * 50  # 40 % of the below-mean samples learned
    ratio, share, learned = dynamic_ratio_signal(mixed, 10, 0.9, 0.05, 0.5)
    assert learned == pytest.approx(0.4) and ratio == pytest.approx(min(0.4, share // 0.05 * 0.05))
    assert dynamic_ratio_signal([1.0], 10, 0.5, 0.05, 0.5) == (0.0, 0.0, 0.0)


def test_no_thinning_when_no_candidate_is_within_tolerance(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    summary, thin = _thin_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda kept: 1.0)
    assert thin == [] and not [e for e in summary["events"] if e["event"] == "prune_structured"]


def _patch_run(tmp_path, tiny_cfg_dict, monkeypatch, step_seconds) -> tuple[dict, list[dict]]:
    """A 6-epoch auto run with only patch tickets to drive, whose timed training steps are scripted."""
    d = _auto_dict(tiny_cfg_dict, epochs=6)
    d["tickets"] = {"patches": {"enabled": True, "keep_rate": 0.5, "refresh_every": 2}}
    d["pruning"] = {}
    d["schedule"]["auto"] = {"attention_mass": 0.05, "max_warmup": 0.2, "anneal_share": 0.2}
    monkeypatch.setattr(auto_probes, "step_seconds", lambda trainer, model, x, y, k: step_seconds(k))
    summary = Trainer(config_from_dict(d), run_dir=str(tmp_path / "run"), quiet=True).fit()
    return summary, [e for e in summary["events"] if e["event"] == "auto_decision" and e["what"] == "keep_rate"]


def test_patch_tickets_stay_off_when_they_save_less_than_reranking_costs(
    tmp_path, tiny_cfg_dict, monkeypatch, one_thread
):
    # training on fewer patches is scripted to save nothing: any re-ranking costs more, so they never start
    summary, rates = _patch_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda k: (0.01, 0.01))
    assert len(rates) == 1 and rates[0]["value"] == 1.0 and rates[0]["signal"] == "patch_seconds_saved_per_epoch"
    assert rates[0]["measured"] == 0.0 and rates[0]["threshold"] > 0.0 and "stay off" in rates[0]["reason"]
    epochs = [r for r in _records(tmp_path / "run") if r.get("type") == "epoch"]
    assert all(r["patch_keep_rate"] == 1.0 for r in epochs)
    assert not [e for e in summary["events"] if e["event"] == "patch_refresh"]


def test_patch_tickets_start_when_they_pay_and_then_descend(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    # a scripted saving of 10 s per step pays for any re-ranking: the descent starts and goes on step by step
    summary, rates = _patch_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda k: (10.0, 0.0))
    assert [d["value"] for d in rates] == [0.875, 0.75]  # one keep_rate_step per reduced epoch (2 and 3)
    assert "would save" in rates[0]["reason"] and "would save" not in rates[1]["reason"]  # checked once
    epochs = {r["epoch"] - 1: r for r in _records(tmp_path / "run") if r.get("type") == "epoch"}
    assert [epochs[e]["patch_keep_rate"] for e in range(6)] == [1.0, 1.0, 0.875, 0.75, 1.0, 1.0]


def test_step_timing_leaves_the_model_and_rng_untouched(tmp_path, tiny_cfg_dict, one_thread):
    d = _auto_dict(tiny_cfg_dict, epochs=1)
    trainer = Trainer(config_from_dict(d), run_dir=str(tmp_path / "run"), quiet=True)
    trainer.fit()
    cb = next(c for c in trainer.callbacks if isinstance(c, AutoScheduleCallback))
    x, y = cb.probe_batches(trainer)[0]
    before = {k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    rng = torch.get_rng_state()
    full, kept = auto_probes.step_seconds(trainer, trainer.unwrapped_model, x, y, 4)
    assert 0.0 < full < 60.0 and 0.0 < kept < 60.0
    assert torch.equal(torch.get_rng_state(), rng)
    after = trainer.unwrapped_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in trainer.unwrapped_model.parameters())


def _random_patch_dict(tiny_cfg_dict, keep_stall: float = 0.0, epochs: int = 6) -> dict:
    d = _auto_dict(tiny_cfg_dict, epochs=epochs)
    d["tickets"] = {"patches": {"enabled": True, "keep_rate": 0.5, "scorer": "random"}}
    d["pruning"] = {}
    d["schedule"]["auto"] = {"keep_tolerance": 0.2, "max_warmup": 0.2, "anneal_share": 0.2, "keep_stall": keep_stall}
    return d


def _random_patch_run(
    tmp_path, tiny_cfg_dict, monkeypatch, rise, full=0.1, step_seconds=(10.0, 0.0), keep_stall=0.0, run="run", epochs=6
) -> tuple[dict, list[dict]]:
    """A 6-epoch auto run driving random patch tickets (8 of 16 patches at the floor), whose probe loss on all
    patches (``full``) and rise per kept count (``rise(k)``) are scripted (the stall signal off by default)."""
    d = _random_patch_dict(tiny_cfg_dict, keep_stall, epochs)
    monkeypatch.setattr(auto_probes, "step_seconds", lambda trainer, model, x, y, k: step_seconds)

    def rises(trainer, model, data, ks, full_loss=None, gate=math.inf):
        f = full if full_loss is None else full_loss
        return f, ({} if f >= gate else {k: rise(k) for k in ks})

    monkeypatch.setattr(
        auto_probes,
        "random_keep_rises",
        lambda trainer, model, data, ks, full=None, gate=math.inf: rises(trainer, model, data, ks, full, gate),
    )
    summary = Trainer(config_from_dict(d), run_dir=str(tmp_path / run), quiet=True).fit()
    return summary, [e for e in summary["events"] if e["event"] == "auto_decision" and e["what"] == "keep_rate"]


def _keep_rates(run_dir) -> list[float]:
    return [r["patch_keep_rate"] for r in _records(run_dir) if r.get("type") == "epoch"]


def test_random_patches_start_at_the_floor_and_hold_it_within_tolerance(
    tmp_path, tiny_cfg_dict, monkeypatch, one_thread
):
    summary, rates = _random_patch_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda k: 0.1)
    assert [(d["value"], d["from_epoch"], d["signal"]) for d in rates] == [(0.5, 0, "random_patches_at_start")]
    assert "8 of 16 random patches from the start" in rates[0]["reason"] and "saves" in rates[0]["reason"]
    assert _keep_rates(tmp_path / "run") == [0.5, 0.5, 0.5, 0.5, 1.0, 1.0]  # the warm-up too; all in the anneal
    epochs = [r for r in _records(tmp_path / "run") if r.get("type") == "epoch"]
    assert [r.get("auto_keep_rise") for r in epochs] == [0.1] * 3 + [None] * 3  # each epoch before the anneal
    assert not [e for e in summary["events"] if e["event"] == "patch_refresh"]  # nothing is re-ranked


def test_random_patches_rise_to_the_lowest_rung_within_tolerance(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    # 8 and 10 of 16 random patches give back too much, 12 do not: one raise, to 0.75, never lowered again
    summary, rates = _random_patch_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda k: 0.5 if k < 12 else 0.1)
    assert [(d["value"], d["from_epoch"]) for d in rates] == [(0.5, 0), (0.75, 1)]
    raise_ = rates[1]
    assert raise_["signal"] == "random_keep_loss_rise_of_learned" and raise_["measured"] == 0.5
    assert raise_["threshold"] == 0.2 and "with 8 of 16 random patches" in raise_["reason"]
    assert _keep_rates(tmp_path / "run") == [0.5, 0.75, 0.75, 0.75, 1.0, 1.0]


def test_random_patches_rise_a_rung_when_the_train_loss_stalls(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    # keep_stall 1.0: every epoch's loss "stalls"; the probe rise is within tolerance. The first epoch has no epoch
    # before it, and the epoch after a raise started on other patches: neither is a stall signal
    summary, rates = _random_patch_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda k: 0.1, keep_stall=1.0)
    assert [(d["value"], d["from_epoch"]) for d in rates] == [(0.5, 0), (0.625, 2)]
    stall = rates[1]
    assert stall["signal"] == "train_loss_improvement_on_kept_patches" and stall["threshold"] == 1.0
    assert "train loss on 8 of 16 random patches fell by" in stall["reason"] and "10 patches" in stall["reason"]
    assert _keep_rates(tmp_path / "run") == [0.5, 0.5, 0.625, 0.625, 1.0, 1.0]


def test_random_patches_rise_to_all_when_no_rung_is_within_tolerance(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    summary, rates = _random_patch_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda k: 0.5)
    assert [d["value"] for d in rates] == [0.5, 1.0]
    assert _keep_rates(tmp_path / "run") == [0.5] + [1.0] * 5


def test_random_patches_wait_until_the_probe_batches_are_learned(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    # a probe loss above learned_loss x ln(classes): the rise says nothing yet, the keep rate stays
    summary, rates = _random_patch_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda k: 0.5, full=10.0)
    assert [d["value"] for d in rates] == [0.5]
    assert _keep_rates(tmp_path / "run") == [0.5, 0.5, 0.5, 0.5, 1.0, 1.0]
    assert all("auto_keep_rise" not in r for r in _records(tmp_path / "run") if r.get("type") == "epoch")


def test_random_patches_stall_signal_starts_after_the_warmup_when_nothing_is_learned(
    tmp_path, tiny_cfg_dict, monkeypatch, one_thread
):
    # the probe batches are never learned (no rise is measured), but the train loss stalls: the first stall
    # check is at the end of the second reduced-phase epoch (reduce from epoch 2 at the latest: epoch 3)
    summary, rates = _random_patch_run(
        tmp_path, tiny_cfg_dict, monkeypatch, lambda k: 0.5, full=10.0, keep_stall=1.0, epochs=8
    )
    reduce = next(e for e in summary["events"] if e["event"] == "auto_decision" and e["what"] == "reduce")
    assert reduce["from_epoch"] == 2
    assert [(d["value"], d["from_epoch"], d["signal"]) for d in rates] == [
        (0.5, 0, "random_patches_at_start"),
        (0.625, 4, "train_loss_improvement_on_kept_patches"),
    ]
    assert _keep_rates(tmp_path / "run") == [0.5] * 4 + [0.625] * 2 + [1.0] * 2


def test_random_patches_stay_off_when_a_step_on_them_saves_nothing(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    summary, rates = _random_patch_run(tmp_path, tiny_cfg_dict, monkeypatch, lambda k: 0.1, step_seconds=(1.0, 1.0))
    assert [(d["value"], d["from_epoch"], d["signal"]) for d in rates] == [(1.0, 0, "patch_seconds_saved_per_epoch")]
    assert _keep_rates(tmp_path / "run") == [1.0] * 6


def test_random_patch_run_resumes_to_the_same_plan(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    rise = lambda k: 0.5 if k < 12 else 0.1  # noqa: E731
    full, _ = _random_patch_run(tmp_path, tiny_cfg_dict, monkeypatch, rise, run="full")
    d = _random_patch_dict(tiny_cfg_dict)
    steps = next(r["step"] for r in _records(tmp_path / "full") if r.get("type") == "epoch" and r["epoch"] == 3)
    d1 = copy.deepcopy(d)
    d1["train"]["max_steps"] = steps
    Trainer(config_from_dict(d1), run_dir=str(tmp_path / "part"), quiet=True).fit()
    resumed = Trainer(config_from_dict(d), run_dir=str(tmp_path / "part"), resume=True, quiet=True).fit()
    assert resumed["auto_schedule"]["decisions"] == full["auto_schedule"]["decisions"]
    assert _keep_rates(tmp_path / "part") == _keep_rates(tmp_path / "full")
    assert resumed["final_val_acc"] == full["final_val_acc"]


def test_random_keep_rise_is_measured_on_the_live_model(tmp_path, tiny_cfg_dict, one_thread):
    d = _auto_dict(tiny_cfg_dict, epochs=1)
    d["tickets"] = {"patches": {"enabled": True, "keep_rate": 0.5, "scorer": "random"}}
    trainer = Trainer(config_from_dict(d), run_dir=str(tmp_path / "run"), quiet=True)
    trainer.fit()
    cb = next(c for c in trainer.callbacks if isinstance(c, AutoScheduleCallback))
    model = trainer.unwrapped_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = int(model.patch_embed.num_patches)
    data = cb.probe_batches(trainer)
    full, rises = auto_probes.random_keep_rises(trainer, model, data, [n, n // 4])
    assert full == pytest.approx(auto_probes.probe_loss(trainer, model, data))
    assert rises[n] == pytest.approx(0.0, abs=1e-6)  # all patches: the same loss as the full forward
    assert rises[n // 4] != pytest.approx(0.0, abs=1e-6)  # a quarter of them: a different loss
    # seeded: the same draw each time
    assert (full, rises) == auto_probes.random_keep_rises(trainer, model, data, [n, n // 4])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
