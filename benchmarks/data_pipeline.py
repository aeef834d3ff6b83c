"""ImageFolder input pipeline throughput: img/s of one training epoch (decode + resize + normalise, batched),
decode every epoch in the main process (before) vs ``data.cache: memory`` vs ``data.num_workers`` workers, for
the default tensor path and for timm's RandAugment transform (``data.transform``).

A synthetic ImageFolder (benchmarks/make_shapes.py: 8 classes x 250 train images, 32 px PNG) is written to a
temporary folder. Each variant's datasets are built once (the memory cache's one-time decode is timed
separately), then epochs are timed in interleaved rounds (every variant once per round) with torch pinned to
``--threads``; the table reports the median img/s over rounds and each variant's ratio to "before" per round
(median, range). Only the data is timed (no model).

  python benchmarks/data_pipeline.py                # 5 rounds, 1 thread, 2 workers
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import add_harness_args, args_dict, machine, md_table, out_path, write_results  # noqa: E402
from benchmarks.make_shapes import make  # noqa: E402
from lotus.config import config_from_dict  # noqa: E402
from lotus.data import batches, build_datasets  # noqa: E402

TIMM = {"enabled": True, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "crop_pct": 1.0}


def variants(workers: int) -> list[tuple[str, str, dict]]:
    """(name, the name of its "before" variant, data section)."""
    out = []
    for path, extra in (("tensor", {}), ("timm RandAugment", {"transform": TIMM})):
        before = f"{path}: decode every epoch, 0 workers (before)"
        out += [
            (before, before, {**extra}),
            (f"{path}: cache memory, 0 workers", before, {**extra, "cache": "memory"}),
            (f"{path}: decode every epoch, {workers} workers", before, {**extra, "num_workers": workers}),
        ]
        if extra:  # the per-sample transform stays: workers on top of the cache
            out.append(
                (
                    f"{path}: cache memory, {workers} workers",
                    before,
                    {**extra, "cache": "memory", "num_workers": workers},
                )
            )
    return out


def epoch(ds, n: int, bs: int, workers: int, seed: int) -> float:
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(seed)
    order = np.random.default_rng(seed).permutation(n)
    t0 = time.perf_counter()
    seen = 0
    for x, _, _ in batches(ds, order, bs, workers):
        seen += len(x)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--per-class", type=int, default=250)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    add_harness_args(p, "data_pipeline", quick="smoke run: 25 images per class, 2 rounds")
    args = p.parse_args()
    if args.quick:
        args.per_class, args.rounds = 25, 2
    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="shapes-")
    make(root, args.per_class, 4, args.size, 0)
    built, decode_s = [], {}
    befores = {}
    for name, before, extra in variants(args.workers):
        befores[name] = before
        cfg = config_from_dict({"data": {"name": "imagefolder", "root": root, "batch_size": args.batch_size, **extra}})
        t0 = time.perf_counter()
        b = build_datasets(cfg.data, args.img_size, seed=0)
        decode_s[name] = time.perf_counter() - t0
        built.append((name, b.train_aug or b.train, cfg.data.num_workers))
    n = len(built[0][1])
    rates: dict[str, list[float]] = {name: [] for name, _, _ in built}
    for r in range(args.rounds):
        for name, ds, workers in built:
            rates[name].append(epoch(ds, n, args.batch_size, workers, r))
    rows, payload = [], []
    for name, _, _ in built:
        base = befores[name]
        ratios = [a / b for a, b in zip(rates[name], rates[base])]
        row = {
            "variant": name,
            "img_per_s_median": statistics.median(rates[name]),
            "img_per_s": rates[name],
            "ratio_vs_before_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "build_s": decode_s[name],
        }
        payload.append(row)
        rows.append(
            [
                name,
                f"{row['img_per_s_median']:.0f}",
                f"{row['ratio_vs_before_median']:.2f}x",
                f"{row['ratio_min']:.2f}x .. {row['ratio_max']:.2f}x",
                f"{row['build_s']:.2f}",
            ]
        )
    table = md_table(
        [
            "variant",
            "img/s (median)",
            "vs before (median)",
            "range over rounds",
            "dataset build s (incl. one-time decode)",
        ],
        rows,
    )
    md = (
        f"# ImageFolder input pipeline ({n} train images, {args.size} px PNG -> {args.img_size} px, batch "
        f"{args.batch_size}, {args.rounds} interleaved rounds, {args.threads} torch thread(s), "
        f"{machine()['cpu_count']} CPUs)\n\n`python benchmarks/data_pipeline.py` (data only, no model)\n\n{table}\n"
    )
    write_results(out_path(args), {"args": args_dict(args), "images": n, "rows": payload}, md, quick=args.quick)


if __name__ == "__main__":
    main()
