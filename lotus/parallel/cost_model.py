"""The planner's cost model: predicted per-rank peak memory and step time of a per-block assignment.

Per rank, world size ``W``; ``s = 1/W`` under FSDP, else 1::

    step time = pre + post + sum_b [fwd_b(o) + bwd_b(o) + exposed comm_b] + optimizer step
    peak      = max( tail, max_b backward_b, optimizer )
    backward_b = K_b + sum_{j<b} kept_j + kept_b + peak_b(o) + gathered_b      (backward of block b)
    tail       = K_tail + sum_j kept_j                                          (loss / head backward)

``kept_j = retained_j(o) + unsharded params kept after forward``; ``K_b`` collects what does not depend
on the choices (parameters and optimizer state, gradients already produced for later blocks, the
embedding's activations, the incoming gradient), see :func:`fixed_memory`. ``backward_b`` depends on
the choices of earlier blocks only through the *prefix* sum of kept memory, which is what lets
:func:`lotus.parallel.planner.solve_dp` search exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lotus.parallel.cost_table import BlockCost, CostTable
from lotus.parallel.plan_file import BlockChoice

__all__ = ["Prediction", "evaluate", "candidates", "block_time", "kept_bytes", "own_extra_bytes", "fixed_memory"]


@dataclass
class Prediction:
    """What the cost model predicts for one assignment (per rank)."""

    peak_bytes: float
    step_time_s: float
    peak_at: str
    block_peak_bytes: list[float]
    block_time_s: list[float]
    static_bytes: float
    activation_bytes: float  # held at the end of forward: every block's kept memory + embedding + head


def _shard(table: CostTable, mode: str) -> float:
    """Fraction of the parameters and optimizer state one rank holds."""
    return 1.0 / table.world_size if mode == "fsdp" else 1.0


def _comm_time(compute: float, comm: float, overlap: bool) -> float:
    """Communication time not hidden behind ``compute`` (all of it without overlap)."""
    return max(0.0, comm - compute) if overlap else comm


def block_time(table: CostTable, mode: str, b: BlockCost, c: BlockChoice) -> float:
    """Forward + backward time of one block under choice ``c``, with its exposed communication."""
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
    """Choice-independent time: embedding, head, their communication, optimizer step, CPU-offload copies."""
    s = _shard(table, mode)
    t = table.pre.fwd_s + table.pre.bwd_s + table.post.fwd_s + table.post.bwd_s + table.optimizer_step_s * s
    if table.world_size > 1:
        for st in (table.pre, table.post):
            if mode == "fsdp":
                t += st.allgather_s + st.reduce_scatter_s
            elif mode == "ddp":
                t += st.allreduce_s
    if mode == "fsdp" and table.cpu_offload:
        moved = (
            sum(b.param_bytes + b.grad_bytes for b in table.blocks)
            + table.pre.param_bytes
            + table.pre.grad_bytes
            + table.post.param_bytes
            + table.post.grad_bytes
        )
        t += moved * s / table.host_bandwidth
    return t


def kept_bytes(table: CostTable, mode: str, b: BlockCost, c: BlockChoice) -> float:
    """Memory a block holds from its forward until its backward."""
    kept = b.options[c.memory].retained_bytes
    if mode == "fsdp" and table.world_size > 1 and not c.reshard_after_forward:
        kept += b.gathered
    return kept


def own_extra_bytes(table: CostTable, mode: str, b: BlockCost, c: BlockChoice) -> float:
    """Memory a block adds at its own backward on top of the prefix of kept memory."""
    extra = kept_bytes(table, mode, b, c) + b.options[c.memory].peak_bytes
    if mode == "fsdp" and table.world_size > 1 and c.reshard_after_forward:
        extra += b.gathered  # gathered again for its backward
    return extra


def fixed_memory(table: CostTable, mode: str) -> tuple[list[float], float, float, float]:
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
        later = (
            0.0
            if mode == "ddp"
            else (sum(x.grad_bytes for x in blocks[i + 1 :]) + table.post.grad_bytes) * (0.0 if on_host else s)
        )
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
    ks, k_tail, k_opt, static = fixed_memory(table, mode)
    prefix = 0.0
    block_peaks, block_times = [], []
    for b, c, k in zip(table.blocks, choices, ks):
        if c.memory not in b.options:
            raise ValueError(f"plan: memory option {c.memory!r} was not profiled (available: {', '.join(b.options)})")
        block_peaks.append(k + prefix + own_extra_bytes(table, mode, b, c))
        block_times.append(block_time(table, mode, b, c))
        prefix += kept_bytes(table, mode, b, c)
    tail = k_tail + prefix
    peaks = [(tail, "head backward"), (k_opt, "optimizer step")]
    peaks += [(p, f"block {i} backward") for i, p in enumerate(block_peaks)]
    peak, where = max(peaks, key=lambda x: x[0])
    return Prediction(
        peak_bytes=peak,
        step_time_s=_fixed_time(table, mode) + sum(block_times),
        peak_at=where,
        block_peak_bytes=block_peaks,
        block_time_s=block_times,
        static_bytes=static,
        activation_bytes=prefix + table.pre.retained_bytes + table.post.retained_bytes,
    )


def candidates(table: CostTable, mode: str, options: Iterable[str] | None) -> list[BlockChoice]:
    """Every choice a block may take: the requested profiled options, times resharding under FSDP."""
    opts = [o for o in (options or table.options()) if o in table.options()]
    if not opts:
        raise ValueError(f"planner: none of the requested memory options was profiled ({', '.join(table.options())})")
    reshards = [True, False] if (mode == "fsdp" and table.world_size > 1) else [True]
    return [BlockChoice(o, r) for o in opts for r in reshards]
