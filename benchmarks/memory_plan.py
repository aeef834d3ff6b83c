"""Memory planner benchmark: per-block checkpointing plan under a budget vs no / uniform checkpointing.

For a ViT (default ViT-S/16 at 224 px, batch 16, one process) this script

1. profiles the model (per-block time and memory for none / selective / full checkpointing, plus
   offload on CUDA) and sets a per-rank memory budget below what training without checkpointing needs
   (by default half-way between the least memory any plan needs and the no-checkpointing peak; see
   ``--budget-frac``, or give ``--budget``);
2. solves the plan (dynamic programme) and trains real steps, side by side and interleaved, with
   (a) no checkpointing (unconstrained), (b) the plan, (c) checkpointing every block: measured peak
   memory (allocator: CPU profiler memory events / CUDA memory stats) and step time (forward+backward
   and the optimizer step timed separately, medians of round-robin repeats) vs the predictions;
   AdamW uses the fused kernel where available, in the profile and the measured steps alike;
3. finds the largest batch that fits the same budget without optimisation and with a plan (cost table
   scaled linearly in the batch) and verifies both by measuring a real step at that batch.

Targets (issue 7): the plan fits the budget, its step time is <= 1.25x the unconstrained step and below
checkpoint-every-block; predicted peak memory within 15% of measured.

  python benchmarks/memory_plan.py                     # full CPU run (ViT-S/16, 224 px, batch 16)
  python benchmarks/memory_plan.py --quick             # smoke run (small ViT, seconds)
  python benchmarks/memory_plan.py --model vit_base_patch16_224 --batch 8

Writes ``--out``.json and the markdown table as ``--out``.md (benchmarks/_common.py) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks._common import add_harness_args, out_path, write_results  # noqa: E402
from lotus.parallel.config import format_bytes, parse_bytes  # noqa: E402
from lotus.parallel.cost_model import evaluate  # noqa: E402
from lotus.parallel.cost_table import scale_batch  # noqa: E402
from lotus.parallel.measure import measure_training_step, use_clock  # noqa: E402
from lotus.parallel.measure import now as _now  # noqa: E402
from lotus.parallel.plan_file import uniform_choices  # noqa: E402
from lotus.parallel.planner import PlanInfeasible, make_plan, minimum_memory  # noqa: E402
from lotus.parallel.profiler import profile_model  # noqa: E402
from lotus.parallel.strategies import wrap_block  # noqa: E402

QUICK = {"model": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "depth": 4, "batch": 16, "repeats": 2}
FULL = {"model": "vit_small_patch16_224", "img_size": 224, "patch_size": None, "depth": None, "batch": 16, "repeats": 3}


def build_model(args):
    import timm

    torch.manual_seed(0)
    kw = {"pretrained": False, "num_classes": 10, "img_size": args.img_size}
    if args.depth:
        kw["depth"] = args.depth
    if args.patch_size:
        kw["patch_size"] = args.patch_size
    return timm.create_model(args.model, **kw)


def make_optimizer(model):
    """AdamW as training uses it; the fused kernel where the device supports it (much less time noise)."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4)


def apply_choices(model, choices):
    for i, c in enumerate(choices):
        if c.memory != "none":
            model.blocks[i] = wrap_block(model.blocks[i], ac=c.ac, offload=c.offload)
    return model


def batch_of(n, img, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, img, img, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device))


