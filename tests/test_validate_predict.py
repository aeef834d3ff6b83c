"""`lotus validate` / `lotus predict` on a run folder and its export give the run's own evaluation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from lotus.cli import main
from lotus.config import config_from_dict
from lotus.training import Trainer
from lotus.weights_meta import read_metadata


def _digits_folder(root, per_class_train=30, per_class_val=10):
    """An ImageFolder of the digits (8x8 grey PNGs): root/train/<digit>/, root/val/<digit>/."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0 * 255).round().astype(np.uint8)
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        for split, part in (
            ("train", idx[:per_class_train]),
            ("val", idx[per_class_train : per_class_train + per_class_val]),
        ):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i], mode="L").save(root / split / str(c) / f"{i}.png")


def _train(tmp, data):
    from conftest import TINY

    d = json.loads(json.dumps(TINY))
    d["data"].update(data)
    d["train"].update(epochs=1, max_steps=8)
    run = tmp / "run"
    Trainer(config_from_dict(d), run_dir=str(run), quiet=True).fit()
    return run


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vp")
    _digits_folder(tmp / "imgs")
    run = _train(tmp, {"name": "imagefolder", "root": str(tmp / "imgs")})
    assert main(["export", str(run), "--out", str(tmp / "export")]) == 0
    return tmp, run, tmp / "export"


def _validate(argv, tmp, capsys, name="v.json"):
    out = tmp / name
    assert main(["validate", *argv, "--out", str(out)]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def test_validate_reproduces_the_in_run_evaluation_on_the_run_and_its_export(folder_run, capsys):
    tmp, run, export = folder_run
    recorded = read_metadata(run / "best.safetensors")
    epoch = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"val_acc"' in line and json.loads(line).get("val_acc") == recorded["val_acc"]
    ]
    assert epoch, "the best checkpoint's epoch is in metrics.jsonl"
    on_run = _validate([str(run)], tmp, capsys)  # the run's config.yaml: its validation split
    assert on_run["count"] == 100 and on_run["top1"] == recorded["val_acc"]
    assert on_run["loss"] == pytest.approx(epoch[0]["val_loss"], rel=1e-5)
    assert 0 <= on_run["top1"] <= on_run["top5"] <= 1 and on_run["top5"] == pytest.approx(epoch[0]["val_acc5"])
    assert np.mean([on_run["per_class"][str(c)] for c in range(10)]) == pytest.approx(on_run["top1"])  # 10 per class
    # the export, on the same images as a plain ImageFolder (the recorded mean/std and resize)
    on_export = _validate([str(export), "--data", str(tmp / "imgs" / "val")], tmp, capsys, "e.json")
    assert (on_export["count"], on_export["top1"], on_export["top5"]) == (100, on_run["top1"], on_run["top5"])
    assert on_export["loss"] == pytest.approx(on_run["loss"], rel=1e-5)
    assert on_export["per_class"] == on_run["per_class"]


def test_predict_matches_validate_csv_and_json(folder_run, capsys):
    tmp, run, export = folder_run
    val = _validate([str(export), "--data", str(tmp / "imgs" / "val")], tmp, capsys)
    out = tmp / "p.csv"
    assert main(["predict", str(export), str(tmp / "imgs" / "val"), "--top-k", "3", "--out", str(out)]) == 0
    assert "top-3 labels of 100 images" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 100 and list(rows[0]) == [
        "file",
        "label_1",
        "score_1",
        "label_2",
        "score_2",
        "label_3",
        "score_3",
    ]
    hits = [r["label_1"] == r["file"].split("/")[-2] for r in rows]
    assert np.mean(hits) == pytest.approx(val["top1"])
    assert all(1.0 + 1e-5 >= float(r["score_1"]) >= float(r["score_2"]) >= float(r["score_3"]) for r in rows)
    # the run folder gives the same predictions; JSON on request, stdout by default
    files = sorted(str(p) for p in (tmp / "imgs" / "val" / "3").glob("*.png"))[:2]
    assert main(["predict", str(run), *files, "--format", "json", "--top-k", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = {r["file"]: r["label_1"] for r in rows}
    assert [g["top"][0]["label"] for g in got] == [want[f] for f in files] and len(got[0]["top"]) == 1


def test_validate_on_an_in_memory_run_matches_its_metrics(tmp_path, capsys):
    run = _train(tmp_path, {})  # digits, held in memory, resized by the tensor path
    res = _validate([str(run), "--which", "last"], tmp_path, capsys)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val_acc"' in line][-1]
    assert res["top1"] == last["val_acc"] and res["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert res["count"] == 360


def test_errors_are_one_line(folder_run, tmp_path, capsys):
    tmp, run, export = folder_run

    def err(argv):
        assert main(argv) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("error: ") and "\n" not in e
        return e

    assert "pass --config CONFIG.yaml" in err(["validate", str(export)])
    bad = tmp_path / "bad" / "cat"
    bad.mkdir(parents=True)
    Image.new("L", (8, 8)).save(bad / "x.png")
    assert "class folder 'cat'" in err(["validate", str(export), "--data", str(tmp_path / "bad")])
    assert "no such file or folder" in err(["predict", str(export), str(tmp_path / "nope.png")])
    (tmp_path / "junk.png").write_text("not an image")
    assert "junk.png: not a readable image" in err(["predict", str(export), str(tmp_path / "junk.png")])
    assert "--top-k: expected an int >= 1" in err(["predict", str(export), str(bad / "x.png"), "--top-k", "0"])
    assert "no such run folder, export folder" in err(["validate", str(tmp_path / "none")])
    assert "--which: only for a run folder" in err(["validate", str(export), "--which", "last"])
