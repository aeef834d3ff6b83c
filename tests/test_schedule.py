"""The schedule: section: validation of phases, events at the right time, resume across events, bench."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from lotus.callbacks import Callback
from lotus.config import config_from_dict
from lotus.errors import ConfigError
from lotus.training import Trainer


def _cfg(d, **sections):
    d = {**d, **sections}
    d["train"] = {**d["train"], "epochs": 4}
    return d


@pytest.mark.parametrize(
    "lotus, extra, message",
    [
        (
            {"enabled": True, "warmup_epochs": 2, "anneal_epochs": 2},
            {},
            "warmup_epochs + anneal_epochs (2 + 2) must be < train.epochs (4)",
        ),
        (
            {"enabled": True, "warmup_epochs": 2},
            {"pruning": {"structured": {"mlp": 0.5, "at_epoch": 1}}},
            "pruning.structured.at_epoch: epoch 1 falls inside the lotus warm-up",
        ),
        (
            {"enabled": True, "warmup_epochs": 1},
            {"pruning": {"method": "magnitude", "at_epoch": 0.5}},
            "pruning.at_epoch: epoch 0.5 falls inside the lotus warm-up",
        ),
        (
            {"enabled": True, "anneal_epochs": 1, "reselect": {"enabled": True, "epochs": [3]}},
            {},
            "schedule.reselect.epochs: epoch 3 is outside the reduced phase",
        ),
        (
            {"enabled": True, "reselect": {"enabled": True, "scorer": "nope"}},
            {},
            "schedule.reselect.scorer: expected one of",
        ),
        ({"enabled": True, "reselect": {"enabled": True, "scorer": "el2n"}}, {}, "el2n needs proxy trainings"),
        (
            {"enabled": True, "reselect": {"enabled": True}},
            {"tickets": {"file": "t.npz"}},
            "cannot be combined with tickets.file",
        ),
        ({"enabled": False, "reselect": {"enabled": True}}, {}, "needs schedule.enabled: true"),
        (
            {"enabled": True, "warmup_epochs": 1, "anneal_epochs": 1},
            {"tickets": {"patches": {"enabled": True, "schedule": [[0, 0.5]]}}},
            "overlaps the lotus warm-up/anneal",
        ),
    ],
)
def test_impossible_schedules_are_errors(tiny_cfg_dict, lotus, extra, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_cfg(tiny_cfg_dict, schedule=lotus, **extra))
    assert message in str(e.value)


def test_schedule_derives_phase_settings_without_changing_the_config(tiny_cfg_dict):
    from lotus.config import config_to_dict
    from lotus.features.schedule.phases import Schedule

    cfg = config_from_dict(
        _cfg(
            tiny_cfg_dict,
            schedule={"enabled": True, "warmup_epochs": 1, "anneal_epochs": 1},
            tickets={"patches": {"enabled": True, "keep_rate": 0.5}, "dynamic": {"enabled": True, "anneal": 0.0}},
        )
    )
    before = config_to_dict(cfg)
    s = Schedule(cfg)
    assert [list(p) for p in s.patch_keep_rates.points] == [[0.0, 1.0], [1.0, 0.5], [3.0, 1.0]]
    assert s.dynamic_anneal == pytest.approx(0.25)
    plans = s.plans()
    assert [p.phase for p in plans] == ["warmup", "reduce", "reduce", "anneal"]
    assert [p.patch_keep_rate for p in plans] == [1.0, 0.5, 0.5, 1.0]
    assert [p.dynamic_ratio for p in plans] == [0.5, 0.5, 0.5, 0.0]
    assert [p.full_data for p in plans] == [True, False, False, True]
    assert config_to_dict(cfg) == before  # nothing derived is written back
    assert before["tickets"]["patches"]["schedule"] == [] and before["tickets"]["dynamic"]["anneal"] == 0.0
    longer = config_from_dict(yaml.safe_load(yaml.safe_dump(before)), ["train.epochs=8"])
    assert [list(p) for p in Schedule(longer).patch_keep_rates.points] == [[0.0, 1.0], [1.0, 0.5], [7.0, 1.0]]


def test_saved_config_is_what_the_user_gave(tmp_path, tiny_cfg_dict):
    from lotus.config import load_config, save_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg_dict))
    cfg = load_config(path, ["optim.lr=0.01"])
    save_config(cfg, str(tmp_path / "saved.yaml"))
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    expect = {**tiny_cfg_dict, "name": "c"}
    expect["optim"] = {**expect["optim"], "lr": 0.01}
    assert saved == expect


class _Record(Callback):
    order = 1000

    def __init__(self):
        self.subsets = []

    def on_epoch_start(self, trainer, epoch):
        self.subsets.append(None if trainer.subset is None else len(trainer.subset))


def _lotus_cfg(tiny_cfg_dict):
    d = _cfg(
        tiny_cfg_dict,
        schedule={
            "enabled": True,
            "warmup_epochs": 1,
            "anneal_epochs": 1,
            "reselect": {"enabled": True, "scorer": "loss", "policy": "random", "fraction": 0.5},
        },
        pruning={"structured": {"mlp": 0.5, "at_epoch": 2}},
    )
    return config_from_dict(d)


def test_events_fire_in_their_phase(tmp_path, tiny_cfg_dict):
    rec = _Record()
    t = Trainer(_lotus_cfg(tiny_cfg_dict), run_dir=str(tmp_path / "r"), quiet=True, callbacks=[rec])
    summary = t.fit()
    names = [(e["event"], e["epoch"]) for e in summary["events"]]
    assert ("reselect", 1) in names and ("anneal_full_data", 3) in names
    assert ("phase_reduce", 1) in names and ("phase_anneal", 3) in names
    prune = [e for e in summary["events"] if e["event"] == "prune_structured"]
    assert len(prune) == 1 and prune[0]["step"] == math.ceil(1437 / 32) + math.ceil(718 / 32)
    assert rec.subsets == [None, 718, 718, None]  # full data in warm-up and anneal, half in between
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in recs if r["type"] == "event" and r["event"] == "reselect"] == ["reselect"]
    assert summary["params"] < 69962  # the MLPs were thinned


class _Stop(Callback):
    def on_epoch_start(self, trainer, epoch):
        if epoch == 3:
            raise KeyboardInterrupt


def test_resume_across_events(tmp_path, tiny_cfg_dict):
    cfg = _lotus_cfg(tiny_cfg_dict)
    full = Trainer(cfg, run_dir=str(tmp_path / "full"), quiet=True)
    full.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run_dir=str(tmp_path / "cut"), quiet=True, callbacks=[_Stop()]).fit()
    resumed = Trainer(cfg, run_dir=str(tmp_path / "cut"), quiet=True, resume=True)
    resumed.fit()  # rebuilds the thinned shapes and the selected subset from the saved state
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bench_end_to_end(tmp_path, tiny_cfg_dict):
    from lotus.bench import run_bench
    from lotus.bench_report import analyse, write_bench

    tiny_cfg_dict["train"]["epochs"] = 2
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_cfg_dict))
    other = tmp_path / "lot.yaml"
    other.write_text(yaml.safe_dump({"base": "base.yaml", "tickets": {"dynamic": {"enabled": True}}}))
    res = run_bench([str(base), str(other)], seeds=2, out=str(tmp_path / "b"), progress=False, quiet=True)
    analysis = analyse(res, inference_repeats=1)
    table = write_bench(analysis, str(tmp_path / "b"))
    assert "| base |" in table and "| lot |" in table
    rows = {r["name"]: r for r in analysis["rows"]}
    assert rows["base"]["seeds"] == 2 and rows["lot"]["samples_mean"] < rows["base"]["samples_mean"]
    assert math.isclose(analysis["target"], rows["base"]["final_acc_mean"] - 0.005)
    for f in ("bench.md", "bench.json", "acc_vs_time.png", "acc_vs_flops.png"):
        assert (tmp_path / "b" / f).is_file()
    # an unreachable target: no speed-ups, and bench.json stays strict JSON (null, not Infinity)
    table = write_bench(analyse(res, target=1.01, inference_repeats=1), str(tmp_path / "u"))
    assert "| base | " in table and " | 0/2 | -, - | - | - |" in table
    assert (
        "**lot: not faster than base** - reached the target in 0/2 seeds" in (tmp_path / "u" / "bench.md").read_text()
    )
    # inference timings are kept with the runs: a rerun reports the same img/s instead of re-timing
    kept = json.loads((Path(res[0].runs[0]) / "inference.json").read_text())
    assert analyse(res, inference_repeats=1)["rows"][0]["inf_img_per_s"] == pytest.approx(
        statistics.fmean(
            json.loads((Path(d) / "inference.json").read_text())["result"]["img_per_s"] for d in res[0].runs
        )
    )
    assert kept["key"]["repeats"] == 1 and kept["key"]["threads"] == 1
    strict = json.loads((tmp_path / "u" / "bench.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict["rows"][0]["time_to_target_mean"] is None
    # rerunning reuses the finished runs, but not runs made with another config
    again = run_bench([str(base), str(other)], seeds=2, out=str(tmp_path / "b"), progress=False, quiet=True)
    assert again[0].runs == res[0].runs
    from lotus.errors import LotusError

    with pytest.raises(LotusError, match="was trained with another config"):
        run_bench(
            [str(base), str(other)],
            seeds=2,
            out=str(tmp_path / "b"),
            overrides=["optim.lr=0.01"],
            progress=False,
            quiet=True,
        )


def test_bench_speedups_lower_bound_when_baseline_misses_target():
    from lotus.bench_report import add_speedups, bench_table

    def row(name, tt, ft, curves):
        mean = lambda xs: sum(xs) / len(xs) if all(map(math.isfinite, xs)) else math.inf  # noqa: E731
        return {
            "name": name,
            "seeds": len(tt),
            "final_acc_mean": 0.9,
            "final_acc_std": 0.0,
            "time_to_target": tt,
            "time_to_target_mean": mean(tt),
            "flops_to_target": ft,
            "flops_to_target_mean": mean(ft),
            "samples_mean": 1,
            "params": 1,
            "nonzero": 1,
            "inf_flops_per_img": 1,
            "inf_img_per_s": 10.0,
            "curves": curves,
        }

    # baseline: seed 0 reaches the target at 40 s, seed 1 never does (its run ends at 100 s / 1000 FLOPs)
    base = row("base", [40.0, math.inf], [400.0, math.inf], [[(100.0, 2000.0, 0.9)], [(100.0, 2000.0, 0.8)]])
    fast = row("fast", [10.0, 20.0], [100.0, 200.0], [[(30.0, 300.0, 0.9)]] * 2)
    slow = row("slow", [10.0, math.inf], [100.0, math.inf], [[(30.0, 300.0, 0.9)]] * 2)
    assert add_speedups([base, fast, slow]) is True
    assert math.isclose(fast["speedup_time"], 70.0 / 15.0) and fast["speedup_is_lower_bound"]
    assert math.isclose(fast["speedup_flops"], 1200.0 / 150.0)
    assert slow["speedup_time"] == 0.0 and not slow["speedup_is_lower_bound"]
    assert base["speedup_time"] == base["speedup_flops"] == 1.0 and not base["speedup_is_lower_bound"]
    lines = {
        ln.split(" | ")[0]: ln.split(" | ")
        for ln in bench_table({"target": 0.9, "rows": [base, fast, slow]}).splitlines()
    }
    # the table's speed-ups are per-seed ratios against the baseline's same seed (its unreached seed has none)
    assert lines["| base"][2:6] == ["1/2", "40.0, -", "1.00x (1.00-1.00) [1/2 seeds]", "1.00x (1.00-1.00) [1/2 seeds]"]
    assert lines["| fast"][2:6] == [
        "2/2",
        "10.0, 20.0",
        "4.00x (4.00-4.00) [1/2 seeds]",
        "4.00x (4.00-4.00) [1/2 seeds]",
    ]
    assert lines["| slow"][2:6] == ["1/2", "10.0, -", "4.00x (4.00-4.00) [1/2 seeds]", "4.00x (4.00-4.00) [1/2 seeds]"]
    from lotus.bench_report import verdict

    said = verdict({"target": 0.9, "target_drop": 0.005, "rows": [base, fast, slow]})
    assert said[0].startswith("- **fast: not faster than base**") and "2/2 seeds" in said[0]  # 1 seed has a ratio
    assert said[1].startswith("- **slow: not faster than base**") and "1/2 seeds" in said[1]
    # a baseline that reaches the target in every seed gives plain ratios
    base2 = row("base", [40.0, 60.0], [400.0, 600.0], [[(100.0, 1000.0, 0.9)]] * 2)
    assert add_speedups([base2, fast]) is False
    assert math.isclose(fast["speedup_time"], 50.0 / 15.0) and not fast["speedup_is_lower_bound"]
    assert fast["speedup_time_per_seed"]["per_seed"] == [4.0, 3.0] and fast["speedup_time_per_seed"]["median"] == 3.5
    said = verdict({"target": 0.9, "target_drop": 0.005, "rows": [base2, fast]})
    assert said[0].startswith("- **fast: faster than base**") and "3.50x (3.00-4.00)" in said[0]


def test_resume_op_block_with_dynamic_pruning_and_thinning(tmp_path, tiny_cfg_dict):
    """The shipped digits_lotus recipe (OP block, dynamic data pruning, MLP + head thinning, anneal) resumes
    exactly from a run killed after the thinning event."""
    d = _cfg(
        tiny_cfg_dict,
        model={**tiny_cfg_dict["model"], "block": "op"},
        schedule={"enabled": True, "anneal_epochs": 1},
        tickets={"dynamic": {"enabled": True, "ratio": 0.5}},
        pruning={"structured": {"mlp": 0.5, "heads": 0.5, "at_epoch": 2, "importance": "taylor"}},
    )
    cfg = config_from_dict(d)
    full = Trainer(cfg, run_dir=str(tmp_path / "full"), quiet=True)
    summary = full.fit()
    assert any(e["event"] == "prune_structured" for e in summary["events"])
    assert summary["samples_seen"] < 4 * 1437  # dynamic pruning skipped samples
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run_dir=str(tmp_path / "cut"), quiet=True, callbacks=[_Stop()]).fit()
    resumed = Trainer(cfg, run_dir=str(tmp_path / "cut"), quiet=True, resume=True)
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_old_lotus_section_names_its_new_key(tiny_cfg_dict):
    from lotus.config import config_from_dict
    from lotus.errors import ConfigError

    for source, overrides in (
        ({**tiny_cfg_dict, "lotus": {"schedule": "auto"}}, []),
        (tiny_cfg_dict, ["lotus.enabled=true"]),
    ):
        with pytest.raises(ConfigError, match=r"^lotus: this section is now called schedule: .*schedule\.mode"):
            config_from_dict(source, overrides)
