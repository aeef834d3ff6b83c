"""Measure what the planner needs: per-block time and memory under each memory option, plus comms.

Each block is profiled on a copy, in isolation, with the activation it receives in the real model
(captured with a forward pre-hook); blocks with identical structure share one profile. Parameters,
gradients and optimizer state are measured on a copy of the model with the real optimizer. Memory comes
from the allocator (:mod:`lotus.parallel.measure`), communication from :mod:`lotus.parallel.comm`.
Times are the fastest of the (interleaved) repeats; as recomputation cannot make a block faster, a
checkpointing option measured faster than a lighter one (timing noise) is raised to the lighter one's time.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lotus.parallel.comm import comm_costs
from lotus.parallel.cost_table import BlockCost, CostTable, OptionCost, StageCost
from lotus.parallel.measure import MemoryMeasure, maybe_autocast, measure_memory, median_time, now, sync
from lotus.parallel.strategies import transformer_blocks, wrap_block

__all__ = ["profile_block", "profile_model", "default_optimizer"]


def _nbytes(params: Iterable[nn.Parameter]) -> float:
    return float(sum(p.numel() * p.element_size() for p in params))


def _grad_nbytes(params: Iterable[nn.Parameter]) -> float:
    return float(sum(p.numel() * p.element_size() for p in params if p.requires_grad))


def _measure_fwd_bwd(
    fwd: Callable[[], torch.Tensor],
    bwd: Callable[[torch.Tensor], None],
    reset: Callable[[], None],
    device: torch.device,
) -> tuple[MemoryMeasure, MemoryMeasure]:
    """Allocator footprint of ``fwd()`` and of ``bwd(y)`` on its output, after one warm-up pass
    (allocations, kernel selection); ``reset()`` drops gradients after each pass."""
    y = fwd()
    bwd(y)
    del y
    reset()
    y, mf = measure_memory(fwd, device)
    _, mb = measure_memory(functools.partial(bwd, y), device)
    del y
    reset()
    return mf, mb


def _time_fwd_bwd(
    fwd: Callable[[], torch.Tensor], bwd: Callable[[torch.Tensor], None], device: torch.device
) -> tuple[float, float]:
    """(forward s, backward s) of one pass, synchronised so each reading covers its own kernels."""
    sync(device)
    t0 = now()
    y = fwd()
    sync(device)
    t1 = now()
    bwd(y)
    sync(device)
    return t1 - t0, now() - t1


def profile_block(
    block: nn.Module,
    x: torch.Tensor,
    options: Iterable[str],
    repeats: int = 3,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, OptionCost]:
    """Time and memory of one block on input ``x`` under each memory option (on copies of the block).

    Timed repetitions run round-robin over the options, and each option keeps its fastest repetition:
    interference from other work on the machine only ever adds time, so the minimum is the most
    stable estimate, and interleaving exposes every option to the same conditions.
    """
    device = x.device
    options = list(options)
    runs = {}
    for opt in options:
        wrapped = wrap_block(
            copy.deepcopy(block), ac=opt if opt in ("full", "selective") else "none", offload=opt == "offload"
        )
        wrapped.train()
        runs[opt] = (wrapped, x.detach().clone().requires_grad_(True))
    grad_out: list[torch.Tensor] = []  # one incoming gradient for every option, drawn after the first forward

    def fwd(opt: str) -> torch.Tensor:
        wrapped, inp = runs[opt]
        with maybe_autocast(device, autocast_dtype):
            return wrapped(inp)

    def bwd(y: torch.Tensor) -> None:
        if not grad_out:
            grad_out.append(torch.randn_like(y))
        y.backward(grad_out[0])

    def reset(opt: str) -> None:
        wrapped, inp = runs[opt]
        wrapped.zero_grad(set_to_none=True)
        inp.grad = None

    mem = {
        opt: _measure_fwd_bwd(functools.partial(fwd, opt), bwd, functools.partial(reset, opt), device)
        for opt in options
    }
    times: dict[str, tuple[list[float], list[float]]] = {opt: ([], []) for opt in options}
    for _ in range(repeats):
        for opt in options:
            f, b = _time_fwd_bwd(functools.partial(fwd, opt), bwd, device)
            times[opt][0].append(f)
            times[opt][1].append(b)
            reset(opt)
    out_costs: dict[str, OptionCost] = {}
    for opt in options:
        mf, mb = mem[opt]
        out_costs[opt] = OptionCost(
            fwd_s=min(times[opt][0]),
            bwd_s=min(times[opt][1]),
            retained_bytes=mf.retained_bytes,
            peak_bytes=max(0.0, mb.peak_bytes),
        )
    # Recomputation never makes a block faster: keep none <= selective <= full in total time so that
    # timing noise on tiny or busy machines cannot make the planner checkpoint for "speed".
    order = [o for o in ("none", "selective", "full") if o in out_costs]
    for prev, cur in zip(order, order[1:]):
        a, b = out_costs[prev], out_costs[cur]
        deficit = (a.fwd_s + a.bwd_s) - (b.fwd_s + b.bwd_s)
        if deficit > 0:
            b.bwd_s += deficit
    return out_costs


def _vit_parts(model: nn.Module) -> tuple[Callable, Callable]:
    """The embedding (image -> block-0 input) and the head (last block output -> logits) of a timm ViT."""
    needed = ("patch_embed", "_pos_embed", "norm", "forward_head")
    missing = [n for n in needed if not hasattr(model, n)]
    if missing:
        raise ValueError(f"{type(model).__name__}: expected a timm VisionTransformer (missing {', '.join(missing)})")

    def pre(img: torch.Tensor) -> torch.Tensor:
        x = model._pos_embed(model.patch_embed(img))
        x = model.patch_drop(x) if hasattr(model, "patch_drop") else x
        return model.norm_pre(x) if hasattr(model, "norm_pre") else x

    def post(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(x))

    return pre, post


def _signature(block: nn.Module) -> tuple:
    """Blocks with equal signatures cost the same: profile one of them."""
    return (type(block).__name__,) + tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())


def _optimizer_costs(
    model: nn.Module, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer], device: torch.device, repeats: int
) -> tuple[float, float, float]:
    """(state bytes, step temporaries, step seconds) of the real optimizer on a copy of the model."""
    m = copy.deepcopy(model)
    opt = build_optimizer(m)
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    _, first = measure_memory(opt.step, device)  # allocates the state
    state = first.retained_bytes
    _, second = measure_memory(opt.step, device)
    temps = max(0.0, second.peak_bytes - max(0.0, second.retained_bytes))
    t = median_time(opt.step, repeats, device, best=True)
    del opt, m
    return float(state), float(temps), t


def default_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW: what :func:`profile_model` measures when no optimizer builder is given."""
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def profile_model(
    model: nn.Module,
    batch_size: int,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    device: torch.device | str | None = None,
    world_size: int = 1,
    options: Iterable[str] | None = None,
    repeats: int = 3,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    mixed_precision: bool = False,
    autocast_dtype: torch.dtype | None = None,
    bandwidth: float | None = None,
    measure_comm: bool = True,
    cpu_offload: bool = False,
    meta: dict | None = None,
) -> CostTable:
    """Profile a timm ViT for the planner: one :class:`CostTable` per (batch size, device, world size).

    ``batch_size`` is per rank. ``options``: memory options to measure (default: none, selective, full,
    plus offload on CUDA). ``autocast_dtype``: run blocks under ``torch.autocast`` as training does.
    ``mixed_precision``: FSDP2 gathers bf16 parameters (halves the gathered bytes and the traffic).
    With a process group, every rank must call this (communication is measured collectively).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # Profiling draws random numbers (gradients, drop-path); leave the caller's RNG streams untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _profile_model(
            model,
            batch_size,
            img_size,
            in_chans,
            device,
            world_size,
            options,
            repeats,
            build_optimizer,
            mixed_precision,
            autocast_dtype,
            bandwidth,
            measure_comm,
            cpu_offload,
            meta,
        )


def _profile_model(
    model,
    batch_size,
    img_size,
    in_chans,
    device,
    world_size,
    options,
    repeats,
    build_optimizer,
    mixed_precision,
    autocast_dtype,
    bandwidth,
    measure_comm,
    cpu_offload,
    meta,
) -> CostTable:
    if options is None:
        options = ["none", "selective", "full"] + (["offload"] if device.type == "cuda" else [])
    options = list(options)
    if "offload" in options and device.type != "cuda":
        raise ValueError("memory option 'offload': activations can only be offloaded from a CUDA device")
    blocks = transformer_blocks(model)
    pre_fn, post_fn = _vit_parts(model)
    if img_size is None:
        img_size = getattr(model.patch_embed, "img_size", None)
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    if in_chans is None:
        proj = getattr(model.patch_embed, "proj", None)
        in_chans = getattr(proj, "in_channels", 3)
    model = model.to(device).train()
    num_classes = int(getattr(model, "num_classes", 0) or 10)
    gen = torch.Generator(device="cpu").manual_seed(0)
    img = torch.randn(batch_size, in_chans, *img_size, generator=gen).to(device)
    labels = torch.randint(0, max(num_classes, 2), (batch_size,), generator=gen).to(device)

    # Inputs of every block in the real model, and the last block's output (the head's input).
    inputs: list[torch.Tensor] = []
    last_out: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())) for b in blocks]
    hooks.append(blocks[-1].register_forward_hook(lambda m, args, out: last_out.append(out.detach())))
    try:
        with (
            torch.no_grad(),
            (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype
                else torch.autocast(device.type, enabled=False)
            ),
        ):
            model.forward_features(img)
    finally:
        for h in hooks:
            h.remove()
    if len(inputs) != len(blocks):
        raise ValueError(f"{type(model).__name__}: expected each of its {len(blocks)} blocks to run once per forward")

    cache: dict[tuple, dict[str, OptionCost]] = {}
    table_blocks: list[BlockCost] = []
    comm_src = "none"
    comm_cache: dict[float, tuple[float, float, float, str]] = {}

    def comm(nbytes: float) -> tuple[float, float, float, str]:
        if nbytes not in comm_cache:  # same order on every rank: collectives stay matched
            comm_cache[nbytes] = comm_costs(nbytes, world_size, device, bandwidth, measure_comm, repeats)
        return comm_cache[nbytes]

    for b, x in zip(blocks, inputs):
        sig = _signature(b) + (tuple(x.shape), x.dtype)
        if sig not in cache:
            cache[sig] = profile_block(b, x, options, repeats, autocast_dtype)
        pbytes = _nbytes(b.parameters())
        gathered = pbytes / 2 if mixed_precision else pbytes  # FSDP2 gathers bf16 copies
        ag, rs, ar, comm_src = comm(gathered)
        if mixed_precision:  # gradients are reduced in fp32
            _, rs, ar, _ = comm(pbytes)
        table_blocks.append(
            BlockCost(
                options={k: OptionCost(**vars(v)) for k, v in cache[sig].items()},
                param_bytes=pbytes,
                grad_bytes=_grad_nbytes(b.parameters()),
                output_bytes=float(x.numel() * x.element_size()),
                gathered_bytes=gathered,
                allgather_s=ag,
                reduce_scatter_s=rs,
                allreduce_s=ar,
            )
        )

    pre = _profile_stage(lambda: pre_fn(img), model, device, repeats, autocast_dtype, tail=None)
    post_in = last_out[-1].clone()
    post = _profile_stage(
        lambda xin: F.cross_entropy(post_fn(xin).float(), labels), model, device, repeats, autocast_dtype, tail=post_in
    )

    block_params = {id(p) for b in blocks for p in b.parameters()}
    post_mods = [
        getattr(model, n)
        for n in ("norm", "fc_norm", "head", "attn_pool")
        if isinstance(getattr(model, n, None), nn.Module)
    ]
    post_ids = {id(p) for m in post_mods for p in m.parameters()}
    other = [p for p in model.parameters() if id(p) not in block_params]
    for stage, params in (
        (pre, [p for p in other if id(p) not in post_ids]),
        (post, [p for p in other if id(p) in post_ids]),
    ):
        stage.param_bytes = _nbytes(params)
        stage.grad_bytes = _grad_nbytes(params)
        ag, rs, ar, _ = comm(stage.param_bytes)
        stage.allgather_s, stage.reduce_scatter_s, stage.allreduce_s = ag, rs, ar

    state_b, temps_b, step_s = _optimizer_costs(model, build_optimizer or default_optimizer, device, repeats)
    info = {
        "model": type(model).__name__,
        "img_size": list(img_size),
        "in_chans": in_chans,
        "options": options,
        "comm": comm_src,
        "repeats": repeats,
        "autocast": str(autocast_dtype) if autocast_dtype else None,
    }
    info.update(meta or {})
    return CostTable(
        blocks=table_blocks,
        batch_size=batch_size,
        world_size=world_size,
        device=device.type,
        pre=pre,
        post=post,
        optimizer_state_bytes=state_b,
        optimizer_step_s=step_s,
        optimizer_peak_bytes=temps_b,
        overlap_comm=device.type == "cuda",
        cpu_offload=cpu_offload,
        meta=info,
    )


def _profile_stage(
    fn: Callable,
    model: nn.Module,
    device: torch.device,
    repeats: int,
    autocast_dtype: torch.dtype | None,
    tail: torch.Tensor | None,
) -> StageCost:
    """Cost of the embedding (``tail is None``: fn() -> block-0 input) or of norm+head+loss (fn(x) -> loss)."""
    tail_in = None if tail is None else tail.detach().clone().requires_grad_(True)

    def fwd() -> torch.Tensor:
        with maybe_autocast(device, autocast_dtype):
            return fn() if tail_in is None else fn(tail_in)

    def bwd(y: torch.Tensor) -> None:
        if y.dim() == 0:
            y.backward()
        else:
            y.backward(torch.ones_like(y))

    def reset() -> None:
        model.zero_grad(set_to_none=True)

    mf, mb = _measure_fwd_bwd(fwd, bwd, reset, device)
    f_t, b_t = [], []
    for _ in range(repeats):
        f, b = _time_fwd_bwd(fwd, bwd, device)
        f_t.append(f)
        b_t.append(b)
        reset()
    # The embedding's output is block 0's input and is counted as its retained memory here.
    return StageCost(
        fwd_s=min(f_t), bwd_s=min(b_t), retained_bytes=mf.retained_bytes, peak_bytes=max(0.0, mb.peak_bytes)
    )
