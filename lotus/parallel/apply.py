"""Turn the ``parallel:`` config (or a plan file) into a wrapped model: one entry point for the Trainer."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
import torch.distributed as tdist
import torch.nn as nn

from lotus.errors import LotusError
from lotus.parallel.config import ParallelConfig
from lotus.parallel.plan_file import BlockChoice, Plan, read_plan
from lotus.parallel.planner import PlanInfeasible, make_plan
from lotus.parallel.profiler import profile_model
from lotus.parallel.runtime import DistInfo, single_process_mesh
from lotus.parallel.strategies import apply_ddp, apply_fsdp, transformer_blocks, wrap_block

__all__ = ["parallelize", "resolve_plan", "get_plan", "PLAN_ATTR"]

PLAN_ATTR = "lotus_parallel_plan"


def get_plan(model: nn.Module) -> Plan | None:
    """The :class:`Plan` that :func:`parallelize` applied to ``model`` (None for a plain model)."""
    return getattr(model, PLAN_ATTR, None)


def _uniform_plan(cfg: ParallelConfig, n: int, world_size: int) -> Plan:
    """The plan of modes none/ddp/fsdp: the config's one memory option on its chosen blocks."""
    chosen = set(range(n)) if cfg.blocks is None else set(cfg.blocks)
    bad = sorted(b for b in chosen if b >= n)
    if bad:
        raise LotusError(f"parallel.blocks: block {bad[0]} does not exist; the model has {n} blocks (0..{n - 1})")
    mem = (
        cfg.activation_checkpoint
        if cfg.activation_checkpoint != "none"
        else ("offload" if cfg.offload_activations else "none")
    )
    blocks = [BlockChoice(mem if i in chosen else "none", cfg.reshard_after_forward) for i in range(n)]
    return Plan(mode=cfg.mode, world_size=world_size, blocks=blocks)


