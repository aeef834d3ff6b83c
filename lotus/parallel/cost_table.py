"""The planner's input: per-block time and memory of one model under each memory option.

A :class:`CostTable` is measured by :func:`lotus.parallel.profiler.profile_model`, saved with
``lotus plan --save-profile`` (:meth:`CostTable.to_dict`) or written by hand in tests. It holds one
rank's view: full (unsharded) sizes and one rank's compute times; the cost model applies sharding.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["MEMORY_OPTIONS", "OptionCost", "StageCost", "BlockCost", "CostTable", "scale_batch"]

# What a block keeps for its backward: everything, in CPU memory, matmul/attention outputs, its input only.
MEMORY_OPTIONS = ("none", "offload", "selective", "full")


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
        """Bytes of the block's parameters while gathered for compute (storage size unless given)."""
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
        """Plain JSON-able dict (``lotus plan --save-profile``); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CostTable:
        d = dict(d)
        d["blocks"] = [
            BlockCost(**{**b, "options": {k: OptionCost(**v) for k, v in b["options"].items()}}) for b in d["blocks"]
        ]
        d["pre"] = StageCost(**d.get("pre", {}))
        d["post"] = StageCost(**d.get("post", {}))
        return cls(**d)


def scale_batch(table: CostTable, batch_size: int) -> CostTable:
    """The table at another per-rank batch size, scaling activation memory and compute time linearly.

    Parameters, optimizer state and communication do not depend on the batch. Activation memory is
    proportional to the batch (up to small batch-independent workspaces); compute time nearly so on a
    saturated device. Used to search for the largest batch that fits; verify the result by measuring.
    """
    f = batch_size / table.batch_size
    t = copy.deepcopy(table)
    t.batch_size = batch_size
    for b in t.blocks:
        b.output_bytes *= f
    for c in [o for b in t.blocks for o in b.options.values()] + [t.pre, t.post]:
        c.fwd_s, c.bwd_s, c.retained_bytes, c.peak_bytes = (
            c.fwd_s * f,
            c.bwd_s * f,
            c.retained_bytes * f,
            c.peak_bytes * f,
        )
    return t
