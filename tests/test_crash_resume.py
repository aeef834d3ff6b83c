"""SIGKILL at random points (several while a checkpoint is being written), then resume: the run ends with
exactly the weights of an uninterrupted one, no temp file left and no record written twice."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import yaml
from safetensors.torch import load_file

KILLS = 12


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lotus", "train", *args, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _records(run: str) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]


def _events(records: list[dict]) -> list[tuple]:
    return [(r["event"], r["epoch"], r["step"]) for r in records if r["type"] == "event" and r["event"] != "run_dir"]


def _wait_for_temp_file(run: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll until a checkpoint write is in flight (a ``.lotus-tmp-*`` temp exists) or the process ends."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(run) and any(n.startswith(".lotus-tmp-") for n in os.listdir(run)):
            return True
        time.sleep(0.0005)
    return False


def _wait_for_progress(run: str, proc: subprocess.Popen, size0: int, timeout: float) -> None:
    deadline = time.time() + timeout
    path = os.path.join(run, "metrics.jsonl")
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and os.path.getsize(path) > size0:
            return
        time.sleep(0.005)


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, tiny_cfg_dict):
    d = tiny_cfg_dict
    d["data"]["limit_train"] = 256  # 8 steps an epoch
    d["train"].update(epochs=30, threads=1)
    d["tickets"] = {"dynamic": {"enabled": True, "ratio": 0.5}}
    d["pruning"] = {"structured": {"mlp": 0.5, "at_epoch": 3}}  # kills before and after thinning
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    ref = str(tmp_path / "ref")
    p = _start(["--config", str(cfg), "--out", ref])
    assert p.wait(timeout=300) == 0, p.stderr.read()

    run = str(tmp_path / "run")
    rng = random.Random(1234)
    kills = during_write = launches = 0
    while True:
        if os.path.exists(os.path.join(run, "summary.json")):
            break  # the last killed process had already finished (killed on its way out)
        launches += 1
        assert launches < 40, "no progress"
        resume = os.path.exists(os.path.join(run, "config.yaml"))
        p = _start(["--resume", run] if resume else ["--config", str(cfg), "--out", run])
        if kills >= KILLS:
            assert p.wait(timeout=300) == 0, p.stderr.read()
            break
        if kills % 3 == 0:  # while a checkpoint is being written
            hit = _wait_for_temp_file(run, p, timeout=60)
        else:  # anywhere after some progress (or during start-up)
            log = os.path.join(run, "metrics.jsonl")
            _wait_for_progress(run, p, os.path.getsize(log) if os.path.exists(log) else 0, timeout=60)
            time.sleep(rng.uniform(0.0, 0.4))
            hit = False
        p.kill()
        p.wait()
        if p.returncode == -9:
            kills += 1
            during_write += hit
        else:
            assert p.returncode == 0, p.stderr.read()
            break  # finished before the kill landed
    assert kills >= 10 and during_write >= 3, (kills, during_write)

    a, b = load_file(os.path.join(ref, "last.safetensors")), load_file(os.path.join(run, "last.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not [n for n in os.listdir(run) if n.startswith((".tmp", ".lotus-tmp-"))]
    ref_recs, recs = _records(ref), _records(run)
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == list(range(1, 31))
    assert _events(recs) == _events(ref_recs)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert [(e["event"], e["epoch"], e["step"]) for e in summary["events"] if e["event"] != "run_dir"] == _events(
        ref_recs
    )
    assert summary["steps"] == json.load(open(os.path.join(ref, "summary.json")))["steps"]
