"""``train.threads: auto``: pick the fastest CPU thread count for this model on the run's own steps.

Tiny ops on a shared machine suffer from oversubscription: with torch's default of one thread per core and
another process busy on one of the cores, every parallel region waits for the descheduled thread and a step
can take 15x longer than with fewer threads. :class:`ThreadTuner` finds the fastest count without any extra
work: it cycles the candidate counts over the first real training steps (per candidate one untimed step after
the switch, then a few timed ones), settles on the fastest (fewer threads on near-ties, which is kinder to
neighbours) and keeps watching the step times. The only cost is the extra time of the steps that ran at a
slower count, which it estimates (``overhead_s``) and keeps under ``max_share`` of the run.

The tuner itself is a clock-free state machine: the caller runs each step at :attr:`ThreadTuner.next_threads`
(:meth:`ThreadTuner.apply`) and feeds its host wall time to :meth:`ThreadTuner.observe`, so tests drive it
with made-up step times.

Honest caveats:

* Changing the thread count changes the floating-point reduction order, so a run with ``auto`` is not
  bit-reproducible across machine loads. ``train.threads: N`` fixes the count (the test suite and the
  resume tests pin it).
* CPU only. On CUDA the host-measured step time says little about the device and the thread count hardly
  matters: do not build a tuner there.
* A re-tune is triggered only by a sustained slowdown. A neighbour *leaving* while we run on fewer threads
  leaves our step time unchanged, so it is noticed only with the opt-in periodic re-check (``every_n_steps``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["ThreadTuner", "default_candidates", "parallel_stalls"]

_clock = time.perf_counter
_GRAIN = 32768  # at::internal::GRAIN_SIZE: elements per thread before torch's parallel_for splits work


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


def parallel_stalls(threads: int, cap_s: float, regions: int = 7) -> tuple[bool, float]:
    """Whether ``threads`` threads are oversubscribed now, told by a few tiny parallel regions (an add over one
    grain per thread) against the same regions on one thread: when another process holds the cores, each region
    waits for a descheduled thread and takes milliseconds instead of microseconds. Much cheaper than finding out
    with a training step (seen: 1.6 s instead of 0.02 s): it stops once most regions stalled or after ``cap_s``.
    Returns (stalled, seconds)."""
    previous = torch.get_num_threads()
    a = torch.ones(threads * _GRAIN)
    out = torch.empty_like(a)
    start = _clock()

    def region() -> float:
        t0 = _clock()
        torch.add(a, a, out=out)
        return _clock() - t0

    try:
        torch.set_num_threads(1)
        limit = 3 * statistics.median(region() for _ in range(regions)) + 2e-4
        torch.set_num_threads(threads)
        slow = done = 0
        while done < regions and slow <= regions // 2 and (not done or _clock() - start <= cap_s):
            slow += region() > limit
            done += 1
    finally:
        torch.set_num_threads(previous)
    return slow > done // 2, _clock() - start


class ThreadTuner:
    """Chooses the thread count from the run's own step times, and re-tunes on a sustained slowdown.

    Candidates are tried in increasing order: too few threads costs at most ~N x per step, while an
    oversubscribed count can cost 100x. Before the first step at a new count, :meth:`apply` runs a cheap
    stall check (:func:`parallel_stalls`) that skips a count the machine cannot give us now; a count that
    passes it but still runs a step ``abort_factor`` x slower than the best is cut after that step.

    Args:
        candidates: thread counts to try (default :func:`default_candidates`).
        trial_steps: timed steps per candidate (their median counts), after ``warmup_steps`` untimed ones.
        warmup_steps: steps after a switch that are not timed (the first step at a new count is not typical).
        abort_factor: give up on a candidate after one step (warm-up included) slower than this times the
            best median so far, so an oversubscribed count costs one step, not several.
        tie_tolerance: a candidate within this fraction of the fastest counts as a tie; fewer threads win.
        slow_factor: re-tune when the median of the last ``window`` steps exceeds this times the baseline
            (the chosen count's trial median, lowered by any later window whose median is lower).
        window: steps in the running median (a spike in fewer than half of them changes nothing).
        max_share: a re-tune waits while the tuning overhead so far exceeds this share of the observed
            training time (the first tune always runs).
        every_n_steps: also re-tune every this many steps after settling (``None``: never).
        check_share: the stall check of a candidate stops after this share of the best median step time.
    """

    def __init__(
        self,
        candidates: Sequence[int] | None = None,
        *,
        trial_steps: int = 3,
        warmup_steps: int = 1,
        abort_factor: float = 2.0,
        tie_tolerance: float = 0.05,
        slow_factor: float = 1.5,
        window: int = 15,
        max_share: float = 0.02,
        every_n_steps: int | None = None,
        check_share: float = 0.25,
    ):
        cands = sorted({int(n) for n in (candidates if candidates is not None else default_candidates())})
        if not cands or cands[0] < 1:
            raise ValueError(f"candidates: expected thread counts >= 1, got {candidates!r}")
        if trial_steps < 1 or warmup_steps < 0 or window < 1 or abort_factor <= 1.0 or slow_factor <= 1.0:
            raise ValueError(
                "ThreadTuner: need trial_steps >= 1, warmup_steps >= 0, window >= 1, "
                "abort_factor > 1 and slow_factor > 1"
            )
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected >= 1 or None, got {every_n_steps}")
        self.candidates = cands
        self.trial_steps, self.warmup_steps = int(trial_steps), int(warmup_steps)
        self.abort_factor, self.tie_tolerance = float(abort_factor), float(tie_tolerance)
        self.slow_factor, self.window, self.max_share = float(slow_factor), int(window), float(max_share)
        self.every_n_steps, self.check_share = every_n_steps, float(check_share)
        self.threads: int | None = None  # the count chosen by the last finished tune
        self.medians: dict[int, float] = {}  # candidate -> median trial step seconds (of the last tune)
        self.aborted: list[int] = []  # candidates given up on in the last tune (stalled ones too)
        self.stalled: list[int] = []  # candidates skipped by the stall check in the last tune
        self.tunes = 0  # finished tunes
        self.reason = "start"  # why the current / last tune ran: start, slower, periodic
        self.overhead_s = 0.0  # estimated extra seconds of the last tune's trial steps
        self.tune_s = 0.0  # host seconds of the steps the last tune spanned (they train; only overhead is extra)
        self.tune_steps = 0  # steps the last tune spanned
        self.total_overhead_s = 0.0  # all tunes of the run
        self.observed_s = 0.0  # all observed step seconds
        self.steps = 0  # all observed steps
        self.baseline: float | None = None  # the step time the running median is compared with
        self._recent: deque[float] = deque(maxlen=self.window)
        self._skip = 0  # settled steps not yet watched (the switch to the chosen count)
        self._since_tune = 0
        self._last_run = cands[0]  # the count of the last trial step
        self._first_step_pending = True  # the run's first step pays one-off costs at any count: not overhead
        self._start("start")

    # ----------------------------------------------------------------- state
    @property
    def tuning(self) -> bool:
        """Whether a tune is cycling the candidates now."""
        return self._idx is not None

    @property
    def next_threads(self) -> int:
        """The thread count the next step should run at."""
        if self._idx is not None:
            return self.candidates[self._idx]
        assert self.threads is not None
        return self.threads

    @property
    def check_due(self) -> tuple[int, float] | None:
        """``(candidate, cap seconds)`` when the next step would be the first at a candidate that a stall check
        should vet first (a best time is known to size its cap); else None."""
        if self._idx is None or self._at or self._checked or not self._medians:
            return None
        return self.candidates[self._idx], self.check_share * self._best()

    def checked(self, stalled: bool, seconds: float) -> bool:
        """Record the stall check of :attr:`check_due`'s candidate (its seconds are overhead); a stalled one is
        skipped. True when that settled the tune."""
        assert self._idx is not None
        self._check_s += seconds
        if not stalled:
            self._checked = True
            return False
        n = self.candidates[self._idx]
        self._aborted.append(n)
        self._stalled.append(n)
        return self._next_candidate()

    def apply(self, check: Callable[[int, float], tuple[bool, float]] | None = parallel_stalls) -> bool:
        """Before a step: run the due stall checks (``check(threads, cap_s) -> (stalled, seconds)``), then set
        ``torch.set_num_threads`` to :attr:`next_threads` when it differs. True when a tune settled here."""
        settled = False
        while check is not None and (due := self.check_due) is not None:
            settled = self.checked(*check(*due)) or settled
        n = self.next_threads
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return settled

    def _start(self, reason: str) -> None:
        self.reason = reason
        self._idx: int | None = 0
        self._at = 0  # steps run at the current candidate
        self._times: list[float] = []  # its timed steps
        self._checked = False  # its stall check passed
        self._check_s = 0.0  # seconds of this tune's stall checks
        self._stalled: list[int] = []
        self._trial: list[float] = []  # every step of this tune that counts as overhead
        self._span_s, self._span_steps = 0.0, 0
        self._medians: dict[int, float] = {}
        self._aborted: list[int] = []

    # --------------------------------------------------------------- observe
    def observe(self, step_seconds: float) -> bool:
        """Feed the host wall time of the step just run at :attr:`next_threads`. True when a tune settled
        at this step (log :meth:`describe`); :attr:`next_threads` may change after any call."""
        dt = float(step_seconds)
        self.steps += 1
        self.observed_s += dt
        if self._idx is not None:
            return self._observe_trial(dt)
        self._since_tune += 1
        if self._skip:
            self._skip -= 1
            return False
        self._recent.append(dt)
        if self.every_n_steps is not None and self._since_tune >= self.every_n_steps:
            self._start("periodic")
            return False
        if len(self._recent) < self.window:
            return False
        running = statistics.median(self._recent)
        assert self.baseline is not None
        if running > self.slow_factor * self.baseline:
            if self.total_overhead_s <= self.max_share * self.observed_s:  # else wait: the budget is spent
                self._start("slower")
        elif self._since_tune % self.window == 0:
            self.baseline = min(self.baseline, running)  # follows speed-ups (non-overlapping windows only)
        return False

    def _observe_trial(self, dt: float) -> bool:
        assert self._idx is not None
        n = self._last_run = self.candidates[self._idx]
        self._span_s += dt
        self._span_steps += 1
        if self._first_step_pending:
            self._first_step_pending = False
        else:
            self._trial.append(dt)
        self._at += 1
        if self._at > self.warmup_steps:
            self._times.append(dt)
        if dt > self.abort_factor * self._best():
            self._aborted.append(n)
            self._medians[n] = statistics.median(self._times or [dt])
            return self._next_candidate()
        if len(self._times) >= self.trial_steps:
            self._medians[n] = statistics.median(self._times)
            return self._next_candidate()
        return False

    def _best(self) -> float:
        """The best median of this tune so far (inf before the first candidate is done)."""
        return min((t for n, t in self._medians.items() if n not in self._aborted), default=float("inf"))

    def _next_candidate(self) -> bool:
        assert self._idx is not None
        if self._idx + 1 < len(self.candidates):
            self._idx += 1
            self._at, self._times, self._checked = 0, [], False
            return False
        return self._settle()

    def _settle(self) -> bool:
        kept = {n: t for n, t in self._medians.items() if n not in self._aborted}
        best = min(kept.values())
        choice = min(n for n, t in kept.items() if t <= best * (1 + self.tie_tolerance))
        switched = choice != self._last_run
        self.threads, self.medians, self.aborted = choice, dict(self._medians), list(self._aborted)
        self.stalled = list(self._stalled)
        self.overhead_s = sum(max(0.0, t - best) for t in self._trial) + self._check_s
        self.total_overhead_s += self.overhead_s
        self.tune_s, self.tune_steps = self._span_s + self._check_s, self._span_steps
        self.tunes += 1
        self.baseline = kept[choice]
        self._recent.clear()
        self._skip = self.warmup_steps if switched else 0
        self._since_tune = 0
        self._idx = None
        return True

    def describe(self) -> dict[str, Any]:
        """Fields of the ``threads_tuned`` event: the choice, per-candidate medians, cost and why."""
        return {
            "threads": self.threads,
            "candidates": list(self.candidates),
            "step_s": {str(n): round(t, 5) for n, t in self.medians.items()},
            "aborted": list(self.aborted),
            "stalled": list(self.stalled),
            "overhead_s": round(self.overhead_s, 4),
            "tune_s": round(self.tune_s, 4),
            "tune_steps": self.tune_steps,
            "total_overhead_s": round(self.total_overhead_s, 4),
            "tunes": self.tunes,
            "reason": self.reason,
        }