def resolve_plan(
    model: nn.Module,
    cfg: ParallelConfig,
    dist: DistInfo,
    *,
    batch_size: int | None = None,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Plan:
    """The per-block plan for this run: uniform from the config, read from ``parallel.plan``, or (mode
    auto with ``memory_budget``) profiled and solved now (rank 0 solves, every rank gets its plan)."""
    n = len(transformer_blocks(model))
    if cfg.mode != "auto":
        return _uniform_plan(cfg, n, dist.world_size)
    uniform = [
        k
        for k, on in (
            ("activation_checkpoint", cfg.activation_checkpoint != "none"),
            ("offload_activations", cfg.offload_activations),
            ("blocks", cfg.blocks is not None),
        )
        if on
    ]
    if uniform and dist.is_main:
        warnings.warn(
            f"parallel.{uniform[0]}: ignored with parallel.mode auto (the plan chooses per block)", stacklevel=2
        )
    if cfg.plan is not None:
        plan = read_plan(cfg.plan, n)
        if plan.world_size != dist.world_size:
            warnings.warn(
                f"parallel.plan: {cfg.plan} was planned for world size {plan.world_size}, running on "
                f"{dist.world_size}; its memory and time predictions do not apply",
                stacklevel=2,
            )
        if plan.mode == "none" and dist.world_size > 1:
            raise LotusError(
                f"parallel.plan: {cfg.plan} is a single-process plan (mode none) but {dist.world_size} "
                "ranks are running; re-plan with `lotus plan --world-size N`"
            )
        return plan
    if batch_size is None:
        raise LotusError(
            "parallel.memory_budget: planning at start-up needs the per-rank batch size; "
            "write a plan with `lotus plan --config C --out plan.json` and set parallel.plan"
        )
    table = profile_model(
        model,
        batch_size,
        device=dist.device,
        world_size=dist.world_size,
        repeats=cfg.profile_repeats,
        build_optimizer=build_optimizer,
        mixed_precision=cfg.mixed_precision,
        autocast_dtype=autocast_dtype,
        bandwidth=cfg.bandwidth_bytes_per_s,
        cpu_offload=cfg.cpu_offload,
    )
    plan: Plan | None = None
    error: str | None = None
    if dist.is_main:
        try:
            plan = make_plan(table, cfg.budget_bytes, buckets=cfg.planner_buckets, mixed_precision=cfg.mixed_precision)
        except PlanInfeasible as e:
            error = str(e)
    if dist.world_size > 1:
        box = [plan, error]
        tdist.broadcast_object_list(box, src=0)
        plan, error = box
    if error is not None:
        raise LotusError(f"parallel.memory_budget: {error}")
    assert plan is not None
    return plan


def _check_device(cfg: ParallelConfig, plan: Plan, device: torch.device) -> None:
    """Refuse CUDA-only options on a CPU device, with the setting to change."""
    if device.type == "cuda":
        return
    if cfg.cpu_offload:
        raise LotusError("parallel.cpu_offload: needs CUDA devices (on CPU, parameters already live in host memory)")
    if cfg.mixed_precision:
        raise LotusError("parallel.mixed_precision: needs CUDA devices (bf16 FSDP2 compute); on CPU use train.amp")
    if any(c.offload for c in plan.blocks):
        src = "parallel.plan" if cfg.mode == "auto" else "parallel.offload_activations"
        raise LotusError(
            f"{src}: activation offload needs a CUDA device (on CPU, activations already live in host memory)"
        )


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    dist: DistInfo,
    *,
    batch_size: int | None = None,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    autocast_dtype: torch.dtype | None = None,
    plan: Plan | None = None,
    replan: bool = False,
) -> nn.Module:
    """Apply the run's plan to ``model`` (a timm ViT already on ``dist.device``) and return the model to
    train: per-block checkpointing/offload wrappers, then FSDP2 (``fully_shard`` per block and root) or
    DDP. Call it before building the optimizer. With one rank DDP/FSDP are skipped (nothing to shard
    or synchronise) and only the memory options apply, except that FSDP2 with ``cpu_offload`` or
    ``mixed_precision`` runs on a one-rank group (CPU offload of parameters and optimizer state on one GPU).

    Keyword arguments are only needed for ``mode: auto`` with ``memory_budget`` (planning at start-up):
    the per-rank batch size, the optimizer the Trainer will build, and the autocast dtype it uses.
    ``plan`` applies a given plan instead (a model rebuilt with unchanged shapes keeps its plan);
    ``replan`` solves mode auto with ``memory_budget`` anew even when ``parallel.plan`` names a file
    (after structured thinning, the file's plan was made for the old widths).
    """
    device = dist.device if dist.device is not None else next(model.parameters()).device
    try:  # per-block plans need a ViT's block list
        transformer_blocks(model)
    except ValueError as e:
        raise LotusError(f"parallel.mode: {cfg.mode} is not supported for this model: {e}") from None
    if dist.world_size > 1 and cfg.mode == "none":
        raise LotusError(
            f"parallel.mode: 'none' with {dist.world_size} ranks would train {dist.world_size} "
            "independent models; set parallel.mode to ddp, fsdp or auto"
        )
    if dist.world_size > 1 and dist.mesh is None and cfg.mode in ("fsdp", "auto"):
        raise LotusError("parallel.mode: FSDP needs the device mesh from lotus.parallel.init_distributed()")
    if plan is None:
        solve = dataclasses.replace(cfg, plan=None) if replan and cfg.memory_budget is not None else cfg
        plan = resolve_plan(
            model, solve, dist, batch_size=batch_size, build_optimizer=build_optimizer, autocast_dtype=autocast_dtype
        )
    else:
        plan = dataclasses.replace(plan)  # parallelize sets its mode below
    _check_device(cfg, plan, device)
    seq = transformer_blocks(model)
    for i, choice in enumerate(plan.blocks):
        if choice.memory != "none":
            seq[i] = wrap_block(seq[i], ac=choice.ac, offload=choice.offload)
    mode = plan.mode if cfg.mode == "auto" else cfg.mode
    if dist.world_size > 1:
        if mode == "ddp":
            model = apply_ddp(model, device)
        elif mode == "fsdp":
            model = apply_fsdp(
                model,
                dist.mesh,
                [c.reshard_after_forward for c in plan.blocks],
                cpu_offload=cfg.cpu_offload,
                mixed_precision=cfg.mixed_precision,
            )
    elif mode == "fsdp" and (cfg.cpu_offload or cfg.mixed_precision):
        # One process: nothing to shard, but FSDP2's CPU offload / bf16 policies still apply.
        model = apply_fsdp(
            model,
            single_process_mesh(device),
            [c.reshard_after_forward for c in plan.blocks],
            cpu_offload=cfg.cpu_offload,
            mixed_precision=cfg.mixed_precision,
        )
    plan.mode = mode
    setattr(model, PLAN_ATTR, plan)
    return model
