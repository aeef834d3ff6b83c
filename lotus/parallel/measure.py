"""Allocator and clock measurements: the primitives the profiler and the memory benchmarks build on.

Memory is measured at the allocator, so it counts everything a call really holds (saved activations,
selective-checkpoint caches, checkpoint inputs, workspaces):

* CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` around the measured call.
* CPU: the PyTorch profiler's allocation events (``profile_memory=True``): every CPU allocation and
  free inside the call, replayed in order to get the net retained bytes and the peak. Saved-tensor
  hooks (:func:`saved_activation_bytes`) give the size of the tensors autograd saves, as a cross-check.

:func:`measure_training_step` measures a whole real step, to check the planner's predictions.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

__all__ = [
    "MemoryMeasure",
    "measure_memory",
    "saved_activation_bytes",
    "use_clock",
    "now",
    "sync",
    "median_time",
    "maybe_autocast",
    "StepMeasure",
    "measure_training_step",
]


@dataclass
class MemoryMeasure:
    """Allocator footprint of one call on one device."""

    retained_bytes: float  # allocated after the call minus before (what the call left behind)
    peak_bytes: float  # highest allocation during the call, minus before


_CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
_clock = [time.perf_counter]


def now() -> float:
    """The current reading of the clock selected by :func:`use_clock` (seconds)."""
    return _clock[0]()


@contextlib.contextmanager
def use_clock(name: str) -> Iterator[None]:
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


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU), so clock readings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], None], repeats: int, device: torch.device, best: bool = False) -> float:
    """Median (or with ``best``, fastest) time of ``fn`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = now()
        fn()
        sync(device)
        times.append(now() - t0)
    return min(times) if best else statistics.median(times)


def maybe_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
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


def measure_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, MemoryMeasure]:
    """Run ``fn()`` and measure its allocator footprint on ``device``; returns (fn's result, measure)."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        return out, MemoryMeasure(
            torch.cuda.memory_allocated(device) - before, torch.cuda.max_memory_allocated(device) - before
        )
    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof,
    ):
        out = fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).upper().endswith("CPU")
    ]
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


@dataclass
class StepMeasure:
    """Measured memory and time of one real training step (to compare with the cost model)."""

    activation_bytes: float  # allocated by the forward pass and still held when it ends (incl. the loss)
    peak_bytes: float  # highest allocation during forward + backward + optimizer step, above the start
    static_bytes: float  # parameters + optimizer state held before the step
    step_time_s: float  # median wall time of a whole step (no profiler attached)


def measure_training_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    repeats: int = 3,
    autocast_dtype: torch.dtype | None = None,
) -> StepMeasure:
    """Measure one real training step of ``model`` (already wrapped by a plan) at the allocator.

    A warm-up step first creates the optimizer state; gradients are dropped (``set_to_none``) before
    each measured step, as the Trainer does. ``static_bytes`` counts parameter and optimizer-state
    storage directly.
    """
    device = images.device

    def fwd():
        with maybe_autocast(device, autocast_dtype):
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
    t = median_time(step, repeats, device)
    storages: dict[int, int] = {}
    for p in model.parameters():
        storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.device == device:
                storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return StepMeasure(
        activation_bytes=mf.retained_bytes,
        peak_bytes=ms.peak_bytes,
        static_bytes=float(sum(storages.values())),
        step_time_s=t,
    )
