"""lotus bench usability: per-run epoch bars, --jobs workers, n=1 shown as n=1, per-seed ratios."""

from __future__ import annotations

import io
import math
import os

import pytest
import yaml


def _tiny(tmp_path, tiny_cfg_dict, epochs: int = 1):
    tiny_cfg_dict["train"]["epochs"] = epochs
    tiny_cfg_dict["data"]["limit_train"] = 96
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg_dict))
    return str(path)


def test_mean_std_and_seed_ratios():
    from lotus.bench_stats import mean_std, seed_ratios

    assert mean_std([0.9]) == "90.00% (n=1)"
    assert mean_std([0.9, 0.8]) == "85.00 +- 7.07%"
    r = seed_ratios([10.0, 30.0, math.inf, 8.0], [5.0, 10.0, 4.0, 8.0])
    assert r["per_seed"] == [2.0, 3.0, None, 1.0] and r["seeds_with_ratio"] == 3
    assert (r["median"], r["min"], r["max"]) == (2.0, 1.0, 3.0)
    none = seed_ratios([math.inf], [1.0])
    assert none["median"] is None and none["seeds_with_ratio"] == 0


def test_epoch_bar_counts_epochs_and_is_silent_when_off():
    from types import SimpleNamespace

    from lotus.bench import EpochBar

    trainer = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(epochs=3)), epoch=0)
    bar = EpochBar("x s0", enabled=True)
    bar.on_fit_start(trainer)
    bar.bar.fp = io.StringIO()  # keep the test's stderr clean
    bar.on_epoch_end(trainer, 0, {"val_acc": 0.5})
    bar.on_epoch_end(trainer, 1, {})
    assert bar.bar.n == 2 and "val 50.0%" in bar.bar.postfix
    bar.on_fit_end(trainer, {})
    assert bar.bar is None
    off = EpochBar("y", enabled=False)
    off.on_fit_start(trainer)
    off.on_epoch_end(trainer, 0, {"val_acc": 0.5})
    assert off.bar is None


def test_single_seed_table_says_n1_and_variants_take_overrides(tmp_path, tiny_cfg_dict, capsys):
    from lotus.bench import run_bench
    from lotus.bench_report import analyse, bench_table

    base = _tiny(tmp_path, tiny_cfg_dict)
    res = run_bench([base, (base, ["name=base_lr", "optim.lr=0.01"])], seeds=[0], out=str(tmp_path / "b"), quiet=True)
    assert [r.name for r in res] == ["base", "base_lr"]
    assert yaml.safe_load(open(os.path.join(res[1].runs[0], "config.yaml")))["optim"]["lr"] == 0.01
    table = bench_table(analyse(res, inference_repeats=1))
    assert "(n=1)" in table and "+- 0.00" not in table
    assert "base s0" not in capsys.readouterr().err  # no per-run epoch bar when stderr is not a terminal


