"""H3T-style planner: per-block memory optimisation and sharding that minimise step time under a budget.

Inputs are per-block costs (:class:`CostTable`, measured by :mod:`lotus.parallel.profiler` or written by
hand in tests). Each transformer block ``b`` picks a memory option

* ``none``      keep all saved activations,
* ``offload``   keep them in CPU memory (CUDA only),
* ``selective`` keep matmul/attention outputs, recompute the rest in backward,
* ``full``      keep only the block input, recompute the whole block in backward,

and, under FSDP2, whether its gathered parameters stay unsharded between forward and backward
(``reshard_after_forward=False``, one all-gather less, more memory). The data-parallel mode itself
(``ddp`` or ``fsdp``; ``none`` for one rank) is chosen by solving each and keeping the faster one.

Cost model (per rank, world size ``W``; ``s = 1/W`` under FSDP, else 1)::

    step time = pre + post + sum_b [fwd_b(o) + bwd_b(o) + exposed comm_b] + optimizer step
    peak      = max( tail, max_b backward_b, optimizer )
    backward_b = K_b + sum_{j<b} kept_j + kept_b + peak_b(o) + gathered_b      (backward of block b)
    tail       = K_tail + sum_j kept_j                                          (loss / head backward)

``kept_j = retained_j(o) + unsharded params kept after forward``; ``K_b`` collects what does not depend
on the choices (parameters and optimizer state, gradients already produced for later blocks, the
embedding's activations, the incoming gradient). Because ``backward_b`` only depends on the *prefix*
sum of kept memory, a dynamic programme over blocks whose state is that prefix sum (discretised into
buckets, rounded up so the plan never exceeds the budget under the model) finds the optimum; tests
check it against brute force. :func:`solve_greedy` is the fallback for very large tables.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from lotus.errors import LotusError

__all__ = [
    "MEMORY_OPTIONS",
    "OptionCost",
    "StageCost",
    "BlockCost",
    "CostTable",
    "BlockChoice",
    "Plan",
    "Prediction",
    "PlanInfeasible",
    "evaluate",
    "solve_dp",
    "solve_greedy",
    "brute_force",
    "minimum_memory",
    "make_plan",
    "uniform_choices",
    "scale_batch",
    "write_plan",
    "read_plan",
    "plan_table",
]

MEMORY_OPTIONS = ("none", "offload", "selective", "full")
PLAN_FORMAT = "lotus-parallel-plan"
PLAN_VERSION = 1


class PlanInfeasible(LotusError):
    """No assignment fits the budget; ``min_bytes`` is the least memory any assignment needs."""

    def __init__(self, message: str, min_bytes: float | None = None):
        super().__init__(message)
        self.min_bytes = min_bytes


# --------------------------------------------------------------------------------------------------
# Cost tables
# --------------------------------------------------------------------------------------------------

@dataclass
class OptionCost:
    """Measured cost of one block under one memory option (one rank, no communication)."""

    fwd_s: float
    bwd_s: float  # includes recomputation and offload copies
    retained_bytes: float  # held from the block's forward to its backward (includes its output)
    peak_bytes: float  # extra memory at the peak of its backward, above what was held just before


@dataclass
class StageCost:
    """The parts around the blocks: embedding (pre) or final norm + head + loss (post)."""

    fwd_s: float = 0.0
    bwd_s: float = 0.0
    retained_bytes: float = 0.0
    peak_bytes: float = 0.0
    param_bytes: float = 0.0
    grad_bytes: float = 0.0
    allgather_s: float = 0.0
    reduce_scatter_s: float = 0.0
    allreduce_s: float = 0.0


@dataclass
class BlockCost:
    """One transformer block: its options' costs, its parameters and their communication times."""

    options: dict[str, OptionCost]
    param_bytes: float  # full (unsharded) parameters, storage dtype
    grad_bytes: float  # full gradients
    output_bytes: float  # block output (= size of the gradient flowing into its backward)
    gathered_bytes: float | None = None  # unsharded parameters in compute dtype (bf16 with mixed precision)
    allgather_s: float = 0.0  # FSDP: all-gather of the block's parameters
    reduce_scatter_s: float = 0.0  # FSDP: reduce-scatter of its gradients
    allreduce_s: float = 0.0  # DDP: all-reduce of its gradients

    @property
    def gathered(self) -> float:
        return self.param_bytes if self.gathered_bytes is None else self.gathered_bytes


