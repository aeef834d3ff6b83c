"""What a pruned model costs: sparsity per layer, parameters, nonzeros, FLOPs (``torch.utils.flop_counter``),
measured latency, and text/markdown renderings of these reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from .masks import PRUNABLE_TYPES, effective_weight, is_masked

__all__ = [
    "sparsity_report",
    "effective_parameters",
    "count_params",
    "count_nonzeros",
    "count_flops",
    "count_sparse_flops",
    "measure_latency",
    "compare_latency",
    "speedup_per_round",
    "model_stats",
    "markdown_table",
    "format_report",
]


@torch.no_grad()
def sparsity_report(model: nn.Module, modules: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
    """Per-layer and total sparsity of the effective (masked) weights.

    ``layers`` lists every Linear/Conv2d (pruned or not) unless ``modules`` restricts it; ``total`` sums the
    pruned (masked) layers; ``model`` counts every parameter of the model.
    """
    layers: dict[str, dict[str, Any]] = {}
    items = (
        modules.items()
        if modules is not None
        else ((fqn, m) for fqn, m in model.named_modules() if fqn and isinstance(m, PRUNABLE_TYPES))
    )
    tot_p = tot_nz = 0
    for fqn, m in items:
        w = effective_weight(m)
        numel, nnz = w.numel(), int((w != 0).sum())
        masked = is_masked(m)
        layers[fqn] = {
            "shape": list(w.shape),
            "params": numel,
            "nonzeros": nnz,
            "sparsity": 1.0 - nnz / numel if numel else 0.0,
            "masked": masked,
            "kernel": "2:4" if type(m.weight).__name__.startswith("SparseSemiStructured") else "dense",
        }
        if masked or layers[fqn]["kernel"] == "2:4":
            tot_p += numel
            tot_nz += nnz
    model_p = model_nz = 0
    for _, t in effective_parameters(model):
        model_p += t.numel()
        model_nz += int((t != 0).sum())
    return {
        "layers": layers,
        "total": {"params": tot_p, "nonzeros": tot_nz, "sparsity": 1.0 - tot_nz / tot_p if tot_p else 0.0},
        "model": {"params": model_p, "nonzeros": model_nz, "sparsity": 1.0 - model_nz / model_p if model_p else 0.0},
    }


def effective_parameters(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    """Every parameter of the model as the forward sees it (masked weights, not their originals)."""
    for mod_name, mod in model.named_modules():
        if ".parametrizations." in f".{mod_name}.":
            continue  # originals live here; the parametrized module yields the effective tensor instead
        params = dict(mod.named_parameters(recurse=False))
        if parametrize.is_parametrized(mod):
            for pname in mod.parametrizations.keys():
                yield f"{mod_name}.{pname}".lstrip("."), getattr(mod, pname)
        for pname, p in params.items():
            if pname == "weight" and isinstance(mod, PRUNABLE_TYPES):
                p = effective_weight(mod)
            yield f"{mod_name}.{pname}".lstrip("."), p


def count_params(model: nn.Module) -> int:
    """Parameters the forward uses (a masked weight counts once, at its full size)."""
    return sum(t.numel() for _, t in effective_parameters(model))


@torch.no_grad()
def count_nonzeros(model: nn.Module) -> int:
    return sum(int((t != 0).sum()) for _, t in effective_parameters(model))


@torch.no_grad()
def count_flops(model: nn.Module, example: Tensor) -> int:
    """FLOPs of one forward on ``example`` counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matmul/conv/attention FLOPs; a multiply-add counts 2). Masked weights are counted dense."""
    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was)
    return int(counter.get_total_flops())


@torch.no_grad()
def count_sparse_flops(model: nn.Module, example: Tensor) -> dict[str, int]:
    """Dense FLOPs and the FLOPs left if zero weights were skipped (``dense - 2 * rows * zeros`` for every
    Linear/Conv2d, masked or made permanent). The second number is what a perfect sparse kernel would do;
    it is not a measured speedup."""
    dense = count_flops(model, example)
    rows: dict[nn.Module, int] = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):

            def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
                per = out.shape[-1] if isinstance(mod, nn.Linear) else out.shape[1]
                rows[mod] = rows.get(mod, 0) + out.numel() // per

            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    saved = 0
    for m, r in rows.items():
        w = effective_weight(m)
        saved += 2 * r * int((w == 0).sum())  # each weight entry is one multiply-add per output row/position
    return {"flops": dense, "effective_flops": max(dense - saved, 0)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(model: nn.Module, example: Tensor, warmup: int = 3, iters: int = 10) -> dict[str, float]:
    """Wall-clock forward latency on ``example``'s device (eval mode, no grad): median/mean ms and images/s."""
    was = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(example)
        _sync(example.device)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model(example)
            _sync(example.device)
            times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        model.train(was)
    med = statistics.median(times)
    return {
        "median_ms": med,
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "images_per_s": example.shape[0] / (med / 1000.0),
        "batch": int(example.shape[0]),
        "iters": iters,
    }


