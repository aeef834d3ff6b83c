"""Runs a person can read: events with epochs counted from 1, the data named in summary and report, the result
line also under --quiet."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

from lotus.config import config_from_dict
from lotus.run_report import event_line, summary_text
from lotus.training import Trainer


def test_event_lines_count_epochs_from_one():
    rec = {"type": "event", "event": "phase_anneal", "epoch": 17, "step": 5, "wall_s": 1.0, "epoch_start": 17}
    assert event_line(rec) == "[phase_anneal] epoch 18: epoch_start=18"
    rec = {
        "type": "event",
        "event": "auto_decision",
        "epoch": 3,
        "step": 9,
        "wall_s": 2.0,
        "what": "thin",
        "from_epoch": 4,
        "value": {"mlp": 0.5},
    }
    assert event_line(rec) == "[auto_decision] epoch 4: what=thin, from_epoch=5"


def test_summary_and_report_name_the_data(tmp_path, tiny_cfg_dict):
    d = copy.deepcopy(tiny_cfg_dict)
    d["train"]["epochs"] = 1
    d["data"]["limit_train"] = 100
    summary = Trainer(config_from_dict(d), run_dir=str(tmp_path / "r"), quiet=True).fit()
    assert summary["data"] == {
        "name": "digits",
        "train_size": 100,
        "val_size": 360,
        "test_size": None,
        "classes": [str(i) for i in range(10)],
    }
    text = summary_text(str(tmp_path / "r"))
    assert "data: digits (100 train, 360 val images; 10 classes: 0, 1, 2" in text
    assert "data: digits" in (tmp_path / "r" / "report.md").read_text()


def test_quiet_hides_progress_not_the_result(tmp_path, tiny_yaml):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lotus",
            "train",
            "--config",
            str(tiny_yaml),
            "--set",
            "train.epochs=1",
            "--out",
            str(tmp_path / "q"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and json.loads(lines[0])["final_val_acc"] is not None  # no epoch lines, one result
