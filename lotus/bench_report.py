"""``lotus bench``'s analysis and report: per-config statistics over seeds, time-to-target speed-ups (per-seed
ratios, lower bounds where the baseline misses), the markdown table, the verdict lines and the plot, from the
runs :func:`lotus.bench.run_bench` wrote."""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import TYPE_CHECKING

import numpy as np

from lotus.bench_inference import measure_inference
from lotus.bench_stats import _finite, _time_to, format_ratio, mean_std, seed_ratios
from lotus.config_upgrade import load_saved_config
from lotus.run_report import read_metrics
from lotus.safe_io import atomic_write_stream, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from lotus.bench import BenchResult

__all__ = ["analyse", "add_speedups", "bench_table", "verdict", "plot_bench", "write_bench"]


def analyse(
    results: list[BenchResult], target: float | None = None, target_drop: float = 0.005, inference_repeats: int = 5
) -> dict:
    """Aggregate runs into per-config statistics (see module docstring for definitions)."""
    per = []
    for res in results:
        runs = [read_metrics(r) for r in res.runs]
        per.append((res, runs))
    base_final = [rs[0][-1]["val_acc"] for rs in per[0][1]]
    if target is None:
        target = statistics.fmean(base_final) - target_drop
    rows = []
    measured = measure_inference(results, inference_repeats)
    for (res, runs), inf in zip(per, measured):
        finals = [ep[-1]["val_acc"] for ep, _, _ in runs]
        tt = [_time_to(ep, target, "wall_s") for ep, _, _ in runs]
        ft = [_time_to(ep, target, "train_flops") for ep, _, _ in runs]
        cfg = load_saved_config(os.path.join(res.runs[0], "config.yaml"))
        rows.append(
            {
                "name": res.name,
                "config": res.config,
                "seeds": len(runs),
                "runs": res.runs,
                "finals": finals,
                "final_acc_mean": statistics.fmean(finals),
                "final_acc_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "time_to_target": tt,
                "time_to_target_mean": statistics.fmean(tt) if all(map(math.isfinite, tt)) else math.inf,
                "flops_to_target": ft,
                "flops_to_target_mean": statistics.fmean(ft) if all(map(math.isfinite, ft)) else math.inf,
                "total_time_mean": statistics.fmean(ep[-1]["wall_s"] for ep, _, _ in runs),
                "samples_mean": statistics.fmean(ep[-1]["samples_seen"] for ep, _, _ in runs),
                "params": inf[0]["params"],
                "nonzero": statistics.fmean(i["nonzero"] for i in inf),
                "inf_flops_per_img": inf[0]["flops_per_img"],
                "inf_img_per_s": statistics.fmean(i["img_per_s"] for i in inf),
                "model": cfg.model.name,
                "curves": [[(r["wall_s"], r.get("train_flops", 0), r.get("val_acc")) for r in ep] for ep, _, _ in runs],
            }
        )
    censored = add_speedups(rows)
    return {"target": target, "target_drop": target_drop, "baseline_censored": censored, "rows": rows}


def add_speedups(rows: list[dict]) -> bool:
    """Fill each row's time/FLOP speed-ups vs ``rows[0]`` (the baseline) and its inference speed-up.

    When a baseline seed never reaches the target, its time (FLOPs) to target is unknown but at least its full
    training time (FLOPs): the baseline mean is then a lower bound, and so is every speed-up against it
    (``speedup_is_lower_bound``). A config that misses the target in some seed gets speed-up 0 (none).
    Returns whether the baseline was censored.
    """
    base = rows[0]
    censored = not math.isfinite(base["time_to_target_mean"])
    for kind, axis in (("time", 0), ("flops", 1)):
        ref = statistics.fmean(
            t if math.isfinite(t) else curve[-1][axis] for t, curve in zip(base[f"{kind}_to_target"], base["curves"])
        )
        for r in rows:
            value = r[f"{kind}_to_target_mean"]
            r[f"speedup_{kind}"] = ref / value if math.isfinite(value) and math.isfinite(ref) and value > 0 else 0.0
    base["speedup_time"] = base["speedup_flops"] = 1.0
    for r in rows:  # the headline: per-seed ratios against the baseline's same seed (median, range)
        r["speedup_time_per_seed"] = seed_ratios(base["time_to_target"], r["time_to_target"])
        r["speedup_flops_per_seed"] = seed_ratios(base["flops_to_target"], r["flops_to_target"])
    for r in rows:
        r["speedup_is_lower_bound"] = censored and r is not base and r["speedup_time"] > 0
        r["inference_speedup"] = r["inf_img_per_s"] / base["inf_img_per_s"]
    return censored


