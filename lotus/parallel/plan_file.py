"""What a plan is: one :class:`BlockChoice` per transformer block plus the data-parallel mode.

:func:`lotus.parallel.planner.make_plan` produces a :class:`Plan`; ``lotus plan --out`` writes it as JSON
(:func:`write_plan`) and ``parallel.plan`` reads it back (:func:`read_plan`) for
:func:`lotus.parallel.parallelize` to apply.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from lotus.errors import LotusError
from lotus.parallel.config import format_bytes
from lotus.parallel.cost_table import MEMORY_OPTIONS
from lotus.safe_io import atomic_write_text

__all__ = ["BlockChoice", "uniform_choices", "Plan", "write_plan", "read_plan", "plan_from_dict", "plan_table"]

PLAN_FORMAT = "lotus-parallel-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class BlockChoice:
    """What one block does: a memory option and (FSDP) whether to reshard after forward."""

    memory: str = "none"
    reshard_after_forward: bool = True

    @property
    def ac(self) -> str:
        """Activation-checkpoint mode for :func:`~lotus.parallel.strategies.wrap_block`."""
        return self.memory if self.memory in ("full", "selective") else "none"

    @property
    def offload(self) -> bool:
        """True when the block's saved activations go to CPU memory."""
        return self.memory == "offload"


def uniform_choices(n: int, memory: str = "none", reshard: bool = True) -> list[BlockChoice]:
    """The same choice for each of ``n`` blocks (baselines: no checkpointing, checkpoint every block)."""
    return [BlockChoice(memory, reshard) for _ in range(n)]


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
        """The plan file's JSON content (what :func:`write_plan` writes)."""
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "mode": self.mode,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "device": self.device,
            "cpu_offload": self.cpu_offload,
            "mixed_precision": self.mixed_precision,
            "memory_budget_bytes": self.budget_bytes,
            "predicted": {
                "peak_bytes": self.predicted_peak_bytes,
                "step_time_s": self.predicted_step_time_s,
                "peak_at": self.peak_at,
            },
            "num_blocks": self.num_blocks,
            "blocks": [
                {
                    "index": i,
                    "memory": c.memory,
                    "activation_checkpoint": c.ac,
                    "offload_activations": c.offload,
                    "reshard_after_forward": c.reshard_after_forward,
                    "predicted_peak_bytes": self.block_peak_bytes[i] if i < len(self.block_peak_bytes) else None,
                    "predicted_time_s": self.block_time_s[i] if i < len(self.block_time_s) else None,
                }
                for i, c in enumerate(self.blocks)
            ],
            "meta": self.meta,
        }


def write_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write the plan as JSON atomically (a failed write leaves any previous file intact)."""
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
    return plan_from_dict(d, path, num_blocks)


def plan_from_dict(d: Any, path: str, num_blocks: int | None = None) -> Plan:
    """Check and build a :class:`Plan` from its JSON content (a plan file's, or the one a run's ``state.pt``
    keeps); ``path`` names the source in errors."""
    if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
        raise LotusError(f'parallel.plan: {path} is not a Lotus plan (expected "format": "{PLAN_FORMAT}")')
    if d.get("version") != PLAN_VERSION:
        raise LotusError(
            f"parallel.plan: {path} has plan version {d.get('version')!r}; this Lotus reads {PLAN_VERSION}"
        )
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
            raise LotusError(
                f"parallel.plan: {path}: blocks[{i}].memory: expected one of {', '.join(MEMORY_OPTIONS)}, got {mem!r}"
            )
        r = b.get("reshard_after_forward", True)
        if not isinstance(r, bool):
            raise LotusError(
                f"parallel.plan: {path}: blocks[{i}].reshard_after_forward: expected true/false, got {r!r}"
            )
        choices.append(BlockChoice(mem, r))
    if num_blocks is not None and len(choices) != num_blocks:
        raise LotusError(
            f"parallel.plan: {path} plans {len(choices)} blocks but the model has {num_blocks}; "
            "re-run `lotus plan` for this model"
        )
    pred = d.get("predicted") or {}
    per = [b.get("predicted_peak_bytes") for b in blocks]
    tim = [b.get("predicted_time_s") for b in blocks]
    ws = d.get("world_size", 1)
    if not isinstance(ws, int) or ws < 1:
        raise LotusError(f"parallel.plan: {path}: world_size: expected an integer >= 1, got {ws!r}")
    bs = d.get("batch_size", 1)
    if not isinstance(bs, int) or bs < 1:
        raise LotusError(f"parallel.plan: {path}: batch_size: expected an integer >= 1, got {bs!r}")
    return Plan(
        mode=mode,
        world_size=ws,
        blocks=choices,
        batch_size=bs,
        budget_bytes=d.get("memory_budget_bytes"),
        predicted_peak_bytes=pred.get("peak_bytes"),
        predicted_step_time_s=pred.get("step_time_s"),
        peak_at=pred.get("peak_at"),
        block_peak_bytes=per if all(v is not None for v in per) else [],
        block_time_s=tim if all(v is not None for v in tim) else [],
        device=d.get("device", "cpu"),
        cpu_offload=bool(d.get("cpu_offload", False)),
        mixed_precision=bool(d.get("mixed_precision", False)),
        meta=d.get("meta") or {},
    )


def plan_table(plan: Plan) -> str:
    """Markdown table of a plan: one row per block, then the predicted totals."""
    rows = [
        "| block | memory option | reshard after fwd | peak at its backward | time (ms) |",
        "|---:|---|---|---:|---:|",
    ]
    for i, c in enumerate(plan.blocks):
        peak = format_bytes(plan.block_peak_bytes[i]) if i < len(plan.block_peak_bytes) else "-"
        t = f"{plan.block_time_s[i] * 1e3:.2f}" if i < len(plan.block_time_s) else "-"
        rs = ("yes" if c.reshard_after_forward else "no") if plan.mode == "fsdp" else "-"
        rows.append(f"| {i} | {c.memory} | {rs} | {peak} | {t} |")
    lines = ["\n".join(rows), ""]
    if plan.predicted_peak_bytes is not None:
        budget = f" (budget {format_bytes(plan.budget_bytes)})" if plan.budget_bytes else ""
        lines.append(
            f"mode {plan.mode}, world size {plan.world_size}, batch {plan.batch_size}/rank: predicted peak "
            f"{format_bytes(plan.predicted_peak_bytes)} per rank{budget} at {plan.peak_at}; predicted step "
            f"{plan.predicted_step_time_s * 1e3:.1f} ms"
        )
    return "\n".join(lines)
