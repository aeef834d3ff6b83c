"""Plan per-block activation checkpointing / offload and FSDP2 resharding under a memory budget.

Profiles the config's model (per-block time and memory under each option, parameter/gradient/optimizer
memory, communication) at the config's per-rank batch size, then solves for the fastest plan whose
predicted peak memory per rank fits the budget. Prints one row per block and writes the plan JSON that
`parallel.mode: auto` with `parallel.plan: FILE` applies.

examples:
  lotus plan --config configs/cifar10_vit_b.yaml --memory-budget 8GiB --world-size 4 --out plan.json
  torchrun --nproc_per_node 4 -m lotus train --config configs/cifar10_vit_b.yaml \\
      --set parallel.mode=auto --set parallel.plan=plan.json
  lotus plan --config configs/digits.yaml --memory-budget 200MiB --save-profile prof.json
  lotus plan --profile prof.json --memory-budget 150MiB      # re-plan from a saved profile, no model run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from lotus.config import load_config
from lotus.errors import LotusError
from lotus.parallel.config import format_bytes, parse_bandwidth, parse_bytes

__all__ = ["add_arguments", "run"]

_DATA_SHAPES = {  # (classes, channels) without loading the data
    "digits": (10, 1),
    "mnist": (10, 1),
    "fashion_mnist": (10, 1),
    "cifar10": (10, 3),
    "cifar100": (100, 3),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config of the training run to plan")
    p.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable), e.g. --set data.batch_size=128",
    )
    p.add_argument(
        "--memory-budget",
        "-m",
        metavar="SIZE",
        help="memory per rank, e.g. 8GiB, 512MiB, 1.5GB (default: parallel.memory_budget)",
    )
    p.add_argument(
        "--world-size",
        "-w",
        type=int,
        metavar="N",
        help="number of data-parallel ranks to plan for (default 1, or the torchrun world size)",
    )
    p.add_argument("--batch-size", "-b", type=int, metavar="N", help="per-rank batch size (default data.batch_size)")
    p.add_argument(
        "--mode",
        choices=["auto", "ddp", "fsdp"],
        default=None,
        help="data-parallel mode to consider (default: parallel.mode if ddp/fsdp, else both)",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=None, help="device to profile on (default train.device)"
    )
    p.add_argument(
        "--bandwidth",
        metavar="RATE",
        help="interconnect bandwidth for the communication model, e.g. 25GB/s (default: measured under "
        "torchrun, else parallel.bandwidth or a device default)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="timed repetitions per block and option (default parallel.profile_repeats)",
    )
    p.add_argument("--method", choices=["dp", "greedy"], default="dp", help="solver (default: dynamic programme)")
    p.add_argument("--out", "-o", metavar="FILE", help="write the plan JSON here")
    p.add_argument("--save-profile", metavar="FILE", help="also write the measured cost table (JSON)")
    p.add_argument("--profile", metavar="FILE", help="plan from a cost table saved with --save-profile (no profiling)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise LotusError(f"{name}: expected an integer >= 1, got {value}")


def _user_value(parse, text: str, flag: str) -> int | float:
    """``parse(text, flag)`` with its ValueError (which names ``flag``) as a LotusError."""
    try:
        return parse(text, flag)
    except ValueError as e:
        raise LotusError(str(e)) from None


def _data_shape(cfg) -> tuple[int, int]:
    classes, chans = _DATA_SHAPES.get(cfg.data.name, (None, None))
    if cfg.data.name == "imagefolder":
        train = os.path.join(cfg.data.root, "train")
        if os.path.isdir(train):
            classes = len([d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d))]) or None
        chans = 3
    classes = cfg.model.num_classes or classes
    if classes is None:
        raise LotusError(
            f"model.num_classes: cannot tell the number of classes of {cfg.data.root!r} without the "
            "data; set model.num_classes"
        )
    return classes, cfg.model.in_chans or chans


def _profile_from_config(cfg, args, world_size: int, device_name: str):
    """Build the config's model (no weights) and profile it at the per-rank batch size."""
    import torch

    from lotus.models import create_model, resolve_img_size
    from lotus.optim import build_optimizer
    from lotus.parallel.profiler import _vit_parts, profile_model
    from lotus.parallel.strategies import transformer_blocks

    classes, chans = _data_shape(cfg)
    img = resolve_img_size(cfg.model)
    # Weights do not change costs: never download or load them for planning.
    model_cfg = dataclasses.replace(cfg.model, pretrained=False, checkpoint=None)
    model = create_model(model_cfg, classes, chans, img)
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise LotusError("--device: cuda requested but no CUDA device is available")
    device = torch.device("cuda", torch.cuda.current_device()) if device_name == "cuda" else torch.device("cpu")
    amp = cfg.train.amp
    autocast = (
        torch.bfloat16
        if (amp == "bf16" or (amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()))
        else None
    )
    bw = None
    if args.bandwidth:
        bw = _user_value(parse_bandwidth, args.bandwidth, "--bandwidth")
    elif cfg.parallel.bandwidth:
        bw = cfg.parallel.bandwidth_bytes_per_s
    batch = args.batch_size or cfg.data.batch_size
    try:  # the profiler times a timm ViT block by block: refuse other models by name
        transformer_blocks(model)
        _vit_parts(model)
    except ValueError as e:
        raise LotusError(f"model.name: cannot plan {cfg.model.name}: {str(e).splitlines()[0]}") from None
    return profile_model(
        model,
        batch,
        img_size=img,
        in_chans=chans,
        device=device,
        world_size=world_size,
        repeats=args.repeats or cfg.parallel.profile_repeats,
        build_optimizer=lambda m: build_optimizer(cfg.optim, m),
        mixed_precision=cfg.parallel.mixed_precision,
        autocast_dtype=autocast,
        bandwidth=bw,
        cpu_offload=cfg.parallel.cpu_offload,
        meta={"config": args.config, "model_name": cfg.model.name, "img_size": img, "amp": str(autocast)},
    )