def test_jobs_run_side_by_side_pinned_and_match_sequential(tmp_path, tiny_cfg_dict):
    from lotus.bench import run_bench
    from lotus.run_report import read_metrics

    base = _tiny(tmp_path, tiny_cfg_dict)
    pinned = max(1, (os.cpu_count() or 1) // 2)
    par = run_bench([base], seeds=2, out=str(tmp_path / "par"), quiet=True, progress=False, jobs=2)
    seq = run_bench(
        [base], seeds=2, out=str(tmp_path / "seq"), overrides=[f"train.threads={pinned}"], quiet=True, progress=False
    )
    for p, s in zip(par[0].runs, seq[0].runs):
        assert yaml.safe_load(open(os.path.join(p, "config.yaml")))["train"]["threads"] == pinned
        assert os.path.isfile(os.path.join(p, "summary.json"))
        accs = [[e["val_acc"] for e in read_metrics(d)[0]] for d in (p, s)]
        assert accs[0] == accs[1]  # same config, seed and threads: the same run, wherever it ran
    again = run_bench([base], seeds=2, out=str(tmp_path / "par"), quiet=True, progress=False, jobs=2)
    assert again[0].runs == par[0].runs  # finished runs are reused


def test_cli_rejects_bad_jobs(tmp_path, tiny_cfg_dict, capsys):
    from lotus.cli import main

    assert (
        main(["bench", "--configs", _tiny(tmp_path, tiny_cfg_dict), "--jobs", "0", "--out", str(tmp_path / "b")]) == 2
    )
    assert "--jobs: expected int >= 1" in capsys.readouterr().err


def test_inference_is_timed_round_robin_on_one_thread(tmp_path, tiny_cfg_dict, monkeypatch):
    import torch

    import lotus.bench as bench

    base = _tiny(tmp_path, tiny_cfg_dict)
    res = bench.run_bench(
        [base, (base, ["name=other", "optim.lr=0.01"])],
        seeds=[0, 1],
        out=str(tmp_path / "b"),
        quiet=True,
        progress=False,
    )
    from lotus import bench_inference

    order, threads = [], []
    load = bench_inference.load_inference

    def traced(run_dir):
        model, x, info = load(run_dir)
        model.register_forward_hook(lambda m, i, o: (order.append(run_dir), threads.append(torch.get_num_threads())))
        return model, x, info

    monkeypatch.setattr(bench_inference, "load_inference", traced)
    before = torch.get_num_threads()
    out = bench_inference.measure_inference(res, repeats=3)
    assert torch.get_num_threads() == before and set(threads) == {1}
    a0, b0, a1, b1 = res[0].runs[0], res[1].runs[0], res[0].runs[1], res[1].runs[1]
    # per seed (the hook sees what follows loading): one warm-up each, then the configs alternate 3 times
    assert order == [a0, b0] * 4 + [a1, b1] * 4
    assert [[sorted(d) for d in row] for row in out] == [[["flops_per_img", "img_per_s", "nonzero", "params"]] * 2] * 2
    assert all(d["img_per_s"] > 0 and d["params"] > 0 for row in out for d in row)
    # kept with the runs: measured again the same way, nothing is loaded or timed
    order.clear()
    assert bench_inference.measure_inference(res, repeats=3) == out and order == []


def test_runs_saved_before_the_schedule_rename_are_reused(tmp_path, tiny_cfg_dict, one_thread):
    """A finished run whose config.yaml still says ``lotus:`` (before it was renamed ``schedule:``) is the same
    config: bench reuses it instead of refusing it; user configs keep the one-line error."""
    from lotus.bench import run_bench
    from lotus.config import config_from_dict
    from lotus.config_upgrade import upgrade_saved
    from lotus.errors import ConfigError

    tiny_cfg_dict["schedule"] = {"enabled": True, "warmup_epochs": 1, "anneal_epochs": 0}
    base = _tiny(tmp_path, tiny_cfg_dict, epochs=2)
    out = str(tmp_path / "b")
    first = run_bench([base], seeds=[0], out=out, quiet=True, progress=False)
    saved = os.path.join(first[0].runs[0], "config.yaml")
    data = yaml.safe_load(open(saved))
    data["lotus"] = data.pop("schedule")
    data["lotus"]["schedule"] = "fixed"
    with open(saved, "w") as f:
        yaml.safe_dump(data, f)
    mtime = os.path.getmtime(os.path.join(first[0].runs[0], "summary.json"))
    again = run_bench([base], seeds=[0], out=out, quiet=True, progress=False)
    assert again[0].runs == first[0].runs
    assert os.path.getmtime(os.path.join(first[0].runs[0], "summary.json")) == mtime  # reused, not retrained
    assert upgrade_saved(data)["schedule"]["mode"] == "fixed" and "lotus" not in upgrade_saved(data)
    with pytest.raises(ConfigError, match="^lotus: this section is now called schedule:"):
        config_from_dict(data)
