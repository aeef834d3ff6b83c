"""Helpers shared by the benchmark scripts: markdown tables, JSON output, machine description."""
from __future__ import annotations

import json
import os
import platform
import statistics
from typing import Any, Sequence

import torch

__all__ = ["machine", "md_table", "write_results", "mean_std"]


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def write_results(out: str | None, name: str, payload: dict, table: str) -> None:
    print(table)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({"machine": machine(), **payload}, f, indent=2)
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(table + "\n")
