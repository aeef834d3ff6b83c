"""The LOTUS schedule under torchrun vs dense data-parallel training: samples forwarded, wall time, accuracy.

Runs ``configs/digits_lotus.yaml`` (dynamic data pruning + structured thinning of the MLPs at epoch 5, OP
block, 20 epochs) and its dense baseline ``configs/digits_op.yaml`` (same model, data and optimiser, full
data, no thinning) with ``torchrun --nproc_per_node N -m lotus train`` (DDP by default), alternating dense
and LOTUS runs seed by seed in one invocation so machine load hits both alike. Every rank uses a fixed
thread count (``train.threads``, default 1, and ``OMP_NUM_THREADS``). Reports per seed the samples forwarded
(all ranks together), the training wall time, the final validation accuracy and parameter count, and the
per-seed LOTUS/dense ratios (median and range).

CPU (gloo, 2 ranks; README numbers)::

    python benchmarks/lotus_distributed.py            # = --nproc 2 --seeds 0 1 2 --mode ddp --device cpu

GPU (nccl, one rank per GPU, at most --nproc; benchmarks/gpu_check.sh)::

    python benchmarks/lotus_distributed.py --device cuda --out $OUT --seeds 0 1

Smoke run: ``--quick`` (lotus_vit_micro, 6 epochs, thinning at 2, one seed; numbers are not meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import add_harness_args, md_table, out_path, write_results  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: str, sets: list[str], seed: int, nproc: int, threads: int, workdir: str) -> dict:
    """One ``torchrun`` training; the run's summary numbers."""
    out = os.path.join(workdir, f"{Path(config).stem}-s{seed}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(_free_port()),
        "-m",
        "lotus",
        "train",
        "--config",
        str(ROOT / config),
        "--out",
        out,
        "--quiet",
        "--set",
        f"train.seed={seed}",
        "--set",
        f"train.threads={threads}",
        "--set",
        "output.report=false",
    ]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{config} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    s = json.loads(Path(out, "summary.json").read_text())
    dyn = s.get("dynamic_pruning") or {}
    return {
        "config": config,
        "seed": seed,
        "world_size": s["world_size"],
        "device": s["device"],
        "samples_seen": s["samples_seen"],
        "train_wall_s": s["wall_s"],
        "total_s": round(total, 3),
        "final_val_acc": s["final_val_acc"],
        "params": s["params"],
        "epochs": s["epochs"],
        "saved_fraction": dyn.get("saved_fraction"),
        "widths": (s.get("pruning") or {}).get("widths"),
    }


def _ratio_stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_seed": values}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", default="configs/digits_op.yaml")
    p.add_argument("--lotus", default="configs/digits_lotus.yaml")
    p.add_argument("--nproc", type=int, default=2, help="ranks (on CUDA: at most the number of GPUs)")
    p.add_argument("--mode", default="ddp", choices=["ddp", "fsdp"], help="parallel.mode of both variants")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--set", action="append", default=[], help="extra config override for every run")
    add_harness_args(
        p,
        "lotus_distributed",
        seeds=[0, 1, 2],
        quick="smoke run: lotus_vit_micro, 6 epochs, 512 images, thinning at 2, one seed",
    )
    p.add_argument("--out-dir", dest="out", help=argparse.SUPPRESS)  # the older spelling of --out DIR
    a = p.parse_args()
    if a.device == "cuda":
        a._bench_name += "_cuda"
    nproc = a.nproc
    if a.device == "cuda":
        import torch

        nproc = max(1, min(nproc, torch.cuda.device_count()))
    sets = [f"parallel.mode={a.mode}", f"train.device={a.device}", *a.set]
    seeds = a.seeds
    if a.quick:
        seeds = seeds[:1]
        sets += ["model.name=lotus_vit_micro", "train.epochs=6", "data.limit_train=512"]
    lotus_sets = sets + (["pruning.structured.at_epoch=2", "schedule.anneal_epochs=1"] if a.quick else [])
    rows, runs = [], []
    with tempfile.TemporaryDirectory() as work:
        for seed in seeds:  # interleaved: dense, then LOTUS, seed by seed
            dense = run(a.dense, sets, seed, nproc, a.threads, work)
            lotus = run(a.lotus, lotus_sets, seed, nproc, a.threads, work)
            runs += [dense, lotus]
            rows.append((seed, dense, lotus))
            print(
                f"seed {seed}: dense {dense['samples_seen']} samples {dense['train_wall_s']:.1f} s acc "
                f"{dense['final_val_acc']:.4f} | LOTUS {lotus['samples_seen']} samples {lotus['train_wall_s']:.1f} s "
                f"acc {lotus['final_val_acc']:.4f}",
                flush=True,
            )
    samples = [lo["samples_seen"] / d["samples_seen"] for _, d, lo in rows]
    wall = [lo["train_wall_s"] / d["train_wall_s"] for _, d, lo in rows]
    acc = [lo["final_val_acc"] - d["final_val_acc"] for _, d, lo in rows]
    world = rows[0][1]["world_size"]
    payload = {
        "nproc": nproc,
        "world_size": world,
        "mode": a.mode,
        "device": a.device,
        "threads_per_rank": a.threads,
        "dense": a.dense,
        "lotus": a.lotus,
        "sets": sets,
        "runs": runs,
        "ratios": {
            "samples_forwarded": _ratio_stats(samples),
            "train_wall": _ratio_stats(wall),
            "val_acc_delta": _ratio_stats(acc),
        },
    }
    table_rows = [
        (
            seed,
            d["samples_seen"],
            lo["samples_seen"],
            round(lo["samples_seen"] / d["samples_seen"], 4),
            round(d["train_wall_s"], 2),
            round(lo["train_wall_s"], 2),
            round(lo["train_wall_s"] / d["train_wall_s"], 4),
            round(d["final_val_acc"], 4),
            round(lo["final_val_acc"], 4),
            d["params"],
            lo["params"],
        )
        for seed, d, lo in rows
    ]
    med = payload["ratios"]
    cmd = " ".join(["python benchmarks/lotus_distributed.py", *sys.argv[1:]])
    table = "\n".join(
        [
            f"# LOTUS vs dense under torchrun ({world} rank(s), {a.mode}, {a.device}, {a.threads} thread(s) per rank)",
            "",
            f"`{cmd}`: `{a.dense}` (dense) vs `{a.lotus}` (LOTUS), interleaved seed by seed.",
            "",
            md_table(
                [
                    "seed",
                    "dense samples",
                    "LOTUS samples",
                    "samples ratio",
                    "dense wall s",
                    "LOTUS wall s",
                    "wall ratio",
                    "dense acc",
                    "LOTUS acc",
                    "dense params",
                    "LOTUS params",
                ],
                table_rows,
            ),
            "",
            f"Per-seed LOTUS/dense: samples forwarded {med['samples_forwarded']['median']:.3f}x "
            f"({med['samples_forwarded']['min']:.3f}-{med['samples_forwarded']['max']:.3f}), training wall time "
            f"{med['train_wall']['median']:.3f}x ({med['train_wall']['min']:.3f}-{med['train_wall']['max']:.3f}), "
            f"val accuracy {med['val_acc_delta']['median']:+.4f} ({med['val_acc_delta']['min']:+.4f} to "
            f"{med['val_acc_delta']['max']:+.4f}).",
            *(
                [
                    "",
                    "One GPU visible: a world of one rank (no collectives); the ratios are LOTUS vs dense on "
                    "one device.",
                ]
                if a.device == "cuda" and world == 1
                else []
            ),
        ]
    )
    write_results(out_path(a), payload, table, quick=a.quick)


if __name__ == "__main__":
    main()