def compare_latency(
    models: Mapping[str, nn.Module], example: Tensor, warmup: int = 3, iters: int = 10, rounds: int = 5
) -> dict[str, dict[str, Any]]:
    """Latency of several models measured side by side: warm every model up, then alternate them over
    ``rounds`` (the order reversed every other round) so machine noise hits all of them alike. Per model:
    the median over rounds of each round's median (``median_ms``), the spread (``min_ms``/``max_ms`` of the
    round medians) and the round medians themselves (``round_ms``, for per-round ratios)."""
    rounds = max(1, min(rounds, iters))
    per = max(1, iters // rounds)
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        measure_latency(m, example, warmup=warmup, iters=1)
    for r in range(rounds):
        for k in list(models) if r % 2 == 0 else list(reversed(models)):
            times[k].append(measure_latency(models[k], example, warmup=0, iters=per)["median_ms"])
    out = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = {
            "median_ms": med,
            "mean_ms": statistics.fmean(ts),
            "min_ms": min(ts),
            "max_ms": max(ts),
            "round_ms": ts,
            "images_per_s": example.shape[0] / (med / 1000.0),
            "batch": int(example.shape[0]),
            "iters": per * rounds,
            "rounds": rounds,
            "threads": torch.get_num_threads(),
        }
    return out


def speedup_per_round(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, float]:
    """``before``/``after`` latency ratio of each interleaved round (from :func:`compare_latency`): median and
    range, so one noisy round cannot make the speed-up."""
    ratios = [b / a for b, a in zip(before["round_ms"], after["round_ms"]) if a > 0]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def model_stats(
    model: nn.Module, example: Tensor, latency: bool = True, warmup: int = 3, iters: int = 10
) -> dict[str, Any]:
    """Params, nonzeros, dense and effective FLOPs and (optionally) latency, in one dict."""
    stats: dict[str, Any] = {"params": count_params(model), "nonzeros": count_nonzeros(model)}
    try:
        stats.update(count_sparse_flops(model, example))
    except Exception as exc:  # noqa: BLE001 - e.g. a tensor subclass FlopCounterMode cannot trace
        stats.update(flops=None, effective_flops=None, flops_error=f"{type(exc).__name__}: {exc}"[:200])
    if latency:
        stats["latency"] = measure_latency(model, example, warmup, iters)
    return stats


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    if isinstance(v, int) and abs(v) >= 10**6:
        return f"{v / 1e6:.2f}M" if abs(v) < 10**9 else f"{v / 1e9:.2f}G"
    return "-" if v is None else str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (floats to 4 significant digits, big ints as M/G)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def format_report(report: Mapping[str, Any]) -> str:
    """A readable text report of a ``prune_`` report (optionally with ``before``/``after`` model stats)."""
    out = [f"method: {report.get('method', '?')}"]
    if "before" in report and "after" in report:
        keys = ["params", "nonzeros", "flops", "effective_flops"]
        rows = [{"": k, "before": report["before"].get(k), "after": report["after"].get(k)} for k in keys]
        for name in ("latency",):
            b, a = report["before"].get(name), report["after"].get(name)
            if b and a:
                rows.append({"": "latency_ms (median)", "before": b["median_ms"], "after": a["median_ms"]})
                rows.append({"": "speedup", "before": 1.0, "after": b["median_ms"] / a["median_ms"]})
        for k in ("val_acc", "val_loss"):
            if k in report["before"] or k in report["after"]:
                rows.append({"": k, "before": report["before"].get(k), "after": report["after"].get(k)})
        out += ["", markdown_table(rows, ["", "before", "after"])]
    layers = report.get("layers") or {}
    if layers:
        cols = ["layer", "shape", "params", "nonzeros", "sparsity", "kernel"]
        rows = [{"layer": k, **{c: v.get(c) for c in cols[1:]}} for k, v in layers.items()]
        for r in rows:
            r["shape"] = "x".join(map(str, r["shape"])) if r["shape"] else "-"
            r["params"] = str(r["params"])
            r["nonzeros"] = str(r["nonzeros"])
        out += ["", markdown_table(rows, cols)]
    if "total" in report:
        t = report["total"]
        out.append(f"\npruned layers: {t['nonzeros']}/{t['params']} nonzero, sparsity {t['sparsity']:.4f}")
    whole = report.get("model_sparsity", report.get("model"))
    if isinstance(whole, Mapping):
        t = whole
        out.append(f"whole model:   {t['nonzeros']}/{t['params']} nonzero, sparsity {t['sparsity']:.4f}")
    for k, v in (report.get("skipped") or {}).items():
        out.append(f"skipped {k}: {v}")
    for n in report.get("notes") or []:
        out.append(f"note: {n}")
    return "\n".join(out)