@dataclass
class CostTable:
    """Everything the planner needs about one model, batch size and device."""

    blocks: list[BlockCost]
    batch_size: int = 1
    world_size: int = 1
    device: str = "cpu"
    pre: StageCost = field(default_factory=StageCost)
    post: StageCost = field(default_factory=StageCost)
    optimizer_state_bytes: float = 0.0  # whole model, unsharded
    optimizer_step_s: float = 0.0  # whole model on one rank
    optimizer_peak_bytes: float = 0.0  # temporaries during the step, whole model
    overlap_comm: bool = False  # communication runs concurrently with compute (CUDA streams)
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: sharded state lives on the host
    host_bandwidth: float = 12e9  # bytes/s for offload copies (CPU offload of parameters)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def options(self) -> list[str]:
        """Memory options available on every block (offload only where measured, i.e. on CUDA)."""
        return [o for o in MEMORY_OPTIONS if all(o in b.options for b in self.blocks)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostTable":
        d = dict(d)
        d["blocks"] = [
            BlockCost(**{**b, "options": {k: OptionCost(**v) for k, v in b["options"].items()}}) for b in d["blocks"]
        ]
        d["pre"] = StageCost(**d.get("pre", {}))
        d["post"] = StageCost(**d.get("post", {}))
        return cls(**d)


@dataclass(frozen=True)
class BlockChoice:
    """What one block does: a memory option and (FSDP) whether to reshard after forward."""

    memory: str = "none"
    reshard_after_forward: bool = True

    @property
    def ac(self) -> str:
        return self.memory if self.memory in ("full", "selective") else "none"

    @property
    def offload(self) -> bool:
        return self.memory == "offload"


@dataclass
class Prediction:
    peak_bytes: float
    step_time_s: float
    peak_at: str
    block_peak_bytes: list[float]
    block_time_s: list[float]
    static_bytes: float
    activation_bytes: float  # held at the end of forward: every block's kept memory + embedding + head


def uniform_choices(n: int, memory: str = "none", reshard: bool = True) -> list[BlockChoice]:
    return [BlockChoice(memory, reshard) for _ in range(n)]


def scale_batch(table: CostTable, batch_size: int) -> CostTable:
    """The table at another per-rank batch size, scaling activation memory and compute time linearly.

    Parameters, optimizer state and communication do not depend on the batch. Activation memory is
    proportional to the batch (up to small batch-independent workspaces); compute time nearly so on a
    saturated device. Used to search for the largest batch that fits; verify the result by measuring.
    """
    import copy

    f = batch_size / table.batch_size
    t = copy.deepcopy(table)
    t.batch_size = batch_size
    for b in t.blocks:
        b.output_bytes *= f
        for o in b.options.values():
            o.fwd_s, o.bwd_s, o.retained_bytes, o.peak_bytes = o.fwd_s * f, o.bwd_s * f, o.retained_bytes * f, o.peak_bytes * f
    for st in (t.pre, t.post):
        st.fwd_s, st.bwd_s, st.retained_bytes, st.peak_bytes = st.fwd_s * f, st.bwd_s * f, st.retained_bytes * f, st.peak_bytes * f
    return t


# --------------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------------

def _shard(table: CostTable, mode: str) -> float:
    return 1.0 / table.world_size if mode == "fsdp" else 1.0


def _comm_time(compute: float, comm: float, overlap: bool) -> float:
    return max(0.0, comm - compute) if overlap else comm


def _block_time(table: CostTable, mode: str, b: BlockCost, c: BlockChoice) -> float:
    o = b.options[c.memory]
    t = o.fwd_s + o.bwd_s
    if mode == "fsdp" and table.world_size > 1:
        fwd_comm = b.allgather_s
        bwd_comm = b.reduce_scatter_s + (b.allgather_s if c.reshard_after_forward else 0.0)
        t += _comm_time(o.fwd_s, fwd_comm, table.overlap_comm) + _comm_time(o.bwd_s, bwd_comm, table.overlap_comm)
    elif mode == "ddp" and table.world_size > 1:
        t += _comm_time(o.bwd_s, b.allreduce_s, table.overlap_comm)
    return t


def _fixed_time(table: CostTable, mode: str) -> float:
    s = _shard(table, mode)
    t = table.pre.fwd_s + table.pre.bwd_s + table.post.fwd_s + table.post.bwd_s + table.optimizer_step_s * s
    if table.world_size > 1:
        for st in (table.pre, table.post):
            if mode == "fsdp":
                t += st.allgather_s + st.reduce_scatter_s
            elif mode == "ddp":
                t += st.allreduce_s
    if mode == "fsdp" and table.cpu_offload:
        moved = (sum(b.param_bytes + b.grad_bytes for b in table.blocks)
                 + table.pre.param_bytes + table.pre.grad_bytes + table.post.param_bytes + table.post.grad_bytes)
        t += moved * s / table.host_bandwidth
    return t


def _kept(table: CostTable, mode: str, b: BlockCost, c: BlockChoice) -> float:
    """Memory a block holds from its forward until its backward."""
    kept = b.options[c.memory].retained_bytes
    if mode == "fsdp" and table.world_size > 1 and not c.reshard_after_forward:
        kept += b.gathered
    return kept


def _own_extra(table: CostTable, mode: str, b: BlockCost, c: BlockChoice) -> float:
    """Memory a block adds at its own backward on top of the prefix of kept memory."""
    extra = _kept(table, mode, b, c) + b.options[c.memory].peak_bytes
    if mode == "fsdp" and table.world_size > 1 and c.reshard_after_forward:
        extra += b.gathered  # gathered again for its backward
    return extra


def _constants(table: CostTable, mode: str) -> tuple[list[float], float, float, float]:
    """Choice-independent memory: (K_b per block, K_tail, optimizer-step peak, static)."""
    s = _shard(table, mode)
    blocks = table.blocks
    params = sum(b.param_bytes for b in blocks) + table.pre.param_bytes + table.post.param_bytes
    grads = sum(b.grad_bytes for b in blocks) + table.pre.grad_bytes + table.post.grad_bytes
    on_host = mode == "fsdp" and table.cpu_offload
    static = 0.0 if on_host else (params + table.optimizer_state_bytes) * s
    # Gradients: DDP keeps them in its persistent buckets; otherwise they appear during backward
    # (the Trainer zeroes them with set_to_none) and FSDP keeps only the local shard.
    persistent_grads = grads if mode == "ddp" else 0.0
    static += persistent_grads
    root_gathered = 0.0
    if mode == "fsdp" and table.world_size > 1:
        root_gathered = table.pre.param_bytes + table.post.param_bytes  # root stays gathered during the step
    ks = []
    n = len(blocks)
    for i, b in enumerate(blocks):
        later = 0.0 if mode == "ddp" else (sum(x.grad_bytes for x in blocks[i + 1:]) + table.post.grad_bytes) * (
            0.0 if on_host else s)
        prefetch = blocks[i - 1].gathered if (mode == "fsdp" and table.world_size > 1 and i > 0) else 0.0
        ks.append(static + root_gathered + table.pre.retained_bytes + later + b.output_bytes + prefetch)
    k_tail = static + root_gathered + table.pre.retained_bytes + table.post.retained_bytes + table.post.peak_bytes
    if mode == "fsdp" and table.world_size > 1 and n:
        k_tail += blocks[-1].gathered  # last block is prefetched while the head runs backward
    opt_grads = 0.0 if mode == "ddp" else grads * (0.0 if on_host else s)
    k_opt = static + opt_grads + (0.0 if on_host else table.optimizer_peak_bytes * s)
    return ks, k_tail, k_opt, static


def evaluate(table: CostTable, mode: str, choices: list[BlockChoice]) -> Prediction:
    """Predicted per-rank peak memory and step time of ``choices`` under ``mode``."""
    if len(choices) != table.num_blocks:
        raise ValueError(f"plan: expected {table.num_blocks} block choices, got {len(choices)}")
    ks, k_tail, k_opt, static = _constants(table, mode)
    prefix = 0.0
    block_peaks, block_times = [], []
    for b, c, k in zip(table.blocks, choices, ks):
        if c.memory not in b.options:
            raise ValueError(f"plan: memory option {c.memory!r} was not profiled (available: {', '.join(b.options)})")
        block_peaks.append(k + prefix + _own_extra(table, mode, b, c))
        block_times.append(_block_time(table, mode, b, c))
        prefix += _kept(table, mode, b, c)
    tail = k_tail + prefix
    candidates = [(tail, "head backward"), (k_opt, "optimizer step")]
    candidates += [(p, f"block {i} backward") for i, p in enumerate(block_peaks)]
    peak, where = max(candidates, key=lambda x: x[0])
    return Prediction(peak_bytes=peak, step_time_s=_fixed_time(table, mode) + sum(block_times), peak_at=where,
                      block_peak_bytes=block_peaks, block_time_s=block_times, static_bytes=static,
                      activation_bytes=prefix + table.pre.retained_bytes + table.post.retained_bytes)


def _candidates(table: CostTable, mode: str, options: Iterable[str] | None) -> list[BlockChoice]:
    opts = [o for o in (options or table.options()) if o in table.options()]
    if not opts:
        raise ValueError(f"planner: none of the requested memory options was profiled ({', '.join(table.options())})")
    reshards = [True, False] if (mode == "fsdp" and table.world_size > 1) else [True]
    return [BlockChoice(o, r) for o in opts for r in reshards]


# --------------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------------

def solve_dp(table: CostTable, mode: str, budget: float, buckets: int = 1024,
             options: Iterable[str] | None = None) -> list[BlockChoice] | None:
    """Fastest per-block choices whose predicted peak fits ``budget`` (None if none does).

    Dynamic programme over blocks; the state is the memory kept by earlier blocks, in ``buckets``
    steps of ``budget / buckets`` rounded up (so a returned plan always fits under the cost model; a
    plan that fits only within one bucket of the budget may be missed).
    """
    cands = _candidates(table, mode, options)
    ks, k_tail, k_opt, _ = _constants(table, mode)
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
            extra = _own_extra(table, mode, b, c)
            room = budget - k - extra  # prefix (m * res) must stay within this
            if room < 0:
                continue
            m_max = min(buckets, int(math.floor(room / res + 1e-9)))
            d = int(math.ceil(_kept(table, mode, b, c) / res - 1e-9))
            if d > buckets:
                continue
            hi = min(m_max, buckets - d)
            if hi < 0:
                continue
            src = dp[: hi + 1] + _block_time(table, mode, b, c)
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


def brute_force(table: CostTable, mode: str, budget: float,
                options: Iterable[str] | None = None) -> list[BlockChoice] | None:
    """Exhaustive search (for tests and tiny models): the fastest assignment that fits."""
    cands = _candidates(table, mode, options)
    best, best_t = None, math.inf
    for combo in itertools.product(cands, repeat=table.num_blocks):
        p = evaluate(table, mode, list(combo))
        if p.peak_bytes <= budget and p.step_time_s < best_t:
            best, best_t = list(combo), p.step_time_s
    return best


def solve_greedy(table: CostTable, mode: str, budget: float,
                 options: Iterable[str] | None = None) -> list[BlockChoice] | None:
    """Start from the fastest choice per block; repeatedly take the change that saves the most peak
    memory per second of added step time until the plan fits (None if nothing more helps)."""
    cands = _candidates(table, mode, options)
    choices = [min(cands, key=lambda c, b=b: _block_time(table, mode, b, c)) for b in table.blocks]
    pred = evaluate(table, mode, choices)
    while pred.peak_bytes > budget:
        best = None
        for i, b in enumerate(table.blocks):
            for c in cands:
                if c == choices[i]:
                    continue
                trial = choices[:i] + [c] + choices[i + 1:]
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


def minimum_memory(table: CostTable, mode: str, options: Iterable[str] | None = None,
                   buckets: int = 1024) -> float:
    """Least predicted peak memory of any assignment (bisection on the budget with :func:`solve_dp`)."""
    cands = _candidates(table, mode, options)
    lo = 0.0
    # Memory-lightest choice per block is always feasible at its own peak: an upper bound.
    light = [min(cands, key=lambda c, b=b: (_kept(table, mode, b, c), _own_extra(table, mode, b, c)))
             for b in table.blocks]
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


# --------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """A per-block assignment plus the data-parallel mode, with what the cost model predicts for it."""

    mode: str
    world_size: int
    blocks: list[BlockChoice]
    batch_size: int = 1
    budget_bytes: float | None = None
    predicted_peak_bytes: float | None = None
    predicted_step_time_s: float | None = None
    peak_at: str | None = None
    block_peak_bytes: list[float] = field(default_factory=list)
    block_time_s: list[float] = field(default_factory=list)
    device: str = "cpu"
    cpu_offload: bool = False
    mixed_precision: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT, "version": PLAN_VERSION,
            "mode": self.mode, "world_size": self.world_size, "batch_size": self.batch_size,
            "device": self.device, "cpu_offload": self.cpu_offload, "mixed_precision": self.mixed_precision,
            "memory_budget_bytes": self.budget_bytes,
            "predicted": {"peak_bytes": self.predicted_peak_bytes, "step_time_s": self.predicted_step_time_s,
                          "peak_at": self.peak_at},
            "num_blocks": self.num_blocks,
            "blocks": [
                {"index": i, "memory": c.memory, "activation_checkpoint": c.ac, "offload_activations": c.offload,
                 "reshard_after_forward": c.reshard_after_forward,
                 "predicted_peak_bytes": self.block_peak_bytes[i] if i < len(self.block_peak_bytes) else None,
                 "predicted_time_s": self.block_time_s[i] if i < len(self.block_time_s) else None}
                for i, c in enumerate(self.blocks)
            ],
            "meta": self.meta,
        }


