"""Measure what the planner needs: per-block time and memory under each memory option, plus comms.

Memory is measured at the allocator, so it counts everything a block really holds (saved activations,
selective-checkpoint caches, checkpoint inputs, workspaces):

* CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` around the measured call.
* CPU: the PyTorch profiler's allocation events (``profile_memory=True``): every CPU allocation and
  free inside the call, replayed in order to get the net retained bytes and the peak. Saved-tensor
  hooks (:func:`saved_activation_bytes`) give the size of the tensors autograd saves, as a cross-check.

Each block is profiled on a copy, in isolation, with the activation it receives in the real model
(captured with a forward pre-hook); blocks with identical structure share one profile. Parameters,
gradients and optimizer state are measured on a copy of the model with the real optimizer. Times are the
fastest of the (interleaved) repeats; as recomputation cannot make a block faster, a checkpointing option measured
faster than a lighter one (timing noise) is raised to the lighter one's time.

Communication: with a process group of more than one rank, the all-gather / reduce-scatter (FSDP)
and all-reduce (DDP) of each block's parameter bytes are timed with the real collectives. Without one
(``lotus plan --world-size 4`` on a laptop) a ring model is used: ``(W-1)/W * bytes / bandwidth +
(W-1) * latency`` per all-gather or reduce-scatter and twice that for an all-reduce, with
``bandwidth`` from ``--bandwidth`` / ``parallel.bandwidth`` or a device default (CUDA 50 GB/s: a
conservative NVLink/InfiniBand figure; CPU/gloo 2 GB/s).
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import os
import sys

from lotus.parallel.planner import BlockCost, CostTable, OptionCost, StageCost
from lotus.parallel.strategies import transformer_blocks, wrap_block


@contextlib.contextmanager
def _native_stderr_silenced():
    """Mute the C++ profiler's own start/stop lines (kineto writes them straight to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)

__all__ = [
    "MemoryMeasure",
    "measure_memory",
    "saved_activation_bytes",
    "profile_block",
    "profile_model",
    "comm_costs",
    "StepMeasure",
    "measure_training_step",
    "use_clock",
    "DEFAULT_BANDWIDTH",
    "DEFAULT_LATENCY",
]

DEFAULT_BANDWIDTH = {"cuda": 50e9, "cpu": 2e9}  # bytes/s used by the ring model without a process group
DEFAULT_LATENCY = {"cuda": 20e-6, "cpu": 100e-6}  # seconds per ring step


@dataclass
class MemoryMeasure:
    retained_bytes: float  # allocated after the call minus before (what the call left behind)
    peak_bytes: float  # highest allocation during the call, minus before


_CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
_clock = [time.perf_counter]


def _now() -> float:
    return _clock[0]()


@contextlib.contextmanager
def use_clock(name: str):
    """Time with ``"wall"`` (default) or ``"process"`` CPU time while the context is open.

    Process time (CPU seconds of this process, all threads) is far steadier than wall time on a CPU
    shared with other jobs; it only makes sense for CPU work (CUDA kernels run asynchronously).
    """
    if name not in _CLOCKS:
        raise ValueError(f"clock: expected 'wall' or 'process', got {name!r}")
    old = _clock[0]
    _clock[0] = _CLOCKS[name]
    try:
        yield
    finally:
        _clock[0] = old


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, MemoryMeasure]:
    """Run ``fn()`` and measure its allocator footprint on ``device``; returns (fn's result, measure)."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        return out, MemoryMeasure(torch.cuda.memory_allocated(device) - before,
                                  torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                            record_shapes=False) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).upper().endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return out, MemoryMeasure(float(cur), float(peak))


def saved_activation_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[object, float]:
    """Bytes of distinct storages autograd saves for backward while ``fn()`` runs (parameters excluded).

    Tensors saved inside a checkpointed region are invisible to outer hooks (checkpointing installs its
    own); use :func:`measure_memory` for those.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.data_ptr() != 0:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, float(sum(seen.values()))