def bench_table(analysis: dict) -> str:
    """Markdown table of an :func:`analyse` result: speed-ups are the median (range) of per-seed ratios
    against the baseline's same seed; a seed where either run missed the target has no ratio."""
    head = [
        "config",
        "final val acc",
        "seeds at target",
        f"time to {analysis['target'] * 100:.2f}% (s, per seed)",
        "time speed-up",
        "FLOP speed-up",
        "samples fwd",
        "params",
        "nonzero",
        "inf FLOPs/img",
        "inf img/s",
        "inf speed-up",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in analysis["rows"]:
        reached = sum(map(math.isfinite, r["time_to_target"]))
        tt = ", ".join(f"{t:.1f}" if math.isfinite(t) else "-" for t in r["time_to_target"])
        lines.append(
            " | ".join(
                [
                    f"| {r['name']}",
                    mean_std(r["finals"])
                    if "finals" in r
                    else f"{r['final_acc_mean'] * 100:.2f} +- {r['final_acc_std'] * 100:.2f}%",
                    f"{reached}/{r['seeds']}",
                    tt,
                    format_ratio(r.get("speedup_time_per_seed")),
                    format_ratio(r.get("speedup_flops_per_seed")),
                    f"{r['samples_mean']:.0f}",
                    f"{r['params']}",
                    f"{r['nonzero']:.0f}",
                    f"{r['inf_flops_per_img']:.3g}",
                    f"{r['inf_img_per_s']:.0f}",
                    f"{r['inference_speedup']:.2f}x |",
                ]
            )
        )
    return "\n".join(lines)


def verdict(analysis: dict) -> list[str]:
    """One line per config against the baseline: how many seeds reached the target, the median per-seed
    speed-up, and whether it is faster at (almost) the baseline's accuracy (``target_drop``)."""
    rows = analysis["rows"]
    base, drop = rows[0], analysis.get("target_drop", 0.005)
    out = []
    for r in rows[1:]:
        sp = r.get("speedup_time_per_seed") or {}
        n, reached = r["seeds"], sum(map(math.isfinite, r["time_to_target"]))
        delta = (r["final_acc_mean"] - base["final_acc_mean"]) * 100
        faster = reached == n and sp.get("seeds_with_ratio") == n and sp["median"] > 1.0
        ok = faster and delta >= -drop * 100 - 1e-9
        out.append(
            f"- **{r['name']}: {'faster than' if ok else 'not faster than'} {base['name']}** - reached the "
            f"target in {reached}/{n} seeds; time speed-up {format_ratio(sp)} (median per seed); final "
            f"accuracy {delta:+.2f} pp (allowed: -{drop * 100:.1f} pp)."
        )
    return out


def plot_bench(analysis: dict, out: str) -> list[str]:
    """val acc vs wall time and vs training FLOPs: mean line per config with a +-1 std band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for axis, label, fname in ((0, "training time (s)", "acc_vs_time.png"), (1, "training FLOPs", "acc_vs_flops.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in analysis["rows"]:
            curves = r["curves"]
            n = min(len(c) for c in curves)
            xs = np.array([[c[i][axis] for i in range(n)] for c in curves], dtype=float).mean(0)
            acc = (
                np.array(
                    [[(c[i][2] if c[i][2] is not None else np.nan) for i in range(n)] for c in curves], dtype=float
                )
                * 100
            )
            m, s = np.nanmean(acc, 0), np.nanstd(acc, 0)
            ax.plot(xs, m, label=r["name"])
            ax.fill_between(xs, m - s, m + s, alpha=0.2)
        ax.axhline(analysis["target"] * 100, color="grey", ls="--", lw=1, label="target")
        ax.set_xlabel(label)
        ax.set_ylabel("val accuracy (%)")
        lo = analysis["target"] * 100 - 10
        ax.set_ylim(max(0, lo), 100)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, fname)
        atomic_write_stream(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        paths.append(path)
    return paths


def write_bench(analysis: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    table = bench_table(analysis) + "\n\n" + "\n".join(verdict(analysis))
    plot_bench(analysis, out)
    atomic_write_text(
        os.path.join(out, "bench.json"), json.dumps(_finite(analysis), indent=2, default=str, allow_nan=False)
    )
    md = [
        "# lotus bench",
        "",
        f"Target accuracy: {analysis['target'] * 100:.2f}% "
        f"(baseline mean final accuracy - {analysis['target_drop'] * 100:.1f} pp)",
        "",
        table,
        "",
    ]
    md += verdict(analysis) + [""]
    md += ["![acc vs time](acc_vs_time.png)", "", "![acc vs flops](acc_vs_flops.png)", ""]
    atomic_write_text(os.path.join(out, "bench.md"), "\n".join(md))
    return table
