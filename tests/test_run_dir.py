"""The run directory: one process at a time, clean resumes, half-made runs, config changes on resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lotus.callbacks import Callback
from lotus.cli import main
from lotus.config import config_from_dict
from lotus.errors import LotusError
from lotus.training import Trainer
from lotus.training.run_dir import RunDir


def _lotus(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lotus", *args], capture_output=True, text=True, timeout=300, **kw)


def _epochs(run: str) -> list[int]:
    recs = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    return [r["epoch"] for r in recs if r["type"] == "epoch"]


def _events(run: str) -> list[tuple]:
    recs = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    return [(r["event"], r["epoch"], r["step"]) for r in recs if r["type"] == "event"]


@pytest.fixture
def small(tiny_cfg_dict, tmp_path):
    d = tiny_cfg_dict
    d["data"]["limit_train"] = 128
    d["train"].update(epochs=3, threads=1)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(d))
    return d, str(path)


def test_a_second_process_on_the_same_out_is_refused_naming_the_holder(small, tmp_path):
    d, cfg_path = small
    run = tmp_path / "r"
    holder = RunDir(str(run))
    holder.lock()
    try:
        r = _lotus("train", "--config", cfg_path, "--out", str(run), "--quiet")
    finally:
        holder.unlock()
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: output.dir:") and f"pid {os.getpid()}" in lines[0]
    assert not (run / "metrics.jsonl").exists()  # it wrote nothing


def test_two_real_processes_one_wins_and_its_log_is_whole(small, tmp_path):
    d, _ = small
    d["train"]["epochs"] = 8
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(d))
    run = tmp_path / "r"
    first = subprocess.Popen(
        [sys.executable, "-m", "lotus", "train", "--config", str(path), "--out", str(run), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # paused mid-run, still holding the lock
    try:
        second = _lotus("train", "--config", str(path), "--out", str(run), "--quiet")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr
    assert _epochs(str(run)) == list(range(1, 9))


def test_resume_cuts_redone_work_from_the_log_and_removes_stale_temps(small, tmp_path):
    d, _ = small
    run = str(tmp_path / "r")
    Trainer(config_from_dict(d), run_dir=run, quiet=True).fit()
    reference_events = _events(run)
    # Simulate a run killed after writing epoch 2's records but before its checkpoint: keep the epoch-1
    # checkpoint state and log, then append what the killed process had written.
    d2 = {**d, "train": {**d["train"], "epochs": 1}}
    cut = str(tmp_path / "cut")
    Trainer(config_from_dict(d2), run_dir=cut, quiet=True).fit()
    with open(os.path.join(cut, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"type": "epoch", "epoch": 2, "step": 8, "train_loss": 1.0}) + "\n")
        f.write(json.dumps({"type": "event", "event": "orphan", "epoch": 2, "step": 8}) + "\n")
    for name in (".tmp-state.pt-abc123", ".tmp-last.safetensors-def456"):
        (tmp_path / "cut" / name).write_bytes(b"partial")
    Trainer(config_from_dict(d), run_dir=cut, quiet=True, resume=True).fit()
    assert _epochs(cut) == [1, 2, 3]
    events = [e for e in _events(cut) if e[0] != "run_dir"]
    assert ("orphan", 2, 8) not in events and events == reference_events
    assert not [n for n in os.listdir(cut) if n.startswith(".tmp-")]
    summary = json.load(open(os.path.join(cut, "summary.json")))
    assert summary["epochs"] == 3 and len([e for e in summary["events"] if e["event"] == "orphan"]) == 0


class _FailAtEpochEnd(Callback):
    def on_epoch_end(self, trainer, epoch, metrics):
        raise LotusError("tickets.file: simulated failure before the first checkpoint")


def test_half_made_run_gets_a_clear_way_forward(small, tmp_path, capsys):
    d, cfg_path = small
    run = str(tmp_path / "r")
    with pytest.raises(LotusError, match="simulated"):
        Trainer(config_from_dict(d), run_dir=run, quiet=True, callbacks=[_FailAtEpochEnd()]).fit()
    assert os.path.exists(os.path.join(run, "config.yaml")) and not os.path.exists(os.path.join(run, "state.pt"))
    assert main(["train", "--config", cfg_path, "--out", run, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped before its first checkpoint" in err[0] and f"--resume {run}" in err[0]
    assert main(["train", "--resume", run, "--quiet"]) == 0  # restarts from its config.yaml
    assert _epochs(run) == [1, 2, 3]
    first = torch.load(os.path.join(run, "state.pt"), weights_only=True)["model"]
    assert main(["train", "--config", cfg_path, "--out", run, "--quiet"]) == 2  # a finished run: no overwrite
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--config", cfg_path, "--out", run, "--quiet", "--force"]) == 0
    again = torch.load(os.path.join(run, "state.pt"), weights_only=True)["model"]
    assert all(torch.equal(first[k], again[k]) for k in first) and _epochs(run) == [1, 2, 3]


def test_resume_overrides_reach_config_yaml_only_after_a_checkpoint(small, tmp_path, capsys):
    d, cfg_path = small
    run = str(tmp_path / "r")
    d2 = {**d, "train": {**d["train"], "epochs": 1}}
    Trainer(config_from_dict(d2), run_dir=run, quiet=True).fit()
    before = open(os.path.join(run, "config.yaml")).read()
    # fails after the trainer started (missing ticket file): config.yaml must not change
    assert (
        main(
            [
                "train",
                "--resume",
                run,
                "--quiet",
                "--set",
                "train.epochs=3",
                "--set",
                f"tickets.file={tmp_path / 'missing.npz'}",
            ]
        )
        == 2
    )
    assert "tickets.file" in capsys.readouterr().err
    assert open(os.path.join(run, "config.yaml")).read() == before
    assert not os.path.exists(os.path.join(run, "config_history.jsonl"))
    assert main(["train", "--resume", run, "--quiet", "--set", "train.epochs=2"]) == 0
    saved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert saved["train"]["epochs"] == 2
    history = [json.loads(x) for x in open(os.path.join(run, "config_history.jsonl"))]
    assert history == [{**history[0], "resumed_at_step": 4, "overrides": ["train.epochs=2"]}]