def _median_time(fn: Callable[[], None], repeats: int, device: torch.device, best: bool = False) -> float:
    """Median (or with ``best``, fastest) wall time of ``fn`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = _now()
        fn()
        _sync(device)
        times.append(_now() - t0)
    return min(times) if best else statistics.median(times)


def _param_bytes(module: nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in module.parameters()))


def _grad_bytes(module: nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad))


def _clear_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def profile_block(block: nn.Module, x: torch.Tensor, options: Iterable[str], repeats: int = 3,
                  autocast_dtype: torch.dtype | None = None) -> dict[str, OptionCost]:
    """Time and memory of one block on input ``x`` under each memory option (on copies of the block).

    Timed repetitions run round-robin over the options, and each option keeps its fastest repetition:
    interference from other work on the machine only ever adds time, so the minimum is the most
    stable estimate, and interleaving exposes every option to the same conditions.
    """
    device = x.device
    options = list(options)
    runs = {}
    for opt in options:
        wrapped = wrap_block(copy.deepcopy(block), ac=opt if opt in ("full", "selective") else "none",
                             offload=opt == "offload")
        wrapped.train()
        runs[opt] = (wrapped, x.detach().clone().requires_grad_(True))

    def fwd(opt):
        wrapped, inp = runs[opt]
        if autocast_dtype is None:
            return wrapped(inp)
        with torch.autocast(device.type, dtype=autocast_dtype):
            return wrapped(inp)

    def reset(opt):
        wrapped, inp = runs[opt]
        _clear_grads(wrapped)
        inp.grad = None

    g = None
    mem = {}
    for opt in options:
        y = fwd(opt)  # warm-up (allocations, kernel selection)
        if g is None:
            g = torch.randn_like(y)
        y.backward(g)
        del y
        reset(opt)
        y, mf = measure_memory(lambda: fwd(opt), device)
        _, mb = measure_memory(lambda: y.backward(g), device)
        del y
        reset(opt)
        mem[opt] = (mf, mb)
    times = {opt: ([], []) for opt in options}
    for _ in range(repeats):
        for opt in options:
            _sync(device)
            t0 = _now()
            y = fwd(opt)
            _sync(device)
            t1 = _now()
            y.backward(g)
            _sync(device)
            t2 = _now()
            times[opt][0].append(t1 - t0)
            times[opt][1].append(t2 - t1)
            del y
            reset(opt)
    out_costs: dict[str, OptionCost] = {}
    for opt in options:
        mf, mb = mem[opt]
        out_costs[opt] = OptionCost(fwd_s=min(times[opt][0]), bwd_s=min(times[opt][1]),
                                    retained_bytes=mf.retained_bytes, peak_bytes=max(0.0, mb.peak_bytes))
    del runs
    # Recomputation never makes a block faster: keep none <= selective <= full in total time so that
    # timing noise on tiny or busy machines cannot make the planner checkpoint for "speed".
    order = [o for o in ("none", "selective", "full") if o in out_costs]
    for prev, cur in zip(order, order[1:]):
        a, b = out_costs[prev], out_costs[cur]
        deficit = (a.fwd_s + a.bwd_s) - (b.fwd_s + b.bwd_s)
        if deficit > 0:
            b.bwd_s += deficit
    return out_costs


def _vit_parts(model: nn.Module):
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
    return (type(block).__name__,) + tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())


def comm_costs(nbytes: float, world_size: int, device: torch.device, bandwidth: float | None = None,
               measure: bool = True, repeats: int = 3) -> tuple[float, float, float, str]:
    """(all-gather s, reduce-scatter s, all-reduce s, source) for ``nbytes`` of full parameters.

    Measured with the real collectives when a process group with ``world_size`` ranks exists (a
    collective: every rank must call this with the same sizes), else the ring model.
    """
    import torch.distributed as dist

    if world_size <= 1:
        return 0.0, 0.0, 0.0, "none"
    if measure and bandwidth is None and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() == world_size:
        n = max(1, int(nbytes) // 4 // world_size)
        shard = torch.ones(n, dtype=torch.float32, device=device)
        full = torch.empty(n * world_size, dtype=torch.float32, device=device)

        def ag():
            dist.all_gather_into_tensor(full, shard)

        def rs():
            dist.reduce_scatter_tensor(shard, full)

        def ar():
            dist.all_reduce(full)

        out = []
        for fn in (ag, rs, ar):
            fn()  # warm-up / connection set-up
            dist.barrier()
            out.append(_median_time(fn, repeats, device, best=True))
        return out[0], out[1], out[2], "measured"
    bw = bandwidth or DEFAULT_BANDWIDTH.get(device.type, DEFAULT_BANDWIDTH["cpu"])
    lat = DEFAULT_LATENCY.get(device.type, DEFAULT_LATENCY["cpu"])
    step = (world_size - 1) / world_size * nbytes / bw + (world_size - 1) * lat
    return step, step, 2 * step, f"ring model at {bw / 1e9:.1f} GB/s"


def _optimizer_costs(model: nn.Module, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                     device: torch.device, repeats: int) -> tuple[float, float, float]:
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
    t = _median_time(opt.step, repeats, device, best=True)
    del opt, m
    return float(state), float(temps), t


def default_optimizer(model: nn.Module) -> torch.optim.Optimizer:
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
        return _profile_model(model, batch_size, img_size, in_chans, device, world_size, options, repeats,
                              build_optimizer, mixed_precision, autocast_dtype, bandwidth, measure_comm,
                              cpu_offload, meta)


def _profile_model(model, batch_size, img_size, in_chans, device, world_size, options, repeats, build_optimizer,
                   mixed_precision, autocast_dtype, bandwidth, measure_comm, cpu_offload, meta) -> CostTable:
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
        with torch.no_grad(), (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                               else torch.autocast(device.type, enabled=False)):
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
        pbytes = _param_bytes(b)
        gathered = pbytes / 2 if mixed_precision else pbytes  # FSDP2 gathers bf16 copies
        ag, rs, ar, comm_src = comm(gathered)
        if mixed_precision:  # gradients are reduced in fp32
            _, rs, ar, _ = comm(pbytes)
        table_blocks.append(BlockCost(
            options={k: OptionCost(**vars(v)) for k, v in cache[sig].items()},
            param_bytes=pbytes, grad_bytes=_grad_bytes(b), output_bytes=float(x.numel() * x.element_size()),
            gathered_bytes=gathered, allgather_s=ag, reduce_scatter_s=rs, allreduce_s=ar,
        ))

    pre = _profile_stage(lambda: pre_fn(img), model, device, repeats, autocast_dtype, tail=None)
    post_in = last_out[-1].clone()
    post = _profile_stage(lambda xin: F.cross_entropy(post_fn(xin).float(), labels), model, device, repeats,
                          autocast_dtype, tail=post_in)

    block_params = {id(p) for b in blocks for p in b.parameters()}
    post_mods = [getattr(model, n) for n in ("norm", "fc_norm", "head", "attn_pool") if
                 isinstance(getattr(model, n, None), nn.Module)]
    post_ids = {id(p) for m in post_mods for p in m.parameters()}
    other = [p for p in model.parameters() if id(p) not in block_params]
    for stage, params in ((pre, [p for p in other if id(p) not in post_ids]),
                          (post, [p for p in other if id(p) in post_ids])):
        stage.param_bytes = float(sum(p.numel() * p.element_size() for p in params))
        stage.grad_bytes = float(sum(p.numel() * p.element_size() for p in params if p.requires_grad))
        ag, rs, ar, _ = comm(stage.param_bytes)
        stage.allgather_s, stage.reduce_scatter_s, stage.allreduce_s = ag, rs, ar

    state_b, temps_b, step_s = _optimizer_costs(model, build_optimizer or default_optimizer, device, repeats)
    info = {"model": type(model).__name__, "img_size": list(img_size), "in_chans": in_chans,
            "options": options, "comm": comm_src, "repeats": repeats,
            "autocast": str(autocast_dtype) if autocast_dtype else None}
    info.update(meta or {})
    return CostTable(blocks=table_blocks, batch_size=batch_size, world_size=world_size, device=device.type,
                     pre=pre, post=post, optimizer_state_bytes=state_b, optimizer_step_s=step_s,
                     optimizer_peak_bytes=temps_b, overlap_comm=device.type == "cuda", cpu_offload=cpu_offload,
                     meta=info)


def _profile_stage(fn, model: nn.Module, device: torch.device, repeats: int,
                   autocast_dtype: torch.dtype | None, tail: torch.Tensor | None) -> StageCost:
    """Cost of the embedding (``tail is None``: fn() -> block-0 input) or of norm+head+loss (fn(x) -> loss)."""
    def run():
        if tail is None:
            return fn()
        return fn(tail_in)

    tail_in = None if tail is None else tail.detach().clone().requires_grad_(True)

    def fwd():
        if autocast_dtype is None:
            return run()
        with torch.autocast(device.type, dtype=autocast_dtype):
            return run()

    def bwd(y):
        if y.dim() == 0:
            y.backward()
        else:
            y.backward(torch.ones_like(y))

    y = fwd()
    bwd(y)
    del y
    model.zero_grad(set_to_none=True)
    y, mf = measure_memory(fwd, device)
    _, mb = measure_memory(lambda: bwd(y), device)
    del y
    model.zero_grad(set_to_none=True)
    f_t, b_t = [], []
    for _ in range(repeats):
        _sync(device)
        t0 = _now()
        y = fwd()
        _sync(device)
        t1 = _now()
        bwd(y)
        _sync(device)
        f_t.append(t1 - t0)
        b_t.append(_now() - t1)
        del y
        model.zero_grad(set_to_none=True)
    # The embedding's output is block 0's input and is counted as its retained memory here.
    return StageCost(fwd_s=min(f_t), bwd_s=min(b_t),
                     retained_bytes=mf.retained_bytes, peak_bytes=max(0.0, mb.peak_bytes))


@dataclass
class StepMeasure:
    activation_bytes: float  # allocated by the forward pass and still held when it ends (incl. the loss)
    peak_bytes: float  # highest allocation during forward + backward + optimizer step, above the start
    static_bytes: float  # parameters + optimizer state held before the step
    step_time_s: float  # median wall time of a whole step (no profiler attached)


def measure_training_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          optimizer: torch.optim.Optimizer, repeats: int = 3,
                          autocast_dtype: torch.dtype | None = None) -> StepMeasure:
    """Measure one real training step of ``model`` (already wrapped by a plan) at the allocator.

    A warm-up step first creates the optimizer state; gradients are dropped (``set_to_none``) before
    each measured step, as the Trainer does. ``static_bytes`` counts parameter and optimizer-state
    storage directly.
    """
    device = images.device

    def fwd():
        if autocast_dtype is None:
            return F.cross_entropy(model(images).float(), labels)
        with torch.autocast(device.type, dtype=autocast_dtype):
            return F.cross_entropy(model(images).float(), labels)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = fwd()
        loss.backward()
        optimizer.step()

    model.train()
    step()  # warm-up: optimizer state, allocator caches
    optimizer.zero_grad(set_to_none=True)
    loss, mf = measure_memory(fwd, device)
    del loss
    _, ms = measure_memory(step, device)
    optimizer.zero_grad(set_to_none=True)
    t = _median_time(step, repeats, device)
    storages: dict[int, int] = {}
    for p in model.parameters():
        storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.device == device:
                storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return StepMeasure(activation_bytes=mf.retained_bytes, peak_bytes=ms.peak_bytes,
                       static_bytes=float(sum(storages.values())), step_time_s=t)
