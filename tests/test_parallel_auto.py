"""``schedule.mode: auto`` under torchrun (2 processes, gloo, CPU, DDP): the probes' signals are averaged over
ranks, every rank takes the same decisions (the all-gathered digests of the ranks' decision lists, logged in each
epoch record, are equal), and the features follow them on both ranks.

A tiny auto config that drives every kind of decision in 4 epochs: lotus_vit_micro at 16 px (16 patches),
256 digits, 16 samples per rank, random patch tickets (timed steps and random-patch probe losses), dynamic
pruning (the ratio from the losses summed over ranks) and structured thinning (a thinned copy calibrated on
sharded batches), with loose thresholds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CFG = {
    "model": {"name": "lotus_vit_micro", "img_size": 16, "patch_size": 4},
    "data": {"name": "digits", "limit_train": 256, "batch_size": 16, "eval_batch_size": 128},
    "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
    "train": {"epochs": 4, "warmup_epochs": 0.2, "seed": 0, "threads": 1},
    "tickets": {
        "dynamic": {"enabled": True, "ratio": 0.7},
        "patches": {"enabled": True, "keep_rate": 0.5, "scorer": "random"},
    },
    "pruning": {"structured": {"mlp": 0.5, "importance": "taylor"}},
    "schedule": {
        "mode": "auto",
        "auto": {
            "thin_tolerance": 10.0,
            "anneal_share": 0.25,
            "learned_loss": 1.0,
            "keep_stall": 1.0,
            "patches_must_pay": True,
        },
    },
    "parallel": {"mode": "ddp"},
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("auto_dist")
    cfg = tmp / "auto.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    out = tmp / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "lotus",
        "train",
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def test_both_ranks_take_the_same_decisions(run):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    decisions = summary["auto_schedule"]["decisions"]
    kinds = [d["what"] for d in decisions]
    assert {"reduce", "dynamic_ratio", "keep_rate", "thin", "anneal"} <= set(kinds), kinds
    epochs = [r for r in _records(run) if r.get("type") == "epoch"]
    checked = [r["auto_rank_digests"] for r in epochs if "auto_rank_digests" in r]
    assert len(checked) == 3  # every epoch end that decides (not the last)
    for digests in checked:
        assert len(digests) == 2 and digests[0] == digests[1], digests
    assert len(set(d[0] for d in checked)) == len(checked)  # the list grew every round, and each was compared
    from lotus.features.schedule.auto_rules import decisions_digest

    assert checked[-1][0] == decisions_digest(decisions)  # the last check covered every decision


def test_features_follow_the_decisions_on_both_ranks(run):
    records = _records(run)
    decisions = [r for r in records if r.get("event") == "auto_decision"]
    start = decisions[0]
    assert (start["what"], start["from_epoch"], start["signal"]) == ("keep_rate", 0, "random_patches_at_start")
    assert "saves" in start["reason"]  # the timed steps (averaged over ranks) paid
    thin = next(d for d in decisions if d["what"] == "thin")
    pruned = [r for r in records if r.get("event") == "prune_structured"]
    assert len(pruned) == 1 and pruned[0]["epoch"] == thin["from_epoch"]
    digests = pruned[0]["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks thinned the same neurons
    epochs = [r for r in records if r.get("type") == "epoch"]
    for r in epochs:
        assert r["dyn_rank_digests"][0] == r["dyn_rank_digests"][1]  # the same kept set from the decided ratio
