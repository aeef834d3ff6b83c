"""``schedule.mode: auto`` driving the resolution (the token budget's second lever): the side starts low, rises
on the scripted probe and stall signals, is full in the anneal, shares a stall with random patches by what each
gives back, and a resumed run replays the same sides and weights."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lotus.config import config_from_dict
from lotus.features.schedule import auto_probes
from lotus.training import Trainer


def _dict(tiny_cfg_dict: dict, patches: bool = False, keep_stall: float = 0.0, epochs: int = 6) -> dict:
    d = copy.deepcopy(tiny_cfg_dict)
    d["model"]["kwargs"] = {"dynamic_img_size": True}  # 16 px images, 4 px patches: sides 8, 12, 16
    d["data"]["limit_train"] = 128
    d["train"]["epochs"] = epochs
    d["resolution"] = {"enabled": True, "start": 0.5}
    d["tickets"] = {"patches": {"enabled": patches, "keep_rate": 0.5, "scorer": "random"}}
    d["schedule"] = {
        "mode": "auto",
        "auto": {"keep_tolerance": 0.2, "max_warmup": 0.2, "anneal_share": 0.2, "keep_stall": keep_stall},
    }
    return d


def _script(monkeypatch, side_rise, keep_rise=lambda k: 0.0, full=0.1, seconds=(10.0, 0.0)) -> None:
    """Probe losses and step times as given: ``side_rise(side)``, ``keep_rise(k)``, ``full`` on all tokens."""
    monkeypatch.setattr(auto_probes, "step_seconds", lambda *a, **k: seconds)
    monkeypatch.setattr(auto_probes, "probe_loss", lambda *a, **k: full)
    monkeypatch.setattr(
        auto_probes,
        "side_rises",
        lambda trainer, model, data, sides, f, gate=math.inf: {s: side_rise(s) for s in sides if f < gate},
    )
    monkeypatch.setattr(
        auto_probes,
        "random_keep_rises",
        lambda trainer, model, data, ks, full=None, gate=math.inf, _f=full: (
            _f if full is None else full,
            {} if (_f if full is None else full) >= gate else {k: keep_rise(k) for k in ks},
        ),
    )


def _epochs(run) -> list[dict]:
    return [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["type"] == "epoch"]


def _decided(summary: dict, what: str) -> list[tuple]:
    return [
        (e["value"], e["from_epoch"], e["signal"])
        for e in summary["events"]
        if e["event"] == "auto_decision" and e["what"] == what
    ]


def test_side_starts_low_rises_on_the_probe_and_is_full_in_the_anneal(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    _script(monkeypatch, side_rise=lambda s: 0.5 if s < 12 else 0.1)  # 8 px gives back too much, 12 px does not
    run = tmp_path / "run"
    summary = Trainer(config_from_dict(_dict(tiny_cfg_dict)), run_dir=str(run), quiet=True).fit()
    assert _decided(summary, "side") == [(8, 0, "side_at_start"), (12, 1, "side_loss_gap_of_learned")]
    eps = _epochs(run)
    assert [e["img_side"] for e in eps] == [8, 12, 12, 12, 16, 16]  # the anneal (last 2 epochs) at full size
    assert eps[0]["auto_side_rise"] == 0.5 and "auto_side_rise" not in eps[-1]
    flops = [eps[0]["train_flops"]] + [b["train_flops"] - a["train_flops"] for a, b in zip(eps, eps[1:])]
    assert flops[0] < 0.5 * flops[-1] and flops[1] < flops[-1]  # fewer tokens: really cheaper
    assert [e["side"] for e in summary["events"] if e["event"] == "resolution"] == [8, 12, 16]
    assert summary["final_val_acc"] > 0.12  # above chance, evaluated at full size


def test_a_checkpoint_from_before_auto_decided_the_side_is_refused(tiny_cfg_dict):
    from lotus.errors import LotusError
    from lotus.features.schedule.auto import AutoState
    from lotus.features.schedule.auto_callback import AutoScheduleCallback

    cb = AutoScheduleCallback(config_from_dict(_dict(tiny_cfg_dict)), AutoState(6, 0.2, 0.2))
    with pytest.raises(LotusError, match="^resolution.enabled: this checkpoint was written before"):
        cb.load_state_dict({"decisions": [{"what": "reduce", "from_epoch": 1, "value": 1}]})
    cb.load_state_dict({"decisions": []})  # a checkpoint before any decision: nothing to replay


def test_side_stays_full_when_a_smaller_side_saves_nothing(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    _script(monkeypatch, side_rise=lambda s: 0.0, seconds=(1.0, 1.0))
    run = tmp_path / "run"
    summary = Trainer(config_from_dict(_dict(tiny_cfg_dict)), run_dir=str(run), quiet=True).fit()
    assert _decided(summary, "side") == [(16, 0, "side_seconds_saved_per_epoch")]
    assert [e["img_side"] for e in _epochs(run)] == [16] * 6


def test_a_stall_raises_the_lever_that_gives_back_more(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    # both levers within tolerance, every epoch a "stall" (keep_stall 1.0): the side gives back more (0.15 vs 0.05),
    # so the side takes each stall and the keep rate holds; once the side is full, the patches take it
    _script(monkeypatch, side_rise=lambda s: 0.15, keep_rise=lambda k: 0.05)
    run = tmp_path / "run"
    d = _dict(tiny_cfg_dict, patches=True, keep_stall=1.0, epochs=10)
    summary = Trainer(config_from_dict(d), run_dir=str(run), quiet=True).fit()
    sides, keeps = _decided(summary, "side"), _decided(summary, "keep_rate")
    assert sides[0] == (8, 0, "side_at_start") and keeps[0] == (0.5, 0, "random_patches_at_start")
    stalls = [s for s in sides[1:] if s[2] == "train_loss_improvement_at_side"]
    assert [s[0] for s in stalls] == [12, 16]  # one patch a side per stall
    keep_stalls = [k for k in keeps[1:] if k[2] == "train_loss_improvement_on_kept_patches"]
    assert keep_stalls and min(k[1] for k in keep_stalls) > max(s[1] for s in stalls)  # only after the side is full
    eps = _epochs(run)
    assert all(e["img_side"] == 16 and e["patch_keep_rate"] == 1.0 for e in eps[-2:])  # the anneal: every token


def test_resume_replays_the_sides_and_the_weights(tmp_path, tiny_cfg_dict, monkeypatch, one_thread):
    # a stall every epoch: the side rises at the end of epochs 2 and 4 (not right after a change), so one decision
    # is replayed from the checkpoint and one is taken after the resume
    _script(monkeypatch, side_rise=lambda s: 0.1)
    d = _dict(tiny_cfg_dict, keep_stall=1.0, epochs=8)
    full = Trainer(config_from_dict(d), run_dir=str(tmp_path / "full"), quiet=True).fit()
    steps = next(r["step"] for r in _epochs(tmp_path / "full") if r["epoch"] == 2)
    d1 = copy.deepcopy(d)
    d1["train"]["max_steps"] = steps
    Trainer(config_from_dict(d1), run_dir=str(tmp_path / "part"), quiet=True).fit()
    resumed = Trainer(config_from_dict(d), run_dir=str(tmp_path / "part"), resume=True, quiet=True).fit()
    assert resumed["auto_schedule"]["decisions"] == full["auto_schedule"]["decisions"]
    sides = [(v, e) for v, e, _ in _decided(full, "side")]
    assert sides[0] == (8, 0) and any(e <= 2 for _, e in sides[1:]) and any(e > 2 for _, e in sides[1:])
    assert [e["img_side"] for e in _epochs(tmp_path / "part")] == [e["img_side"] for e in _epochs(tmp_path / "full")]
    a, b = load_file(tmp_path / "full" / "last.safetensors"), load_file(tmp_path / "part" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_side_probe_measures_the_live_model_at_full_size_and_smaller(tmp_path, tiny_cfg_dict, one_thread):
    # unscripted: the probes run on the model being trained; a smaller side changes the loss, full size does not
    trainer = Trainer(config_from_dict(_dict(tiny_cfg_dict, epochs=1)), write=False, quiet=True)
    trainer.fit()
    cb = trainer.features["schedule.mode"]
    model, data = cb._model(trainer), cb.probe_batches(trainer)
    with auto_probes.eval_mode(model):
        full = auto_probes.probe_loss(trainer, model, data)
        assert auto_probes.probe_loss(trainer, model, data, side=16) == full
    rises = auto_probes.side_rises(trainer, model, data, [8, 16], full)
    assert rises[16] == 0.0 and rises[8] != 0.0
    low = auto_probes.probe_loss(trainer, model, data, side=8)
    assert auto_probes.side_rises(trainer, model, data, [8], full, gate=min(low, full)) == {}  # not learned: no gap
    assert auto_probes.side_rises(trainer, model, data, [8], full, gate=min(low, full) + 1e-6) == {8: rises[8]}
    x, y = data[0]
    whole, small = auto_probes.step_seconds(trainer, model, x, y, None, side=8)  # resolution alone: no patch_drop
    assert whole > 0 and small > 0
    gap = auto_probes.side_gap(0.5, 1.0, 10)  # lower at the side: negative, over the better loss's learned share
    assert gap == pytest.approx(-0.5 / (math.log(10) - 0.5))


AUTO_CONFIGS = ("fashion_auto", "digits32_auto", "textures_auto", "shapes32_auto")


def test_one_auto_config_for_every_dataset():
    """The auto configs of the benchmarks share every section that decides the method; only the dataset's data,
    model and training length / recipe (the dense baseline's) differ."""
    from pathlib import Path

    from lotus.config import config_to_dict, load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfgs = {n: config_to_dict(load_config(configs / f"{n}.yaml")) for n in AUTO_CONFIGS}
    may_differ = {"name", "data", "model", "train", "output"}  # the dataset, its model and its recipe / budget
    first = cfgs[AUTO_CONFIGS[0]]
    for name, cfg in cfgs.items():
        assert cfg["schedule"]["mode"] == "auto" and cfg["tickets"]["patches"]["enabled"], name
        assert cfg.keys() == first.keys()
        for section in sorted(set(cfg) - may_differ):
            assert cfg[section] == first[section], f"{name}: {section} differs from {AUTO_CONFIGS[0]}"
