"""CPU inference throughput of a structurally thinned ViT vs the dense one, measured side by side.

Dense and thinned copies (heads and MLP neurons removed at each ratio) of the same model are timed in
interleaved repeats under ``torch.inference_mode`` so machine noise hits all of them alike; the median
images/s per variant and its ratio to dense are reported with params and FLOPs (``torch.utils.flop_counter``).

Full run (the README numbers)::

    python benchmarks/pruning_structured.py
    # = --model vit_small_patch16_224 --img-size 224 --batch 32 --ratios 0.25 0.5 --repeats 7 --iters 2

Smoke run::

    python benchmarks/pruning_structured.py --quick

Columns: ``speedup`` is the ratio of median wall-clock images/s (what the target is about), with the range of
per-round paired ratios; ``CPU-time speedup`` uses process CPU time, a cross-check on a shared machine.

Target: >= 1.8x dense throughput with 50% of heads and 50% of MLP neurons removed.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks._common import add_harness_args, args_dict, out_path, write_results  # noqa: E402
from pruning import StructuredConfig, get_widths, prune_structured  # noqa: E402

TARGET = 1.8


def count_flops(model: nn.Module, img_size: int) -> int:
    """FLOPs of one image. Counted on the unfused attention path: FlopCounterMode does not see the CPU
    scaled_dot_product_attention kernel, and the math path does the same matmuls."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        m(torch.randn(1, 3, img_size, img_size))
    return int(counter.get_total_flops())


def time_batches(model: nn.Module, x: torch.Tensor, iters: int) -> tuple[float, float]:
    """(images per wall-clock second, images per process CPU-second) over ``iters`` forward passes.

    The CPU-time rate is less sensitive to other processes on a shared machine (it still counts the
    work of every intra-op thread); the wall-clock rate is the throughput a user sees.
    """
    with torch.inference_mode():
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(iters):
            model(x)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    n = iters * x.shape[0]
    return n / dt, n / max(dc, 1e-9)


def summarise_widths(widths: dict) -> str:
    heads = sorted({w["heads"] for w in widths.values()})
    mlp = sorted({w["mlp"] for w in widths.values()})
    fmt = lambda v: str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"  # noqa: E731
    return f"{fmt(heads)} / {fmt(mlp)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.25, 0.5],
        help="fractions of heads and MLP neurons removed (one thinned variant each)",
    )
    p.add_argument(
        "--importance",
        default="magnitude",
        choices=["magnitude"],
        help="random-init weights: only magnitude (speed does not depend on which groups go)",
    )
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds; the median is reported")
    p.add_argument("--iters", type=int, default=2, help="forward passes per variant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward passes per variant")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    add_harness_args(p, "pruning_structured", quick="smoke run: batch 4, 3 rounds of 1 pass")
    args = p.parse_args(argv)
    md: list[str] = []

    def emit(text: str = "", **kw) -> None:  # a line of the report: printed now, written to the .md at the end
        print(text, **kw)
        md.append(text)

    if args.quick:
        args.batch, args.repeats, args.iters = 4, 3, 1
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads: expected an int >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for r in args.ratios:
        if not 0 < r < 1:
            p.error(f"--ratios: expected fractions in (0, 1), got {r}")

    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    variants: dict[str, nn.Module] = {"dense": dense}
    for r in args.ratios:
        m = copy.deepcopy(dense)
        prune_structured(m, StructuredConfig(heads=r, mlp=r, importance=args.importance, round_to=args.round_to))
        variants[f"-{r:.0%} heads & MLP"] = m

    info = {}
    for name, m in variants.items():
        info[name] = {
            "params": sum(p.numel() for p in m.parameters()),
            "flops_per_img": count_flops(m, args.img_size),
            "widths": summarise_widths(get_widths(m)),
            "ratio": 0.0 if name == "dense" else float(name[1:].split("%")[0]) / 100,
        }

    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    for m in variants.values():
        with torch.inference_mode():
            for _ in range(args.warmup):
                m(x)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    cpu_samples: dict[str, list[float]] = {k: [] for k in variants}
    for rnd in range(args.repeats):
        order = list(variants) if rnd % 2 == 0 else list(reversed(variants))  # alternate order against drift
        for name in order:
            wall, cpu = time_batches(variants[name], x, args.iters)
            samples[name].append(wall)
            cpu_samples[name].append(cpu)

    dense_ips = statistics.median(samples["dense"])
    dense_cpu = statistics.median(cpu_samples["dense"])
    rows = []
    for name in variants:
        ips = statistics.median(samples[name])
        cpu_ips = statistics.median(cpu_samples[name])
        # per-round ratios (paired within one round) show the spread the noise leaves
        paired = [s / d for s, d in zip(samples[name], samples["dense"])]
        rows.append(
            {
                "variant": name,
                **info[name],
                "img_per_s": ips,
                "img_per_s_all": samples[name],
                "speedup": ips / dense_ips,
                "speedup_paired_min": min(paired),
                "speedup_paired_max": max(paired),
                "img_per_cpu_s": cpu_ips,
                "img_per_cpu_s_all": cpu_samples[name],
                "cpu_speedup": cpu_ips / dense_cpu,
                "flop_ratio": info["dense"]["flops_per_img"] / info[name]["flops_per_img"],
                "param_ratio": info["dense"]["params"] / info[name]["params"],
            }
        )

    emit(
        f"\n{args.model} @ {args.img_size}px, batch {args.batch}, CPU, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved rounds x {args.iters} passes\n"
    )
    emit(
        "| variant | heads / MLP per block | params (M) | GFLOPs/img | img/s | speedup (paired range) "
        "| CPU-time speedup | FLOP ratio |"
    )
    emit("|---|---|---|---|---|---|---|---|")
    for r in rows:
        emit(
            f"| {r['variant']} | {r['widths']} | {r['params'] / 1e6:.2f} | {r['flops_per_img'] / 1e9:.2f} | "
            f"{r['img_per_s']:.1f} | {r['speedup']:.2f}x ({r['speedup_paired_min']:.2f}-"
            f"{r['speedup_paired_max']:.2f}) | {r['cpu_speedup']:.2f}x | {r['flop_ratio']:.2f}x |"
        )
    half = [r for r in rows if abs(r["ratio"] - 0.5) < 1e-9]
    verdict = None
    if half:
        verdict = half[0]["speedup"] >= TARGET
        emit(f"\ntarget >= {TARGET}x at 50%: {'met' if verdict else 'NOT met'} ({half[0]['speedup']:.2f}x)")

    result = {
        "benchmark": "pruning_structured",
        "args": args_dict(args),
        "env": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "rows": rows,
        "target": TARGET,
        "target_met_at_50pct": verdict,
    }
    write_results(out_path(args), result, "\n".join(md), quick=args.quick, echo=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