def summarize(choices) -> str:
    counts = {}
    for c in choices:
        counts[c.memory] = counts.get(c.memory, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


def measure_configs(args, configs, device, autocast):
    """Memory of each configuration, then step times interleaved round-robin (fair on a noisy machine)."""
    runs = []
    for name, choices in configs:
        model = apply_choices(build_model(args).to(device), choices)
        opt = make_optimizer(model)
        x, y = batch_of(args.batch, args.img_size, device)
        m = measure_training_step(model, x, y, opt, repeats=1, autocast_dtype=autocast)
        runs.append({"name": name, "model": model, "opt": opt, "x": x, "y": y, "mem": m, "times": [m.step_time_s]})

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for r in runs:
        r["fb"], r["os"] = [], []
    for _ in range(args.repeats):
        for r in runs:  # round-robin: every configuration sees the same machine conditions
            r["opt"].zero_grad(set_to_none=True)
            sync()
            t0 = _now()
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = torch.nn.functional.cross_entropy(r["model"](r["x"]).float(), r["y"])
            loss.backward()
            sync()
            t1 = _now()
            r["opt"].step()
            sync()
            r["fb"].append(t1 - t0)
            r["os"].append(_now() - t1)
    out = {}
    for r in runs:
        fb, os_ = statistics.median(r["fb"]), statistics.median(r["os"])
        out[r["name"]] = {
            "measured_peak_bytes": r["mem"].static_bytes + r["mem"].peak_bytes,
            "measured_static_bytes": r["mem"].static_bytes,
            "measured_activation_bytes": r["mem"].activation_bytes,
            "measured_fwd_bwd_s": fb,
            "measured_optimizer_s": os_,
            "measured_step_s": fb + os_,
            "fwd_bwd_times_s": r["fb"],
            "optimizer_times_s": r["os"],
        }
        del r["model"], r["opt"]
    return out


def max_batch(table, budget, planned: bool, limit: int = 4096) -> int:
    """Largest batch whose predicted peak fits (no optimisation, or the best plan)."""

    def fits(b):
        t = scale_batch(table, b)
        if planned:
            try:
                make_plan(t, budget)
                return True
            except PlanInfeasible:
                return False
        return evaluate(t, "none", uniform_choices(t.num_blocks, "none")).peak_bytes <= budget

    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def measure_at_batch(args, choices, batch, device, autocast) -> float:
    model = apply_choices(build_model(args).to(device), choices)
    opt = make_optimizer(model)
    x, y = batch_of(batch, args.img_size, device)
    m = measure_training_step(model, x, y, opt, repeats=1, autocast_dtype=autocast)
    return m.static_bytes + m.peak_bytes


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    autocast = torch.bfloat16 if args.bf16 else None
    t0 = time.perf_counter()
    table = profile_model(
        build_model(args),
        args.batch,
        device=device,
        repeats=args.repeats,
        autocast_dtype=autocast,
        build_optimizer=make_optimizer,
    )
    profile_s = time.perf_counter() - t0
    n = table.num_blocks
    unconstrained = uniform_choices(n, "none")
    every = uniform_choices(n, "full")
    pred_none = evaluate(table, "none", unconstrained)
    least = minimum_memory(table, "none")
    # Default budget: part-way from the least memory any plan needs to what no checkpointing needs.
    budget = parse_bytes(args.budget) if args.budget else least + args.budget_frac * (pred_none.peak_bytes - least)
    t0 = time.perf_counter()
    plan = make_plan(table, budget, buckets=args.buckets)
    solve_s = time.perf_counter() - t0
    configs = [
        ("no checkpointing (unconstrained)", unconstrained),
        ("plan (DP)", plan.blocks),
        ("checkpoint every block", every),
    ]
    measured = measure_configs(args, configs, device, autocast)
    rows = []
    base_time = measured[configs[0][0]]["measured_step_s"]
    for name, choices in configs:
        p = evaluate(table, "none", choices)
        m = measured[name]
        rows.append(
            {
                "configuration": name,
                "blocks": summarize(choices),
                "choices": [c.memory for c in choices],
                "predicted_peak_bytes": p.peak_bytes,
                **m,
                "peak_error": p.peak_bytes / m["measured_peak_bytes"] - 1,
                "predicted_activation_bytes": p.activation_bytes,
                "fits_budget_predicted": p.peak_bytes <= budget,
                "fits_budget_measured": m["measured_peak_bytes"] <= budget,
                "predicted_step_s": p.step_time_s,
                "time_vs_unconstrained": m["measured_step_s"] / base_time,
            }
        )
    plan_row, every_row = rows[1], rows[2]
    # Max batch under the same budget.
    mb_none = max_batch(table, budget, planned=False)
    mb_plan = max_batch(table, budget, planned=True)
    verify = {}
    if not args.skip_max_batch_verify:
        if mb_none > 0:
            verify["none_measured_peak_bytes"] = measure_at_batch(args, unconstrained, mb_none, device, autocast)
        if mb_plan > 0:
            big_plan = make_plan(scale_batch(table, mb_plan), budget, buckets=args.buckets)
            verify["plan_choices"] = [c.memory for c in big_plan.blocks]
            verify["plan_predicted_peak_bytes"] = big_plan.predicted_peak_bytes
            verify["plan_measured_peak_bytes"] = measure_at_batch(args, big_plan.blocks, mb_plan, device, autocast)
    targets = {
        "plan_fits_budget (measured)": plan_row["fits_budget_measured"],
        "plan_time_le_1.25x_unconstrained": plan_row["time_vs_unconstrained"] <= 1.25,
        "plan_faster_than_checkpoint_every_block": plan_row["measured_step_s"] < every_row["measured_step_s"],
        "predicted_peak_within_15pct": all(abs(r["peak_error"]) <= 0.15 for r in rows),
    }
    return {
        "env": {
            "torch": torch.__version__,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "args": vars(args),
        "num_blocks": n,
        "budget_bytes": budget,
        "min_memory_bytes": least,
        "profile_s": profile_s,
        "solve_s": solve_s,
        "rows": rows,
        "targets": targets,
        "max_batch": {
            "budget_bytes": budget,
            "no_optimisation": mb_none,
            "with_plan": mb_plan,
            "ratio": (mb_plan / mb_none) if mb_none else None,
            "verify": verify,
        },
        "cost_table": table.to_dict(),
    }


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [
        f"### Memory plan: {a['model']} ({res['num_blocks']} blocks), {a['img_size']} px, batch {a['batch']}, "
        f"{res['env']['device']}",
        "",
        f"Budget {format_bytes(res['budget_bytes'])} per rank (minimum possible "
        f"{format_bytes(res['min_memory_bytes'])}); profile {res['profile_s']:.1f} s, solve "
        f"{res['solve_s'] * 1e3:.0f} ms.",
        "",
        "| configuration | blocks | predicted peak | measured peak | error | fits | predicted step (s) | "
        "measured step (s) | of which fwd+bwd (s) | vs unconstrained |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['configuration']} | {r['blocks']} | {format_bytes(r['predicted_peak_bytes'])} | "
            f"{format_bytes(r['measured_peak_bytes'])} | {r['peak_error'] * 100:+.1f}% | "
            f"{'yes' if r['fits_budget_measured'] else 'no'} | {r['predicted_step_s']:.3f} | "
            f"{r['measured_step_s']:.3f} | {r['measured_fwd_bwd_s']:.3f} | {r['time_vs_unconstrained']:.2f}x |"
        )
    mb = res["max_batch"]
    v = mb["verify"]
    lines += [
        "",
        "| max batch under the budget | batch | measured peak at that batch |",
        "|---|---:|---:|",
        f"| no optimisation | {mb['no_optimisation']} | "
        f"{format_bytes(v['none_measured_peak_bytes']) if 'none_measured_peak_bytes' in v else '-'} |",
        f"| with a plan | {mb['with_plan']} | "
        f"{format_bytes(v['plan_measured_peak_bytes']) if 'plan_measured_peak_bytes' in v else '-'} |",
        "",
        f"Max-batch ratio (plan / no optimisation): {mb['ratio']:.2f}x"
        if mb["ratio"]
        else "Max-batch ratio: n/a (no batch fits without optimisation)",
        "",
        "| target | met |",
        "|---|---|",
    ]
    lines += [f"| {k} | {'yes' if ok else 'NO'} |" for k, ok in res["targets"].items()]
    return "\n".join(lines)


def parse_args(argv=None, defaults=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_harness_args(p, "memory_plan", quick="smoke run: ViT-Ti width, 4 blocks, 64 px, patch 8, batch 16")
    p.add_argument("--model", help="timm ViT name (default vit_small_patch16_224)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int, help="override the patch size")
    p.add_argument("--depth", type=int, help="override the number of blocks")
    p.add_argument("--batch", type=int, help="per-rank batch size")
    p.add_argument("--repeats", type=int, help="timed repetitions (profile and measured steps)")
    p.add_argument(
        "--budget-frac",
        type=float,
        default=0.5,
        help="budget = least possible peak + FRAC x (no-checkpointing peak - least) (default 0.5)",
    )
    p.add_argument("--budget", help="explicit budget instead, e.g. 3GiB")
    p.add_argument("--buckets", type=int, default=2048, help="planner memory buckets")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as lotus train does on CUDA)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="time with wall time (default) or process CPU time (steadier on a shared CPU; use with --threads 1)",
    )
    p.add_argument("--skip-max-batch-verify", action="store_true", help="do not measure steps at the max batch")
    if defaults:
        p.set_defaults(**defaults)
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if not 0 < args.budget_frac < 1 and not args.budget:
        p.error("--budget-frac: expected a fraction in (0, 1)")
    return args


def main(argv=None, defaults=None) -> int:
    args = parse_args(argv, defaults)
    if args.clock == "process" and args.device != "cpu":
        raise SystemExit("error: --clock process: only for --device cpu (CUDA work is asynchronous)")
    with use_clock(args.clock):
        res = run(args)
    write_results(out_path(args), res, markdown(res), quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
