"""Statistics over seeds for ``lotus bench`` and the benchmark scripts (no torch: a script that only
summarises results imports this alone)."""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["format_ratio", "seed_stats", "mean_std", "seed_ratios", "baselines_line"]


def _time_to(epochs: list[dict], target: float, key: str) -> float:
    for r in epochs:
        if r.get("val_acc") is not None and r["val_acc"] >= target - 1e-12:
            return float(r[key])
    return math.inf


def seed_ratios(base: list[float], values: list[float]) -> dict:
    """Per-seed ratios ``base[k] / values[k]`` (a speed-up when both are times or FLOPs to a target) with their
    median and range; a seed where either side is not finite (target not reached) gives no ratio."""
    per = [b / v if math.isfinite(b) and math.isfinite(v) and v > 0 else None for b, v in zip(base, values)]
    ok = [r for r in per if r is not None]
    return {
        "per_seed": per,
        "median": statistics.median(ok) if ok else None,
        "min": min(ok) if ok else None,
        "max": max(ok) if ok else None,
        "seeds_with_ratio": len(ok),
    }


def seed_stats(values: list[float | None]) -> tuple[float, float]:
    """(mean, sample std) over seeds, ``None`` values skipped; std 0 for one value, both NaN for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def mean_std(values: list[float], scale: float = 100.0, unit: str = "%") -> str:
    """``mean +- std`` over seeds (:func:`seed_stats`), or ``value (n=1)`` for a single seed (no spread to show)."""
    if len(values) == 1:
        return f"{values[0] * scale:.2f}{unit} (n=1)"
    m, s = seed_stats(values)
    return f"{m * scale:.2f} +- {s * scale:.2f}{unit}"


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (a target never reached) as None, so bench.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def format_ratio(d: dict | None, missing: str = "-") -> str:
    """``median (min-max) [k/n seeds]`` of :func:`seed_ratios` (the range only with several seeds, the count only
    when some seed has no ratio), or ``missing`` when no seed reached the target."""
    if not d or d["median"] is None:
        return missing
    n = len(d["per_seed"])
    s = f"{d['median']:.2f}x" + (f" ({d['min']:.2f}-{d['max']:.2f})" if n > 1 else "")
    return s + (f" [{d['seeds_with_ratio']}/{n} seeds]" if d["seeds_with_ratio"] < n else "")


def baselines_line(seeds: list[int], base: list[dict], what: str = "CPU time", digits: int = 1) -> str:
    """One line naming each seed's baseline config and its value (``base``: ``{"config", "value"}`` per seed)."""
    return f"Dense baseline per seed ({what}): " + ", ".join(
        f"seed {s}: {b['config']} {b['value']:.{digits}f} s" if b["config"] else f"seed {s}: none reached"
        for s, b in zip(seeds, base)
    )