def _plan_from(table: CostTable, mode: str, choices: list[BlockChoice], budget: float | None,
               mixed_precision: bool = False, meta: dict | None = None) -> Plan:
    pred = evaluate(table, mode, choices)
    return Plan(mode=mode, world_size=table.world_size, blocks=choices, batch_size=table.batch_size,
                budget_bytes=budget, predicted_peak_bytes=pred.peak_bytes, predicted_step_time_s=pred.step_time_s,
                peak_at=pred.peak_at, block_peak_bytes=pred.block_peak_bytes, block_time_s=pred.block_time_s,
                device=table.device, cpu_offload=table.cpu_offload, mixed_precision=mixed_precision,
                meta={**table.meta, **(meta or {})})


def _fmt(n: float) -> str:
    from lotus.parallel.config import format_bytes

    return format_bytes(n)


def make_plan(table: CostTable, budget: float, modes: Iterable[str] | None = None, method: str = "dp",
              buckets: int = 1024, options: Iterable[str] | None = None,
              mixed_precision: bool = False) -> Plan:
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
        raise ValueError(f"planner modes: expected ddp/fsdp for {table.world_size} ranks (none for one), "
                         f"got {bad or 'nothing'}")
    if method == "auto":
        method = "dp" if table.num_blocks * buckets * 8 <= 5e7 else "greedy"
    best: Plan | None = None
    for mode in modes:
        choices = (solve_dp(table, mode, budget, buckets, options) if method == "dp"
                   else solve_greedy(table, mode, budget, options))
        if choices is None:
            continue
        plan = _plan_from(table, mode, choices, budget, mixed_precision, {"solver": method})
        if best is None or plan.predicted_step_time_s < best.predicted_step_time_s:
            best = plan
    if best is None:
        need = min(minimum_memory(table, m, options, buckets) for m in modes)
        raise PlanInfeasible(
            f"memory budget {_fmt(budget)} is infeasible: batch {table.batch_size} per rank on "
            f"{table.world_size} rank(s) needs at least {_fmt(need)} per rank even with every block "
            f"checkpointed{' and sharded' if table.world_size > 1 else ''} (raise the budget, lower the batch "
            "size or add ranks)",
            min_bytes=need,
        )
    return best


