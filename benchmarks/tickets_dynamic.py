"""Dynamic data pruning (InfoBatch-style) vs full-data training on digits: samples forwarded, wall time, accuracy.

Runs ``configs/digits_preln.yaml`` (full data every epoch) and ``configs/digits_dynamic.yaml`` (the same run with
``tickets.dynamic``: each epoch skip ``ratio`` of the below-mean-loss samples, re-weight the rest of them by
1/(1-ratio), full data for the final ``anneal`` share of epochs) with the lotus trainer, alternating
baseline and pruned runs seed by seed so machine load hits both alike. Reports, per variant, the final
validation accuracy (mean +- std over seeds), total samples forwarded, training wall time, the saved
fractions relative to the baseline and the accuracy difference. ``--ratios`` adds more pruning ratios.

Reference point: InfoBatch (ICLR 2024) saves ~40% of the training cost on CIFAR-10/100 at no accuracy loss
(r = 0.5, delta = 0.875).

Full run (README numbers)::

    python benchmarks/tickets_dynamic.py
    # = --seeds 0 1 2 --ratios 0.5 0.7 (configs/digits_preln.yaml vs configs/digits_dynamic.yaml: lotus_vit_tiny,
    #   40 epochs; r = 0.5 is InfoBatch's default, 0.7 shows the savings/accuracy trade-off)

Smoke run (~2-3 min)::

    python benchmarks/tickets_dynamic.py --quick
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._common import add_harness_args, out_path, write_results  # noqa: E402
from lotus.bench_stats import seed_stats  # noqa: E402

TARGET_SAVED = 0.40  # InfoBatch's ~40% saved at no loss


def run(path: str, sets: list[str], seed: int) -> dict:
    from lotus.config import load_config
    from lotus.training import Trainer

    cfg = load_config(ROOT / path, sets + [f"train.seed={seed}"])
    t0 = time.perf_counter()
    s = Trainer(cfg, write=False, quiet=True).fit()
    dyn = s.get("dynamic_pruning") or {}
    return {
        "config": path,
        "set": sets,
        "seed": seed,
        "final_val_acc": s["final_val_acc"],
        "best_val_acc": s["best_val_acc"],
        "samples_seen": s["samples_seen"],
        "train_wall_s": s["wall_s"],
        "total_s": time.perf_counter() - t0,
        "train_flops": s["train_flops"],
        "epochs": s["epochs"],
        "pruned_total": dyn.get("pruned_total", 0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="configs/digits_preln.yaml")
    p.add_argument("--config", default="configs/digits_dynamic.yaml")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7], help="tickets.dynamic.ratio values to run")
    p.add_argument("--anneal", type=float, default=None, help="override tickets.dynamic.anneal")
    p.add_argument("--set", action="append", default=[], help="extra config override for every run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_harness_args(
        p, "tickets_dynamic", seeds=[0, 1, 2], quick="smoke run: lotus_vit_micro, 6 epochs, 1 seed, first ratio only"
    )
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    extra = list(a.set)
    seeds = a.seeds
    if a.quick:
        seeds = seeds[:1]
        a.ratios = a.ratios[:1]
        extra += [
            "model.name=lotus_vit_micro",
            "train.epochs=6",
            "train.warmup_epochs=0.5",
            "data.batch_size=32",
            "optim.lr=3e-3",
        ]
    variants = [("full data", a.baseline, [])]
    for r in a.ratios:
        sets = [f"tickets.dynamic.ratio={r}"] + ([f"tickets.dynamic.anneal={a.anneal}"] if a.anneal is not None else [])
        variants.append((f"dynamic r={r}", a.config, sets))

    print(
        f"## Dynamic data pruning vs full data ({len(seeds)} seed(s), {torch.get_num_threads()} threads)\n", flush=True
    )
    rows = []
    for seed in seeds:  # interleave variants per seed: load drifts hit every variant alike
        for label, path, sets in variants:
            r = run(path, sets + extra, seed)
            r["variant"] = label
            rows.append(r)
            print(
                f"  {label:<16} seed {seed}: acc {r['final_val_acc'] * 100:.2f}%  samples {r['samples_seen']}  "
                f"train {r['train_wall_s']:.1f}s",
                flush=True,
            )

    summary = []
    base = None
    for label, _, _ in variants:
        rs = [r for r in rows if r["variant"] == label]
        acc = [r["final_val_acc"] * 100 for r in rs]
        acc_mean, acc_std = seed_stats(acc)
        s = {
            "variant": label,
            "seeds": len(rs),
            "acc_mean": acc_mean,
            "acc_std": acc_std,
            "samples": statistics.mean(r["samples_seen"] for r in rs),
            "wall_s": statistics.mean(r["train_wall_s"] for r in rs),
        }
        base = base or s
        s["samples_saved"] = 1 - s["samples"] / base["samples"]
        s["wall_saved"] = 1 - s["wall_s"] / base["wall_s"]
        s["acc_delta_pp"] = s["acc_mean"] - base["acc_mean"]
        # paired (same seed) wall-time savings: less sensitive to load drift than the means
        paired = [
            1 - r["train_wall_s"] / b["train_wall_s"]
            for r, b in zip(rs, [x for x in rows if x["variant"] == base["variant"]])
        ]
        s["wall_saved_paired_median"] = statistics.median(paired)
        summary.append(s)

    lines = [
        "| variant | seeds | final val acc % (mean +- std) | delta pp | samples forwarded | samples saved "
        "| train wall s | wall saved (paired median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['variant']} | {s['seeds']} | {s['acc_mean']:.2f} +- {s['acc_std']:.2f} | {s['acc_delta_pp']:+.2f} "
            f"| {s['samples']:.0f} | {s['samples_saved'] * 100:.1f}% | {s['wall_s']:.1f} "
            f"| {s['wall_saved'] * 100:.1f}% ({s['wall_saved_paired_median'] * 100:.1f}%) |"
        )
    lines.append(f"\nBar (InfoBatch): ~{TARGET_SAVED:.0%} saved at no accuracy loss.")
    write_results(
        out_path(a),
        {
            "benchmark": "tickets_dynamic",
            "platform": platform.platform(),
            "overrides": extra,
            "summary": summary,
            "runs": rows,
        },
        "\n".join(lines),
        quick=a.quick,
    )


if __name__ == "__main__":
    main()
