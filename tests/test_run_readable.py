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
        "source_size": [8, 8],
        "img_size": 16,
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


def test_event_marks_that_would_touch_are_stacked():
    from lotus.run_report import mark_rows

    # 3 events within 1 s of each other, one far away: the close ones get rows 0, 1, 2, the far one row 0
    assert mark_rows([10.0, 10.5, 11.0, 50.0], min_gap=2.0) == [0, 1, 2, 0]
    assert mark_rows([5.0, 1.0, 1.5], min_gap=1.0) == [0, 0, 1]  # order-free: by x, not by input order
    assert mark_rows([], min_gap=1.0) == []


def test_curves_png_is_written_with_numbered_marks(tmp_path):
    import json

    from lotus.run_report import write_report

    recs = [
        {
            "type": "epoch",
            "epoch": e,
            "step": e * 10,
            "wall_s": float(e),
            "train_loss": 2.0 / e,
            "val_loss": 1.0 / e,
            "val_acc": 0.1 * e,
            "samples_seen": e * 100,
        }
        for e in range(1, 6)
    ]
    recs += [
        {"type": "event", "event": name, "epoch": ep, "step": ep * 10, "wall_s": float(ep) + 0.01 * i}
        for i, (name, ep) in enumerate([("threads_tuned", 0), ("phase_a", 2), ("phase_b", 2), ("thin", 3)])
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    write_report(str(tmp_path))
    assert (tmp_path / "curves.png").stat().st_size > 1000
