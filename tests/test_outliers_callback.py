"""The outlier monitor in a tiny training run, its config section, the report, and the two CLI commands."""

from __future__ import annotations

import json

import pytest
import yaml

from lotus.cli import main
from lotus.config import config_from_dict
from lotus.errors import ConfigError
from lotus.features.outliers.callback import OutlierMonitor
from lotus.features.outliers.layer_report import layer_table, read_outlier_records
from lotus.features.registry import build_callbacks
from lotus.features.schedule.phases import Schedule

TINY_OP = {
    "model": {"name": "lotus_vit_micro", "img_size": 16, "patch_size": 4, "block": "op"},
    "data": {"name": "digits", "batch_size": 32, "eval_batch_size": 512, "limit_train": 128},
    "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
    "train": {"epochs": 1, "warmup_epochs": 0.2, "seed": 0, "threads": 1},  # pinned: bit-identical comparisons
    "outliers": {
        "enabled": True,
        "every_n_steps": 3,
        "probe_batch_size": 16,
        "quant_check": True,
        "quant": {"calib_batches": 1},
    },
}


def callbacks(cfg):
    return build_callbacks(cfg, Schedule(cfg))


def test_config_section_defaults_and_errors():
    cfg = config_from_dict({})
    assert cfg.outliers.enabled is False and callbacks(cfg) == []
    on = config_from_dict({"outliers": {"enabled": True, "layers": ["blocks.0", "final"]}})
    (cb,) = callbacks(on)
    assert isinstance(cb, OutlierMonitor) and cb.cfg.every_n_steps == 50
    with pytest.raises(ConfigError, match=r"outliers.layers\[1\]: expected 'blocks.<i>' or 'final'"):
        config_from_dict({"outliers": {"layers": ["final", "norm"]}})
    with pytest.raises(ConfigError, match="outliers.every_n_steps: expected int >= 1"):
        config_from_dict({"outliers": {"every_n_steps": 0}})
    with pytest.raises(ConfigError, match="outliers.quant.act_observer"):
        config_from_dict({"outliers": {"quant": {"act_observer": "minmax"}}})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from lotus.training import Trainer

    run_dir = tmp_path_factory.mktemp("run") / "op"
    cfg = config_from_dict(TINY_OP)
    summary = Trainer(cfg, run_dir=str(run_dir), quiet=True).fit()
    cfg_path = run_dir.parent / "op.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY_OP))
    return run_dir, cfg_path, summary


def test_callback_logs_per_layer_metrics_during_training(trained_run):
    run_dir, _, summary = trained_run
    records = read_outlier_records(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == [0, 3, 4]  # at start, every 3 steps, and the final step (4 steps)
    for r in records:
        assert set(r["layers"]) == {"blocks.0", "blocks.1", "final"}
        assert all(1.0 <= v["kurtosis"] <= 64 and v["mmr"] >= 1.0 for v in r["layers"].values())
        assert r["kurtosis_max"] == max(v["kurtosis"] for v in r["layers"].values())
    epochs = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"type": "epoch"' in line]
    assert all("kurtosis_max" in e for e in epochs)
    o = summary["outliers"]
    assert o["step"] == 4 and o["measurements"] == 3 and 0 < o["probe_fraction"] < 1
    assert 0.0 <= summary["quant"]["int8_acc"] <= 1.0 and summary["quant"]["layers"] == 8
    assert (run_dir / "outliers.md").read_text().count("| blocks.") == 2
    assert (run_dir / "outliers_history.png").read_bytes()[:4] == b"\x89PNG"


def test_probe_does_not_change_training(trained_run, tmp_path):
    """Eval-mode, no-grad probing leaves the trajectory bit-identical to a run without the monitor."""
    from lotus.training import Trainer

    _, _, summary = trained_run
    plain = {**TINY_OP, "outliers": {"enabled": False}}
    s2 = Trainer(config_from_dict(plain), run_dir=str(tmp_path / "plain"), quiet=True).fit()
    assert s2["final_val_loss"] == summary["final_val_loss"]


def test_outliers_command_writes_table_and_plots(trained_run, tmp_path, capsys):
    run_dir, cfg_path, _ = trained_run
    out = tmp_path / "rep"
    rc = main(
        [
            "outliers",
            "--config",
            str(cfg_path),
            "--checkpoint",
            str(run_dir / "last.safetensors"),
            "--out",
            str(out),
            "--samples",
            "40",
            "--batch-size",
            "16",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "| blocks.0 |" in text and "kurtosis_max=" in text
    data = json.loads((out / "outliers_last.json").read_text())
    assert data["samples"] == 40 and set(data["layers"]) == {"blocks.0", "blocks.1", "final"}
    assert (out / "outliers_last.png").exists() and (out / "outliers_history.png").exists()
    assert "| final |" in layer_table(data["layers"])


def test_quantcheck_command_prints_float_int8_and_drop(trained_run, tmp_path, capsys):
    run_dir, cfg_path, _ = trained_run
    rc = main(
        [
            "quantcheck",
            "--config",
            str(cfg_path),
            "--checkpoint",
            str(run_dir / "last.safetensors"),
            "--calib-batches",
            "1",
            "--json",
            str(tmp_path / "q.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "float accuracy:" in out and "int8 W8A8 accuracy:" in out and "drop:" in out
    res = json.loads((tmp_path / "q.json").read_text())
    assert res["drop_pp"] == pytest.approx(100 * (res["float_acc"] - res["int8_acc"]))


def test_commands_reject_bad_inputs_with_one_line_errors(trained_run, tmp_path, capsys):
    run_dir, cfg_path, _ = trained_run
    ckpt = str(run_dir / "last.safetensors")
    cases = [
        (
            ["quantcheck", "--config", str(cfg_path), "--checkpoint", str(tmp_path / "missing.safetensors")],
            "--checkpoint: file not found",
        ),
        (
            ["outliers", "--config", str(cfg_path), "--checkpoint", ckpt, "--layers", "blocks.5"],
            "--layers: unknown site 'blocks.5'",
        ),
        (["outliers", "--config", str(cfg_path), "--checkpoint", ckpt, "--samples", "0"], "--samples"),
        (["quantcheck", "--config", str(cfg_path), "--checkpoint", ckpt, "--bits", "9"], "--bits"),
        (["quantcheck", "--config", str(tmp_path / "nope.yaml"), "--checkpoint", ckpt], "config file not found"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err


def test_resume_continues_the_outlier_history(trained_run, tmp_path):
    import shutil

    from lotus.training import Trainer

    run_dir, _, _ = trained_run
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    cfg = config_from_dict({**TINY_OP, "train": {**TINY_OP["train"], "epochs": 2}})
    summary = Trainer(cfg, run_dir=str(copy), resume=True, quiet=True).fit()
    steps = [r["step"] for r in read_outlier_records(copy / "metrics.jsonl")]
    assert steps == [0, 3, 4, 6, 8]  # no second step-0 probe; every 3 steps continues; final step 8
    assert summary["outliers"]["measurements"] == 5 and summary["outliers"]["step"] == 8