def write_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write the plan as JSON atomically (a failed write leaves any previous file intact)."""
    from lotus.checkpoint import atomic_write_text

    atomic_write_text(os.fspath(path), json.dumps(plan.to_dict(), indent=2) + "\n")


def read_plan(path: str | os.PathLike, num_blocks: int | None = None) -> Plan:
    """Load and check a plan file written by :func:`write_plan` (``lotus plan --out``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LotusError(f"parallel.plan: {path} not found (write one with `lotus plan --config C --out {path}`)")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LotusError(f"parallel.plan: {path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
        raise LotusError(f"parallel.plan: {path} is not a Lotus plan (expected \"format\": \"{PLAN_FORMAT}\")")
    if d.get("version") != PLAN_VERSION:
        raise LotusError(f"parallel.plan: {path} has plan version {d.get('version')!r}; this Lotus reads {PLAN_VERSION}")
    mode = d.get("mode")
    if mode not in ("none", "ddp", "fsdp"):
        raise LotusError(f"parallel.plan: {path}: mode: expected 'none', 'ddp' or 'fsdp', got {mode!r}")
    blocks = d.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise LotusError(f"parallel.plan: {path}: blocks: expected a non-empty list")
    choices = []
    for i, b in enumerate(blocks):
        mem = b.get("memory") if isinstance(b, dict) else None
        if mem not in MEMORY_OPTIONS:
            raise LotusError(f"parallel.plan: {path}: blocks[{i}].memory: expected one of "
                             f"{', '.join(MEMORY_OPTIONS)}, got {mem!r}")
        r = b.get("reshard_after_forward", True)
        if not isinstance(r, bool):
            raise LotusError(f"parallel.plan: {path}: blocks[{i}].reshard_after_forward: expected true/false, got {r!r}")
        choices.append(BlockChoice(mem, r))
    if num_blocks is not None and len(choices) != num_blocks:
        raise LotusError(f"parallel.plan: {path} plans {len(choices)} blocks but the model has {num_blocks}; "
                         "re-run `lotus plan` for this model")
    pred = d.get("predicted") or {}
    per = [b.get("predicted_peak_bytes") for b in blocks]
    tim = [b.get("predicted_time_s") for b in blocks]
    ws = d.get("world_size", 1)
    if not isinstance(ws, int) or ws < 1:
        raise LotusError(f"parallel.plan: {path}: world_size: expected an integer >= 1, got {ws!r}")
    bs = d.get("batch_size", 1)
    if not isinstance(bs, int) or bs < 1:
        raise LotusError(f"parallel.plan: {path}: batch_size: expected an integer >= 1, got {bs!r}")
    return Plan(mode=mode, world_size=ws, blocks=choices, batch_size=bs,
                budget_bytes=d.get("memory_budget_bytes"), predicted_peak_bytes=pred.get("peak_bytes"),
                predicted_step_time_s=pred.get("step_time_s"), peak_at=pred.get("peak_at"),
                block_peak_bytes=per if all(v is not None for v in per) else [],
                block_time_s=tim if all(v is not None for v in tim) else [],
                device=d.get("device", "cpu"), cpu_offload=bool(d.get("cpu_offload", False)),
                mixed_precision=bool(d.get("mixed_precision", False)), meta=d.get("meta") or {})


def plan_table(plan: Plan) -> str:
    """Markdown table of a plan: one row per block, then the predicted totals."""
    rows = ["| block | memory option | reshard after fwd | peak at its backward | time (ms) |",
            "|---:|---|---|---:|---:|"]
    for i, c in enumerate(plan.blocks):
        peak = _fmt(plan.block_peak_bytes[i]) if i < len(plan.block_peak_bytes) else "-"
        t = f"{plan.block_time_s[i] * 1e3:.2f}" if i < len(plan.block_time_s) else "-"
        rs = ("yes" if c.reshard_after_forward else "no") if plan.mode == "fsdp" else "-"
        rows.append(f"| {i} | {c.memory} | {rs} | {peak} | {t} |")
    lines = ["\n".join(rows), ""]
    if plan.predicted_peak_bytes is not None:
        budget = f" (budget {_fmt(plan.budget_bytes)})" if plan.budget_bytes else ""
        lines.append(f"mode {plan.mode}, world size {plan.world_size}, batch {plan.batch_size}/rank: predicted peak "
                     f"{_fmt(plan.predicted_peak_bytes)} per rank{budget} at {plan.peak_at}; predicted step "
                     f"{plan.predicted_step_time_s * 1e3:.1f} ms")
    return "\n".join(lines)
