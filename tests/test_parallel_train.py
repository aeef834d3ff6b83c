"""End to end: ``torchrun --nproc_per_node 2 -m lotus train`` on CPU/gloo with FSDP2 + activation
checkpointing, then resuming the 2-rank run in one process (another world size). DDP/FSDP numerics are
covered in test_parallel_dist.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

CFG = {
    "model": {"name": "lotus_vit_micro", "img_size": 16, "patch_size": 4},
    "data": {"name": "digits", "batch_size": 16, "eval_batch_size": 64, "limit_train": 128},
    "optim": {"name": "adamw", "lr": 3e-3},
    "train": {"epochs": 1, "warmup_epochs": 0.5, "seed": 0},
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_fsdp_train_then_resume_in_one_process(tmp_path):
    mode, extra = "fsdp", ["--set", "parallel.activation_checkpoint=full"]
    from lotus.cli import main
    from lotus.weights import load_weights

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(CFG))
    run_dir = tmp_path / f"run_{mode}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
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
        str(cfg_path),
        "--set",
        f"parallel.mode={mode}",
        *extra,
        "--out",
        str(run_dir),
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 1
    assert summary["steps"] == 4  # 128 samples / (2 ranks x 16)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("type") == "epoch" for r in records) == 1  # rank 0 writes, once
    # The weights are the full model (gathered from FSDP shards), loadable into a plain timm model.
    import timm

    from lotus.models import vit  # noqa: F401  (registers lotus_vit_micro)

    plain = timm.create_model("lotus_vit_micro", num_classes=10, in_chans=1, img_size=16, patch_size=4)
    load_weights(plain, str(run_dir / "last.safetensors"))
    # Resume the 2-rank run in this process (world size 1) for one more epoch.
    rc = main(
        [
            "train",
            "--resume",
            str(run_dir),
            "--set",
            "train.epochs=2",
            "--set",
            "parallel.mode=none",
            "--set",
            "parallel.activation_checkpoint=none",
            "--quiet",
        ]
    )
    assert rc == 0
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["epochs"] == 2 and resumed["world_size"] == 1
    assert resumed["steps"] == 4 + 8  # the second epoch at world size 1: 128 / 16
