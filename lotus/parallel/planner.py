"""H3T-style planner: per-block memory optimisation and sharding that minimise step time under a budget.

Inputs are per-block costs (:class:`~lotus.parallel.cost_table.CostTable`, measured by
:mod:`lotus.parallel.profiler` or written by hand in tests). Each transformer block ``b`` picks a memory
option

* ``none``      keep all saved activations,
* ``offload``   keep them in CPU memory (CUDA only),
* ``selective`` keep matmul/attention outputs, recompute the rest in backward,
* ``full``      keep only the block input, recompute the whole block in backward,

and, under FSDP2, whether its gathered parameters stay unsharded between forward and backward
(``reshard_after_forward=False``, one all-gather less, more memory). The data-parallel mode itself
(``ddp`` or ``fsdp``; ``none`` for one rank) is chosen by solving each and keeping the faster one.

The search runs over :mod:`lotus.parallel.cost_model`'s predictions. Because a block's backward peak
only depends on the *prefix* sum of memory kept by earlier blocks, a dynamic programme over blocks
whose state is that prefix sum (discretised into buckets, rounded up so the plan never exceeds the
budget under the model) finds the optimum; tests check it against brute force. :func:`solve_greedy`
is the fallback for very large tables.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np

from lotus.errors import LotusError
from lotus.parallel.config import format_bytes
from lotus.parallel.cost_model import block_time, candidates, evaluate, fixed_memory, kept_bytes, own_extra_bytes
from lotus.parallel.cost_table import CostTable
from lotus.parallel.plan_file import BlockChoice, Plan

__all__ = ["PlanInfeasible", "solve_dp", "solve_greedy", "brute_force", "minimum_memory", "make_plan"]


class PlanInfeasible(LotusError):
    """No assignment fits the budget; ``min_bytes`` is the least memory any assignment needs."""

    def __init__(self, message: str, min_bytes: float | None = None):
        super().__init__(message)
        self.min_bytes = min_bytes


def solve_dp(
    table: CostTable, mode: str, budget: float, buckets: int = 1024, options: Iterable[str] | None = None
) -> list[BlockChoice] | None:
    """Fastest per-block choices whose predicted peak fits ``budget`` (None if none does).

    Dynamic programme over blocks; the state is the memory kept by earlier blocks, in ``buckets``
    steps of ``budget / buckets`` rounded up (so a returned plan always fits under the cost model; a
    plan that fits only within one bucket of the budget may be missed).
    """
    cands = candidates(table, mode, options)
    ks, k_tail, k_opt, _ = fixed_memory(table, mode)
    if k_opt > budget:
        return None
    res = budget / buckets
    inf = math.inf
    dp = np.full(buckets + 1, inf)
    dp[0] = 0.0
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for b, k in zip(table.blocks, ks):
        new = np.full(buckets + 1, inf)
        arg_c = np.full(buckets + 1, -1, dtype=np.int64)
        arg_m = np.full(buckets + 1, -1, dtype=np.int64)
        for ci, c in enumerate(cands):
            extra = own_extra_bytes(table, mode, b, c)
            room = budget - k - extra  # prefix (m * res) must stay within this
            if room < 0:
                continue
            m_max = min(buckets, int(math.floor(room / res + 1e-9)))
            d = int(math.ceil(kept_bytes(table, mode, b, c) / res - 1e-9))
            if d > buckets:
                continue
            hi = min(m_max, buckets - d)
            if hi < 0:
                continue
            src = dp[: hi + 1] + block_time(table, mode, b, c)
            dst = new[d : d + hi + 1]
            better = src < dst
            if better.any():
                idx = np.nonzero(better)[0]
                new[d + idx] = src[idx]
                arg_c[d + idx] = ci
                arg_m[d + idx] = idx
        back.append((arg_c, arg_m))
        dp = new
        if not np.isfinite(dp).any():
            return None
    # Tail constraint: the head's backward sees every block's kept memory.
    m_tail = int(math.floor((budget - k_tail) / res + 1e-9)) if budget >= k_tail else -1
    if m_tail < 0:
        return None
    final = dp[: min(m_tail, buckets) + 1]
    if not np.isfinite(final).any():
        return None
    m = int(np.argmin(final))
    out: list[BlockChoice] = []
    for arg_c, arg_m in reversed(back):
        ci = int(arg_c[m])
        out.append(cands[ci])
        m = int(arg_m[m])
    return list(reversed(out))


def brute_force(
    table: CostTable, mode: str, budget: float, options: Iterable[str] | None = None
) -> list[BlockChoice] | None:
    """Exhaustive search (for tests and tiny models): the fastest assignment that fits."""
    cands = candidates(table, mode, options)
    best, best_t = None, math.inf
    for combo in itertools.product(cands, repeat=table.num_blocks):
        p = evaluate(table, mode, list(combo))
        if p.peak_bytes <= budget and p.step_time_s < best_t:
            best, best_t = list(combo), p.step_time_s
    return best


def solve_greedy(
    table: CostTable, mode: str, budget: float, options: Iterable[str] | None = None
) -> list[BlockChoice] | None:
    """Start from the fastest choice per block; repeatedly take the change that saves the most peak
    memory per second of added step time until the plan fits (None if nothing more helps)."""
    cands = candidates(table, mode, options)
    choices = [min(cands, key=lambda c, b=b: block_time(table, mode, b, c)) for b in table.blocks]
    pred = evaluate(table, mode, choices)
    while pred.peak_bytes > budget:
        best = None
        for i in range(len(table.blocks)):
            for c in cands:
                if c == choices[i]:
                    continue
                trial = choices[:i] + [c] + choices[i + 1 :]
                p = evaluate(table, mode, trial)
                saved = pred.peak_bytes - p.peak_bytes
                if saved <= 0:
                    continue
                cost = max(p.step_time_s - pred.step_time_s, 1e-12)
                score = saved / cost
                if best is None or score > best[0]:
                    best = (score, trial, p)
        if best is None:
            return None
        _, choices, pred = best
    return choices


def minimum_memory(table: CostTable, mode: str, options: Iterable[str] | None = None, buckets: int = 1024) -> float:
    """Least predicted peak memory of any assignment (bisection on the budget with :func:`solve_dp`)."""
    cands = candidates(table, mode, options)
    lo = 0.0
    # Memory-lightest choice per block is always feasible at its own peak: an upper bound.
    light = [
        min(cands, key=lambda c, b=b: (kept_bytes(table, mode, b, c), own_extra_bytes(table, mode, b, c)))
        for b in table.blocks
    ]
    hi = evaluate(table, mode, light).peak_bytes
    for _ in range(40):
        mid = (lo + hi) / 2
        if solve_dp(table, mode, mid, buckets, options) is None:
            lo = mid
        else:
            hi = mid
        if hi - lo <= max(1.0, hi * 1e-4):
            break
    return hi


def _plan_from(
    table: CostTable,
    mode: str,
    choices: list[BlockChoice],
    budget: float | None,
    mixed_precision: bool = False,
    meta: dict | None = None,
) -> Plan:
    """A :class:`Plan` of ``choices`` carrying the cost model's predictions and the table's metadata."""
    pred = evaluate(table, mode, choices)
    return Plan(
        mode=mode,
        world_size=table.world_size,
        blocks=choices,
        batch_size=table.batch_size,
        budget_bytes=budget,
        predicted_peak_bytes=pred.peak_bytes,
        predicted_step_time_s=pred.step_time_s,
        peak_at=pred.peak_at,
        block_peak_bytes=pred.block_peak_bytes,
        block_time_s=pred.block_time_s,
        device=table.device,
        cpu_offload=table.cpu_offload,
        mixed_precision=mixed_precision,
        meta={**table.meta, **(meta or {})},
    )


def make_plan(
    table: CostTable,
    budget: float,
    modes: Iterable[str] | None = None,
    method: str = "dp",
    buckets: int = 1024,
    options: Iterable[str] | None = None,
    mixed_precision: bool = False,
) -> Plan:
    """The fastest plan within ``budget`` bytes per rank over the given data-parallel ``modes``.

    ``modes`` default: ``none`` for one rank, else ``ddp`` and ``fsdp``. ``method``: ``dp`` (exact up
    to the memory discretisation), ``greedy``, or ``auto`` (dp, greedy if the table is huge).
    Raises :class:`PlanInfeasible` (one line, with the minimum memory needed) when nothing fits.
    """
    if method not in ("dp", "greedy", "auto"):
        raise ValueError(f"planner method: expected 'dp', 'greedy' or 'auto', got {method!r}")
    if budget <= 0:
        raise ValueError(f"memory budget: expected a positive number of bytes, got {budget!r}")
    modes = list(modes) if modes else (["none"] if table.world_size <= 1 else ["ddp", "fsdp"])
    modes = [m for m in modes if not (m == "none" and table.world_size > 1)]
    bad = [m for m in modes if m not in ("none", "ddp", "fsdp")]
    if not modes or bad:
        raise ValueError(
            f"planner modes: expected ddp/fsdp for {table.world_size} ranks (none for one), got {bad or 'nothing'}"
        )
    if method == "auto":
        method = "dp" if table.num_blocks * buckets * 8 <= 5e7 else "greedy"
    best: Plan | None = None
    for mode in modes:
        choices = (
            solve_dp(table, mode, budget, buckets, options)
            if method == "dp"
            else solve_greedy(table, mode, budget, options)
        )
        if choices is None:
            continue
        plan = _plan_from(table, mode, choices, budget, mixed_precision, {"solver": method})
        if best is None or plan.predicted_step_time_s < best.predicted_step_time_s:
            best = plan
    if best is None:
        need = min(minimum_memory(table, m, options, buckets) for m in modes)
        raise PlanInfeasible(
            f"memory budget {format_bytes(budget)} is infeasible: batch {table.batch_size} per rank on "
            f"{table.world_size} rank(s) needs at least {format_bytes(need)} per rank even with every block "
            f"checkpointed{' and sharded' if table.world_size > 1 else ''} (raise the budget, lower the batch "
            "size or add ranks)",
            min_bytes=need,
        )
    return best
