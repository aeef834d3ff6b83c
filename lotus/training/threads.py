"""``train.threads: auto``: pick the fastest CPU thread count for this model, and notice when it stops being so.

Tiny ops on a shared machine suffer from oversubscription: with torch's default of one thread per core and
another process busy on one of the cores, every parallel region waits for the descheduled thread and a step
can take 15x longer than with fewer threads. :class:`ThreadTuner` times a few forward+backward steps at each
candidate thread count at start-up, keeps the fastest (fewer threads on near-ties, which is kinder to
neighbours), and watches the real step times so the trainer can re-tune when they jump.

Honest caveats:

* Changing the thread count changes the floating-point reduction order, so a run with ``auto`` is not
  bit-reproducible across machine loads. ``train.threads: N`` fixes the count (the test suite and the
  resume tests pin it).
* CPU only. On CUDA the host-measured step time says little about the device and the thread count hardly
  matters: do not build a tuner there.
* A re-tune is triggered by step time changing. A neighbour *leaving* while we run on fewer threads usually
  leaves our step time unchanged, so it is noticed only by the periodic re-check (``every_n_steps``).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ThreadTuner", "default_candidates", "probe_step_fn"]

_clock = time.perf_counter  # the probe's clock (tests substitute a fake one)


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_candidates(max_threads: int | None = None, limit: int = 4) -> list[int]:
    """``1`` .. ``max_threads`` (default: the CPUs this process may use): powers of two plus the maximum,
    thinned to at most ``limit`` values spread geometrically (always keeping 1 and the maximum).
    ``[1, 2]`` on 2 cores, ``[1, 2, 4]`` on 4, ``[1, 2, 8, 16]`` on 16."""
    top = max(1, int(max_threads or _available_cpus()))
    values = [1 << k for k in range(top.bit_length()) if (1 << k) < top] + [top]
    if len(values) > limit >= 2:
        picks = {round(i * (len(values) - 1) / (limit - 1)) for i in range(limit)}
        values = [values[i] for i in sorted(picks)]
    return values


def probe_step_fn(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], Any] | None = None,
) -> Callable[[], None]:
    """A side-effect-free stand-in for one training step: forward + cross-entropy + backward on a deep copy
    of ``model`` with a fixed batch (no optimiser step; ``model`` and its gradients are never touched).
    Build a fresh one for each (re-)tune so the copy matches the current model."""
    replica = copy.deepcopy(model)
    replica.train(model.training)
    images, labels = images.detach(), labels.detach()

    def step() -> None:
        replica.zero_grad(set_to_none=True)
        if autocast is None:
            logits = forward(replica, images) if forward else replica(images)
        else:
            with autocast():
                logits = forward(replica, images) if forward else replica(images)
        F.cross_entropy(logits.float(), labels).backward()

    return step


class ThreadTuner:
    """Chooses ``torch.set_num_threads`` by timing a step function, and flags when step times jump.

    Args:
        candidates: thread counts to try, in any order (default :func:`default_candidates`).
        probe_steps: timed calls per candidate (the median counts), after ``warmup_steps`` untimed ones.
        warmup_steps: calls per candidate before timing (the first call after a switch is not typical).
        jump_factor: :meth:`observe` flags when the running median step time leaves
            ``[baseline / jump_factor, baseline * jump_factor]``.
        window: steps in the running median, and steps after a tune that form the baseline.
        every_n_steps: also flag every this many observed steps (periodic re-check; ``None``: off).
        tie_tolerance: a candidate within this fraction of the fastest counts as a tie; fewer threads win.
        abort_factor: stop probing a candidate as soon as one of its calls (warm-up included) takes longer
            than this times the best median so far, so an oversubscribed count costs one step, not several.
    """

    def __init__(
        self,
        candidates: Sequence[int] | None = None,
        *,
        probe_steps: int = 3,
        warmup_steps: int = 1,
        jump_factor: float = 2.0,
        window: int = 9,
        every_n_steps: int | None = None,
        tie_tolerance: float = 0.05,
        abort_factor: float = 3.0,
    ):
        cands = sorted({int(n) for n in (candidates if candidates is not None else default_candidates())})
        if not cands or cands[0] < 1:
            raise ValueError(f"candidates: expected thread counts >= 1, got {candidates!r}")
        if probe_steps < 1 or warmup_steps < 0 or window < 1 or jump_factor <= 1.0 or abort_factor <= 1.0:
            raise ValueError(
                "ThreadTuner: need probe_steps >= 1, warmup_steps >= 0, window >= 1, "
                "jump_factor > 1 and abort_factor > 1"
            )
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected >= 1 or None, got {every_n_steps}")
        self.candidates = cands
        self.probe_steps, self.warmup_steps = int(probe_steps), int(warmup_steps)
        self.jump_factor, self.window, self.every_n_steps = float(jump_factor), int(window), every_n_steps
        self.tie_tolerance, self.abort_factor = float(tie_tolerance), float(abort_factor)
        self.threads: int | None = None  # the count chosen by the last tune
        self.last_probe: dict[int, float] = {}  # candidate -> median probe seconds (partial if aborted)
        self.aborted: list[int] = []  # candidates given up on in the last tune
        self.tune_seconds = 0.0  # wall time of the last tune
        self.tunes = 0
        self.reason = "start"  # why a re-tune is due: start, slower, faster, periodic
        self.baseline: float | None = None  # median step time right after the last tune
        self._base: list[float] = []
        self._recent: deque[int] = deque(maxlen=self.window)  # +1 above, -1 below the band, 0 inside
        self._hi = self._lo = 0
        self._steps = 0

    # ------------------------------------------------------------------ tune
    def tune(self, step_fn: Callable[[], None]) -> int:
        """Time ``step_fn`` at each candidate, set the fastest count with ``torch.set_num_threads`` and
        return it. The CPU RNG state is restored afterwards; on an exception the previous count is."""
        previous = torch.get_num_threads()
        start = _clock()
        timings: dict[int, float] = {}
        aborted: list[int] = []
        best = math.inf
        try:
            with torch.random.fork_rng(devices=[]):
                for n in self.candidates:
                    torch.set_num_threads(n)
                    times: list[float] = []
                    for i in range(self.warmup_steps + self.probe_steps):
                        t0 = _clock()
                        step_fn()
                        dt = _clock() - t0
                        if i >= self.warmup_steps:
                            times.append(dt)
                        if dt > self.abort_factor * best:
                            aborted.append(n)
                            times = times or [dt]
                            break
                    timings[n] = statistics.median(times)
                    if n not in aborted:
                        best = min(best, timings[n])
        except BaseException:
            torch.set_num_threads(previous)
            raise
        choice = min(n for n in self.candidates if n not in aborted and timings[n] <= best * (1 + self.tie_tolerance))
        torch.set_num_threads(choice)
        self.threads, self.last_probe, self.aborted = choice, timings, aborted
        self.tune_seconds = _clock() - start
        self.tunes += 1
        self._reset_observation()
        return choice

    # --------------------------------------------------------------- observe
    def _reset_observation(self) -> None:
        self.baseline = None
        self._base.clear()
        self._recent.clear()
        self._hi = self._lo = 0
        self._steps = 0

    def observe(self, step_seconds: float) -> bool:
        """Feed one real training step's host wall time. True when a re-tune is recommended: the running
        median of the last ``window`` steps is more than ``jump_factor`` times slower (or faster) than the
        baseline formed by the first ``window`` steps after the last tune, or ``every_n_steps`` passed.
        After flagging, the observation restarts (a new baseline forms even if nobody re-tunes)."""
        self._steps += 1
        if self.every_n_steps is not None and self._steps >= self.every_n_steps:
            return self._flag("periodic")
        if self.baseline is None:
            self._base.append(step_seconds)
            if len(self._base) >= self.window:
                self.baseline = statistics.median(self._base)
            return False
        side = (
            1
            if step_seconds > self.baseline * self.jump_factor
            else (-1 if step_seconds * self.jump_factor < self.baseline else 0)
        )
        if len(self._recent) == self.window:  # the oldest value leaves the window
            old = self._recent[0]
            self._hi -= old == 1
            self._lo -= old == -1
        self._recent.append(side)
        self._hi += side == 1
        self._lo += side == -1
        half = self.window // 2  # more than half the window outside the band <=> its median is (odd window)
        if self._hi > half:
            return self._flag("slower")
        if self._lo > half:
            return self._flag("faster")
        return False

    def _flag(self, reason: str) -> bool:
        self.reason = reason
        self._reset_observation()
        return True

    def describe(self) -> dict[str, Any]:
        """Fields for the event log: the chosen count, per-candidate probe medians, what was cut short."""
        return {
            "threads": self.threads,
            "candidates": list(self.candidates),
            "probe_s": {str(n): round(t, 5) for n, t in self.last_probe.items()},
            "aborted": list(self.aborted),
            "tune_s": round(self.tune_seconds, 4),
            "tunes": self.tunes,
            "reason": self.reason,
        }
