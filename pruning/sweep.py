"""Essential sparsity (Jaiswal et al. 2023): how far one-shot magnitude pruning goes before accuracy drops.

Prunes copies of the model at 0, step, 2*step, ... max_sparsity (no retraining), evaluates each, and finds the
knee: the largest sparsity such that it and every lower sparsity stay within ``tolerance`` of the dense metric.
Writes a JSON table, a markdown table and a PNG curve.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from torch import nn

from .config import MagnitudeConfig, check_sparsity
from .masks import FilterFn
from .report import markdown_table

__all__ = ["essential_sparsity_sweep", "find_knee", "plot_sweep", "save_sweep", "sparsity_grid", "sweep_markdown"]


def sparsity_grid(step: float = 0.05, max_sparsity: float = 0.9) -> list[float]:
    """``[0, step, 2*step, ..., max_sparsity]`` (rounded to 6 decimals, max included when on the grid)."""
    if not 0 < step < 1:
        raise ValueError(f"step: expected a number in (0, 1), got {step!r}")
    max_sparsity = check_sparsity(max_sparsity, "max_sparsity")
    n = int(np.floor(max_sparsity / step + 1e-9))
    return [round(i * step, 6) for i in range(n + 1)]


def find_knee(
    points: Sequence[dict[str, Any]], dense: float, tolerance: float, higher_is_better: bool = True
) -> dict[str, Any]:
    """Knee of a sweep: largest sparsity with every sparsity up to it within ``tolerance`` of ``dense``."""

    def ok(v: float) -> bool:
        return v >= dense - tolerance if higher_is_better else v <= dense + tolerance

    knee = None
    for p in sorted(points, key=lambda p: p["sparsity"]):
        if not ok(p["metric"]):
            break
        knee = p
    anywhere = [p for p in points if ok(p["metric"])]
    last_ok = max(anywhere, key=lambda p: p["sparsity"]) if anywhere else None
    return {
        "knee": knee["sparsity"] if knee else None,
        "knee_metric": knee["metric"] if knee else None,
        "largest_within_tolerance": last_ok["sparsity"] if last_ok else None,
    }


def essential_sparsity_sweep(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    sparsities: Sequence[float] | None = None,
    step: float = 0.05,
    max_sparsity: float = 0.9,
    scope: Literal["layer", "global"] = "layer",
    tolerance: float = 0.01,
    filter_fn: FilterFn | None = None,
    higher_is_better: bool = True,
    metric_name: str = "val_acc",
) -> dict[str, Any]:
    """Sweep one-shot magnitude sparsity; ``evaluate(model) -> metric`` (e.g. val accuracy in [0, 1]).

    ``model`` itself is not modified. ``tolerance`` is absolute, in the metric's units (0.01 = 1 point of
    accuracy). Returns ``{"points": [{sparsity, metric, delta, achieved_sparsity}], "dense", "knee", ...}``.
    """
    from .api import prune_  # late import keeps `import pruning.sweep` cheap and cycle-free

    if tolerance < 0:
        raise ValueError(f"tolerance: expected a number >= 0, got {tolerance!r}")
    if sparsities is not None:
        grid = sorted({round(check_sparsity(s), 6) for s in sparsities})
    else:
        grid = sparsity_grid(step, max_sparsity)
    if 0.0 not in grid:
        grid = [0.0] + grid
    points = []
    dense = None
    for s in grid:
        work = copy.deepcopy(model)
        achieved = 0.0
        if s > 0:
            rep = prune_(work, MagnitudeConfig(sparsity=s, scope=scope), filter_fn=filter_fn)
            achieved = rep["total"]["sparsity"]
        metric = float(evaluate(work))
        if s == 0.0:
            dense = metric
        points.append({"sparsity": s, "metric": metric, "achieved_sparsity": achieved})
        del work
    for p in points:
        p["delta"] = p["metric"] - dense
    result = {
        "metric": metric_name,
        "dense": dense,
        "tolerance": tolerance,
        "scope": scope,
        "higher_is_better": higher_is_better,
        "points": points,
    }
    result.update(find_knee(points, dense, tolerance, higher_is_better))
    return result


def plot_sweep(result: dict[str, Any], path: str, title: str | None = None) -> str:
    """Save the sweep curve (metric vs sparsity, dense band and knee marked) as a PNG; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs = [100 * p["sparsity"] for p in result["points"]]
    ys = [p["metric"] for p in result["points"]]
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, ys, marker="o", label=f"one-shot magnitude ({result['scope']})")
    d, tol = result["dense"], result["tolerance"]
    lo = d - tol if result.get("higher_is_better", True) else d
    ax.axhspan(lo, lo + tol, color="tab:green", alpha=0.15, label=f"within tolerance of dense ({tol:g})")
    ax.axhline(d, color="tab:green", lw=1)
    if result.get("knee") is not None:
        ax.axvline(100 * result["knee"], color="tab:red", ls="--", label=f"knee {100 * result['knee']:.0f}%")
    ax.set_xlabel("sparsity of pruned layers (%)")
    ax.set_ylabel(result.get("metric", "metric"))
    ax.set_title(title or "Essential sparsity sweep")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def save_sweep(result: dict[str, Any], out_dir: str, title: str | None = None, stem: str = "sweep") -> dict[str, str]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"{stem}.{k}") for k in ("json", "md", "png")}
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, paths["json"])
    with open(paths["md"], "w") as f:
        f.write(sweep_markdown(result) + "\n")
    plot_sweep(result, paths["png"], title)
    return paths


def sweep_markdown(result: dict[str, Any]) -> str:
    rows = [
        {
            "sparsity": p["sparsity"],
            result["metric"]: p["metric"],
            "delta": p["delta"],
            "within_tol": "yes"
            if (p["delta"] >= -result["tolerance"] if result["higher_is_better"] else p["delta"] <= result["tolerance"])
            else "no",
        }
        for p in result["points"]
    ]
    knee = result.get("knee")
    head = (
        f"dense {result['metric']} = {result['dense']:.4f}; tolerance {result['tolerance']:g}; "
        f"knee (essential sparsity) = {'none' if knee is None else f'{100 * knee:.0f}%'}"
    )
    return head + "\n\n" + markdown_table(rows)
