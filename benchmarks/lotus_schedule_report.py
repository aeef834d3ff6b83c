"""The tables and verdicts of ``benchmarks/lotus_schedule.py``: one markdown page per suite from its analysis
(per-run CPU seconds, FLOPs and samples to the target, per-seed ratios, auto decisions)."""

from __future__ import annotations

import math
import statistics

from lotus.bench_stats import baselines_line, format_ratio, mean_std
from lotus.run_report import read_metrics

__all__ = ["ratio", "decisions", "markdown"]


def ratio(d: dict) -> str:
    return format_ratio(d, "not reached")


_DECISION_KEYS = ("what", "from_epoch", "value", "signal", "measured", "threshold", "reason")


def decisions(run_dir: str) -> list[dict]:
    """The ``auto_decision`` events of a run (``schedule.mode: auto``)."""
    return [
        {k: e.get(k) for k in _DECISION_KEYS} for e in read_metrics(run_dir)[1] if e.get("event") == "auto_decision"
    ]


def _fmt_decision(d: dict) -> str:
    """One decision, short: what it set from which epoch, and the signal against its threshold."""
    value = d["value"]
    if d["what"] == "thin":
        value = ", ".join(f"{k} {v:g}" for k, v in value.items() if v) or "none"
    elif d["what"] in ("reduce", "anneal"):
        value = None
    head = f"{d['what']}{'' if value is None else ' ' + str(value)} from epoch {d['from_epoch']}"
    if d.get("measured") is None:
        return head
    thr = "" if d.get("threshold") is None else f" vs {d['threshold']:.3g}"
    reason = d.get("reason") or ""
    timed = reason[reason.index("(training on") + 1 :].rstrip(")") if "(training on" in reason else ""
    return f"{head} ({d['signal']} {d['measured']:.3g}{thr}{'; ' + timed if timed else ''})"


