"""The timm training recipe on digits: the dense baseline vs the same model with timm's RandAugment train
transform, mixup/cutmix and a model EMA, 3 seeds interleaved seed by seed in one invocation, fixed threads.

Both configs are pinned under configs/ (recipes_digits_base.yaml, recipes_digits_timm.yaml). Runs go through
``lotus.bench.run_bench`` / ``analyse``: final val accuracy, and the training time (evaluation excluded) to the
target (the baseline's mean final accuracy - 0.5 pp). The recipe's EMA weights are reported too (final
``ema_val_acc`` and the time until it first reaches the target). Per-seed ratios recipe / baseline: median
and range.

  python benchmarks/recipes_digits.py                 # 3 seeds x 2 configs x 40 epochs
  python benchmarks/recipes_digits.py --quick --runs /tmp/x   # smoke run: 3 epochs, seed 0
  python benchmarks/recipes_digits.py --light --runs DIR   # baseline vs recipes_digits_timm_light.yaml
                                                           # (-> recipes_digits_light.*; reuses DIR's baseline runs)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import add_harness_args, md_table, out_path, write_results  # noqa: E402
from lotus.bench import run_bench  # noqa: E402
from lotus.bench_report import analyse  # noqa: E402
from lotus.run_report import read_metrics  # noqa: E402

CONFIGS = ["configs/recipes_digits_base.yaml", "configs/recipes_digits_timm.yaml"]
LIGHT = ["configs/recipes_digits_base.yaml", "configs/recipes_digits_timm_light.yaml"]


def _time_to(epochs: list[dict], target: float, key: str) -> float:
    for r in epochs:
        if r.get(key) is not None and r[key] >= target - 1e-12:
            return float(r["wall_s"])
    return math.inf


def _ratios(values: list[float]) -> dict:
    ok = [v for v in values if math.isfinite(v)]
    if not ok:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(ok), "min": min(ok), "max": max(ok)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs (smoke runs)")
    p.add_argument(
        "--runs", metavar="DIR", default=None, help="run folder (default: a temporary one; reused runs are resumed)"
    )
    add_harness_args(p, "recipes_digits", seeds=[0, 1, 2], quick="smoke run: 3 epochs, seed 0")
    p.add_argument("--light", action="store_true", help="the lighter recipe (configs/recipes_digits_timm_light.yaml)")
    args = p.parse_args()
    configs, args._bench_name = (LIGHT, "recipes_digits_light") if args.light else (CONFIGS, "recipes_digits")
    if args.quick:
        args.epochs, args.seeds = args.epochs or 3, args.seeds[:1]
    torch.set_num_threads(args.threads)
    overrides = [f"train.threads={args.threads}", "train.device=cpu"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    out = args.runs or tempfile.mkdtemp(prefix="recipes_digits-")
    results = run_bench(configs, args.seeds, out, overrides=overrides, progress=False)
    analysis = analyse(results)
    target = analysis["target"]
    base, recipe = analysis["rows"]
    per_seed = []
    for s, rb, rr in zip(args.seeds, base["runs"], recipe["runs"]):
        eb, er = read_metrics(rb)[0], read_metrics(rr)[0]
        tb, tr = _time_to(eb, target, "val_acc"), _time_to(er, target, "val_acc")
        te = _time_to(er, target, "ema_val_acc")
        per_seed.append(
            {
                "seed": s,
                "base_final": eb[-1]["val_acc"],
                "recipe_final": er[-1]["val_acc"],
                "recipe_ema_final": er[-1].get("ema_val_acc"),
                "base_time": eb[-1]["wall_s"],
                "recipe_time": er[-1]["wall_s"],
                "base_time_to_target": tb,
                "recipe_time_to_target": tr,
                "recipe_ema_time_to_target": te,
                "acc_diff_pp": (er[-1]["val_acc"] - eb[-1]["val_acc"]) * 100,
                "ema_acc_diff_pp": ((er[-1].get("ema_val_acc") or math.nan) - eb[-1]["val_acc"]) * 100,
                "time_ratio": er[-1]["wall_s"] / eb[-1]["wall_s"],
                "tta_ratio": tr / tb if math.isfinite(tr) and math.isfinite(tb) else math.inf,
                "ema_tta_ratio": te / tb if math.isfinite(te) and math.isfinite(tb) else math.inf,
            }
        )
    summary = {
        k: _ratios([r[k] for r in per_seed])
        for k in ("acc_diff_pp", "ema_acc_diff_pp", "time_ratio", "tta_ratio", "ema_tta_ratio")
    }
    fmt = lambda v, f="{:.2f}": "not reached" if v is None or not math.isfinite(v) else f.format(v)  # noqa: E731
    rows = [
        [
            r["seed"],
            fmt(r["base_final"] * 100),
            fmt(r["recipe_final"] * 100),
            fmt((r["recipe_ema_final"] or math.nan) * 100),
            fmt(r["base_time"], "{:.1f}"),
            fmt(r["recipe_time"], "{:.1f}"),
            fmt(r["base_time_to_target"], "{:.1f}"),
            fmt(r["recipe_time_to_target"], "{:.1f}"),
            fmt(r["recipe_ema_time_to_target"], "{:.1f}"),
        ]
        for r in per_seed
    ]
    table = md_table(
        [
            "seed",
            "baseline acc %",
            "recipe acc %",
            "recipe EMA acc %",
            "baseline train s",
            "recipe train s",
            "baseline s to target",
            "recipe s to target",
            "recipe EMA s to target",
        ],
        rows,
    )
    lines = [
        f"# timm recipe on digits ({len(args.seeds)} seeds, {args.threads} thread(s), interleaved)",
        "",
        f"`python benchmarks/recipes_digits.py{' --light' if args.light else ''}` - configs "
        f"{', '.join(configs)}; target = baseline mean final "
        f"accuracy - 0.5 pp = {target * 100:.2f}%; times are training time (evaluation excluded).",
        "",
        table,
        "",
    ]
    if args.light:
        lines += [
            "Baseline runs found in --runs are reused (the bench is resumable), so with the main run's folder "
            "the recipe's runs were not interleaved with them: compare accuracies, not times.",
            "",
        ]
    for key, label in (
        ("acc_diff_pp", "final acc, recipe - baseline (pp)"),
        ("ema_acc_diff_pp", "final EMA acc, recipe - baseline (pp)"),
        ("time_ratio", "training time, recipe / baseline"),
        ("tta_ratio", "time to target, recipe / baseline"),
        ("ema_tta_ratio", "time to target (EMA weights), recipe / baseline"),
    ):
        s = summary[key]
        lines.append(
            f"- {label}: median {fmt(s['median'])}, range {fmt(s['min'])} .. {fmt(s['max'])}"
            + (
                f" (reached in {sum(math.isfinite(r[key]) for r in per_seed)}/{len(per_seed)} seeds)"
                if key.endswith("tta_ratio")
                else ""
            )
        )
    md = "\n".join(lines) + "\n"
    clean = json.loads(
        json.dumps(
            {
                "configs": configs,
                "overrides": overrides,
                "target": target,
                "per_seed": per_seed,
                "summary": summary,
                "rows": [{k: v for k, v in r.items() if k not in ("curves", "runs")} for r in analysis["rows"]],
            },
            default=lambda o: None,
        ).replace("Infinity", "null")
    )
    write_results(out_path(args), clean, md, quick=args.quick)


if __name__ == "__main__":
    main()