def run(args: argparse.Namespace) -> int:
    """Profile (or load a profile), solve, print the plan against uniform baselines, write it."""
    # torch and the planner: imported when the command runs, not when the CLI starts
    from lotus.parallel.cost_model import evaluate
    from lotus.parallel.cost_table import CostTable
    from lotus.parallel.plan_file import plan_table, uniform_choices, write_plan
    from lotus.parallel.planner import make_plan
    from lotus.parallel.runtime import destroy, init_distributed, launched_by_torchrun
    from lotus.safe_io import atomic_write_text

    if bool(args.config) == bool(args.profile):
        raise LotusError("plan: pass exactly one of --config FILE or --profile FILE")
    _positive("--world-size", args.world_size)
    _positive("--batch-size", args.batch_size)
    _positive("--repeats", args.repeats)
    cfg = None
    if args.config:
        cfg = load_config(args.config, args.set)
    elif args.set:
        raise LotusError("--set: only used with --config")
    budget_text = args.memory_budget or (cfg.parallel.memory_budget if cfg is not None else None)
    if budget_text is None:
        raise LotusError("--memory-budget: required (e.g. --memory-budget 8GiB), or set parallel.memory_budget")
    budget = _user_value(
        parse_bytes, budget_text, "--memory-budget" if args.memory_budget else "parallel.memory_budget"
    )
    is_main = True
    if args.profile:
        if not os.path.isfile(args.profile):
            raise LotusError(f"--profile: {args.profile} not found")
        try:
            with open(args.profile) as f:
                table = CostTable.from_dict(json.load(f))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
            raise LotusError(
                f"--profile: {args.profile} is not a cost table from --save-profile "
                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from None
        if args.world_size and args.world_size != table.world_size:
            raise LotusError(
                f"--world-size: the profile {args.profile} was measured for world size "
                f"{table.world_size}; re-profile with --config for {args.world_size}"
            )
    else:
        device_name = args.device or cfg.train.device
        world = args.world_size or 1
        if launched_by_torchrun():
            info = init_distributed(device_name, cfg.parallel.backend)
            if args.world_size and args.world_size != info.world_size:
                raise LotusError(f"--world-size: {args.world_size} but torchrun started {info.world_size} ranks")
            world, is_main = info.world_size, info.is_main
            device_name = info.device.type
        try:
            table = _profile_from_config(cfg, args, world, device_name)
        finally:
            if launched_by_torchrun():
                destroy()
    if not is_main:
        return 0
    if args.save_profile:
        atomic_write_text(args.save_profile, json.dumps(table.to_dict(), indent=1) + "\n")
    if args.mode in ("ddp", "fsdp"):
        modes = [args.mode]
    elif cfg is not None and cfg.parallel.mode in ("ddp", "fsdp") and args.mode is None:
        modes = [cfg.parallel.mode]
    else:
        modes = None
    if table.world_size <= 1:
        modes = ["none"]
    mixed = bool(cfg.parallel.mixed_precision) if cfg is not None else False
    buckets = cfg.parallel.planner_buckets if cfg is not None else 1024
    plan = make_plan(table, budget, modes=modes, method=args.method, buckets=buckets, mixed_precision=mixed)
    if args.out:
        write_plan(plan, args.out)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    print(plan_table(plan))
    print()
    print("| plan | predicted peak / rank | fits | predicted step (ms) | vs plan |")
    print("|---|---:|---|---:|---:|")
    rows = [("this plan", plan.mode, plan.blocks)]
    suffix = " (reshard after forward)" if plan.mode == "fsdp" else ""
    for label, mem in (("no checkpointing", "none"), ("checkpoint every block", "full")):
        rows.append((label + suffix, plan.mode, uniform_choices(table.num_blocks, mem, True)))
    for label, mode, choices in rows:
        p = evaluate(table, mode, choices)
        fits = "yes" if p.peak_bytes <= budget else "no"
        print(
            f"| {label} | {format_bytes(p.peak_bytes)} | {fits} | {p.step_time_s * 1e3:.1f} | "
            f"{p.step_time_s / plan.predicted_step_time_s:.2f}x |"
        )
    if args.out:
        print(
            f"\nwrote {args.out}: train with --set parallel.mode=auto --set parallel.plan={args.out}", file=sys.stdout
        )
    return 0
