"""Outlier reports: a per-layer markdown table and PNG plots (matplotlib, Agg backend, no display needed).

``metrics.jsonl`` records written by the outlier callback look like
``{"type": "event", "event": "outliers", "step": 100, "layers": {"blocks.0": {"kurtosis": .., "mmr": ..}, ..}}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from lotus.safe_io import atomic_write, atomic_write_text

__all__ = ["read_outlier_records", "layer_table", "summarize", "plot_history", "plot_layers", "write_run_report"]

METRICS = ("kurtosis", "mmr", "rms", "max_abs")


def read_outlier_records(metrics_path: str | os.PathLike) -> list[dict]:
    """The ``outliers`` events of a run's metrics.jsonl, in file order (unreadable lines are skipped)."""
    path = os.fspath(metrics_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: metrics file not found")
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash; keep the rest
            if isinstance(rec, dict) and rec.get("event") == "outliers" and isinstance(rec.get("layers"), dict):
                out.append(rec)
    return out


def summarize(layers: dict[str, dict]) -> dict[str, float]:
    """Max and mean over sites of kurtosis and MMR."""
    k = [v["kurtosis"] for v in layers.values()]
    m = [v["mmr"] for v in layers.values()]
    if not k:
        return {}
    return {"kurtosis_max": max(k), "kurtosis_mean": sum(k) / len(k), "mmr_max": max(m), "mmr_mean": sum(m) / len(m)}


def _fmt(v: float) -> str:
    if v != v:  # nan
        return "nan"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def layer_table(layers: dict[str, dict], metrics: Iterable[str] = METRICS) -> str:
    """Markdown table: one row per site (model order), one column per metric."""
    metrics = [m for m in metrics if any(m in v for v in layers.values())]
    head = "| layer | " + " | ".join(metrics) + " |"
    sep = "|---|" + "---:|" * len(metrics)
    rows = [
        f"| {name} | " + " | ".join(_fmt(v.get(m, float("nan"))) for m in metrics) + " |" for name, v in layers.items()
    ]
    return "\n".join([head, sep, *rows])


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _scale(ax, values: list[float]) -> None:
    """Log y axis when values span more than a decade (outliers grow by orders of magnitude), else linear."""
    vals = [v for v in values if v == v and v > 0]
    if vals and max(vals) / min(vals) > 10:
        ax.set_yscale("log")


def _save(fig, plt, path) -> str:
    path = os.fspath(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


def plot_history(records: list[dict], path: str | os.PathLike, title: str = "") -> str:
    """PNG: kurtosis and MMR of every site against the training step (log scale)."""
    if not records:
        raise ValueError("no outlier records to plot (was outliers.enabled set during training?)")
    plt = _plt()
    sites: list[str] = []
    for r in records:
        sites += [s for s in r["layers"] if s not in sites]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], "kurtosis", "kurtosis (1 = no outliers)"), (axes[1], "mmr", "max / median |x|"))
    for ax, metric, label in panels:
        for s in sites:
            pts = [(r["step"], r["layers"][s][metric]) for r in records if s in r["layers"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=s)
        _scale(ax, [r["layers"][s][metric] for r in records for s in r["layers"]])
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_layers(layers: dict[str, dict], path: str | os.PathLike, title: str = "") -> str:
    """PNG: per-site bars of kurtosis and MMR for one model (log scale)."""
    if not layers:
        raise ValueError("no layers to plot")
    plt = _plt()
    names = list(layers)
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.6 * len(names) + 4), 3.8))
    for ax, metric, label in ((axes[0], "kurtosis", "kurtosis"), (axes[1], "mmr", "max / median |x|")):
        ax.bar(range(len(names)), [layers[n][metric] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        _scale(ax, [layers[n][metric] for n in names])
        ax.set_ylabel(label)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def write_run_report(run_dir: str | os.PathLike, records: list[dict] | None = None) -> dict[str, str]:
    """Write ``outliers.md`` (last per-layer table + history) and ``outliers_history.png`` into ``run_dir``."""
    run_dir = os.fspath(run_dir)
    if records is None:
        records = read_outlier_records(os.path.join(run_dir, "metrics.jsonl"))
    if not records:
        raise ValueError(f"{run_dir}: no outlier records in metrics.jsonl")
    last = records[-1]
    lines = [
        f"# Outlier features (step {last['step']})",
        "",
        "Residual stream on the fixed probe batch: kurtosis (He et al. 2024, Eq. 1; 1 = no outliers, "
        "up to the width) and mean max/median |x| per token.",
        "",
        layer_table(last["layers"]),
        "",
        "## Over training",
        "",
        "| step | kurtosis max | kurtosis mean | mmr max | mmr mean |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        s = summarize(r["layers"])
        lines.append(
            f"| {r['step']} | {_fmt(s['kurtosis_max'])} | {_fmt(s['kurtosis_mean'])} | "
            f"{_fmt(s['mmr_max'])} | {_fmt(s['mmr_mean'])} |"
        )
    md = os.path.join(run_dir, "outliers.md")
    png = plot_history(records, os.path.join(run_dir, "outliers_history.png"), title=os.path.basename(run_dir))
    lines += ["", f"![outliers over training]({os.path.basename(png)})", ""]
    atomic_write_text(md, "\n".join(lines))
    return {"markdown": md, "plot": png}