def _fmt_times(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" if math.isfinite(v) else "-" for v in values)


def _verdict(res: dict, goal: float) -> list[str]:
    lines = []
    for r in res["rows"]:
        if r["role"] not in ("lotus", "auto"):
            continue
        sp = r["speedup_cpu_per_seed"]
        fast = sp["median"] is not None and sp["median"] >= goal and sp["seeds_with_ratio"] == len(sp["per_seed"])
        close = r["delta_final_pp"] >= -res["target_drop"] * 100 - 1e-9
        smaller = r["params"] < min(x["params"] for x in res["rows"] if x["role"] == "dense")
        faster = r["inference_speedup_vs_strongest"] > 1.0
        ok = fast and close and smaller and faster
        lines.append(
            f"- **{r['name']}: target {'met' if ok else 'MISSED'}** (goal: median per-seed CPU-time-to-target speed-up "
            f">= {goal:.1f}x in every seed, final acc within {res['target_drop'] * 100:.1f} pp of "
            f"{res['strongest_dense']}, smaller and faster final model): speed-up {ratio(sp)} "
            f"({'ok' if fast else 'missed'}), final {r['delta_final_pp']:+.2f} pp ({'ok' if close else 'missed'}), "
            f"params x{r['param_ratio']:.2f} ({'ok' if smaller else 'missed'}), inference "
            f"{r['inference_speedup_vs_strongest']:.2f}x ({'ok' if faster else 'missed'})."
        )
    return lines


def markdown(res: dict, command: str, meta: dict) -> str:
    head = [
        "config",
        "role",
        "final val acc",
        "vs strongest dense",
        f"CPU s to {res['target'] * 100:.2f}% (per seed)",
        "CPU-time speed-up",
        "FLOP speed-up",
        "samples speed-up",
        "total CPU s",
        "samples forwarded",
        "params",
        "inf img/s",
    ]
    out = [
        f"# LOTUS schedule vs the strongest dense baseline: {res['suite']}",
        "",
        f"`{command}`",
        "",
        f"{res['tokens']} tokens per image; seeds {res['seeds']}; every run 1 thread"
        + (f", {meta['jobs']} runs side by side (one per core)" if meta.get("jobs", 1) > 1 else "")
        + f", all runs interleaved seed by seed in one process. Target = {res['strongest_dense']}'s mean "
        "final val accuracy - "
        f"{res['target_drop'] * 100:.1f} pp = **{res['target'] * 100:.2f}%**. Speed-ups are per-seed ratios "
        "(median, range): the seed's baseline is the fastest dense config/budget that reaches the target in that "
        "seed (CPU time, FLOPs and samples each on their own), counted from the epoch it first reaches it. "
        "Times are the 1-thread run's process CPU seconds of training (evaluation excluded; probes, scoring, "
        "ranking and pruning included): unlike wall time they do not grow when another job shares the core.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in res["rows"]:
        out.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    r["role"],
                    mean_std(r["finals"]),
                    f"{r['delta_final_pp']:+.2f} pp",
                    _fmt_times(r["cpu_to_target"]),
                    ratio(r["speedup_cpu_per_seed"]),
                    ratio(r["speedup_flops_per_seed"]),
                    ratio(r["speedup_samples_per_seed"]),
                    f"{statistics.fmean(r['cpu_total']):.1f}",
                    f"{statistics.fmean(r['samples_total']):.0f}",
                    f"{r['params'] / 1e6:.3f} M (x{r['param_ratio']:.2f})",
                    f"{r['inf_img_per_s']:.0f} ({r['inference_speedup_vs_strongest']:.2f}x)",
                ]
            )
            + " |"
        )
    base = res["baseline_per_seed"]["cpu_to_target"]
    out += [
        "",
        baselines_line(res["seeds"], base, digits=1),
        "",
    ]
    out += _verdict(res, meta["target_speedup"])
    out += _auto_verdict(res)
    out += [
        "",
        "Epoch at which each run first reaches the target (per seed; - = never): "
        + "; ".join(
            f"{r['name']} " + ", ".join(f"{e:.0f}" if math.isfinite(e) else "-" for e in r["epoch_to_target"])
            for r in res["rows"]
        )
        + ".",
    ]
    auto = [(r["name"], s, ds) for r in res["rows"] for s, ds in zip(res["seeds"], r["auto_decisions"]) if ds]
    if auto:
        out += [
            "",
            "Auto-schedule decisions (`auto_decision` events: what, from which epoch, signal vs threshold):",
            "",
        ]
        out += [f"- {name} seed {s}: " + "; ".join(_fmt_decision(d) for d in ds) for name, s, ds in auto]
    out += [
        "",
        f"Machine: {meta['machine']}; load average (1 min) {meta['load_start']:.2f} at the start of this invocation, "
        f"{meta['load_end']:.2f} at the end (other jobs shared the cores; interleaving spreads that over all "
        f"configs). This invocation: {meta['started']} - {meta['finished']}; its runs (reused ones included) "
        f"finished {meta['runs_finished_utc']} UTC"
        + (
            f"; {meta['runs_reused']} of its {meta['runs']} runs were reused from earlier invocations (their times "
            "are from those)"
            if meta.get("runs_reused")
            else ""
        )
        + ".",
        "",
    ]
    return "\n".join(out)


def _auto_verdict(res: dict) -> list[str]:
    """The issue's target per suite: the one auto config at least as fast to the target as the best hand-made
    schedule (median per-seed CPU-time ratio >= 1.0), with its final val accuracy within the target drop."""
    lines = []
    for a in res.get("auto_vs_hand", []):
        sp = a["speedup_cpu_per_seed"]
        auto_n, hand_n = a["auto_seeds_reached"], a["hand_seeds_reached"]
        # more seeds at the target is faster (the other never gets there); as many: the per-seed ratios decide
        fast = auto_n > hand_n or (auto_n == hand_n > 0 and sp["median"] is not None and sp["median"] >= 1.0)
        close = a["auto_delta_final_pp"] >= -res["target_drop"] * 100 - 1e-9
        ok = fast and close
        lines.append(
            f"- **{a['auto']} vs the best hand-made schedule ({a['hand']}): target {'met' if ok else 'MISSED'}** "
            f"(goal: at least as fast to the target: at the target in more seeds, or in as many with a median "
            f"per-seed CPU-time ratio >= 1.0; final within {res['target_drop'] * 100:.1f} pp of "
            f"{res['strongest_dense']}): {ratio(sp)}; seeds at the target {a['auto_seeds_reached']} vs "
            f"{a['hand_seeds_reached']}; final {a['auto_delta_final_pp']:+.2f} pp (hand-made "
            f"{a['hand_delta_final_pp']:+.2f} pp)."
        )
    return lines
