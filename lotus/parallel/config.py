"""The ``parallel:`` config section: data parallelism (DDP / FSDP2) and per-block memory optimisations.

Disabled by default (``mode: none`` and no activation checkpointing), so a config without the section
trains exactly as before. Everything here is validated when the config is loaded; checks that need the
runtime (a CUDA device, the world size) happen in :func:`lotus.parallel.parallelize`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from lotus.errors import ConfigError

__all__ = ["ParallelConfig", "parse_bytes", "format_bytes", "parse_bandwidth"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int | float, what: str = "memory size") -> int:
    """``"8GiB"`` / ``"512MiB"`` / ``"1.5GB"`` / ``"8G"`` / ``1024`` -> bytes.

    Binary units (KiB, MiB, GiB, TiB and the bare K, M, G, T) are powers of 1024; KB, MB, GB, TB are
    powers of 1000. Raises ``ValueError`` with a one-line message on anything else.
    """
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a size such as 8GiB or 512MiB, got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = _SIZE_RE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{what}: expected a size such as 8GiB, 512MiB or 1.5GB, got {text!r}")
        value, unit = float(m.group(1)), m.group(2).lower()
    nbytes = int(value * _UNITS[unit])
    if nbytes <= 0:
        raise ValueError(f"{what}: expected a positive size, got {text!r}")
    return nbytes


def format_bytes(n: float) -> str:
    """Bytes -> ``"3.21 GiB"`` (binary units, as budgets are usually given)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def parse_bandwidth(text: str | int | float, what: str = "bandwidth") -> float:
    """``"25GB/s"`` / ``"10GiB/s"`` / ``2e9`` -> bytes per second."""
    if isinstance(text, str) and text.strip().lower().endswith("/s"):
        text = text.strip()[:-2]
    return float(parse_bytes(text, what))


@dataclass
class ParallelConfig:
    """How a run is distributed and which per-block memory optimisations it uses.

    ``mode``: ``none`` (one process; under torchrun with several ranks this is an error, since every
    rank would silently train its own model), ``ddp``
    (DistributedDataParallel), ``fsdp`` (FSDP2 ``fully_shard`` per transformer block, then the root),
    ``auto`` (apply a plan from ``plan`` or compute one at start-up from ``memory_budget``).
    """

    mode: Literal["none", "ddp", "fsdp", "auto"] = "none"
    """none (one process), ddp, fsdp (FSDP2 fully_shard per block), or auto (apply plan, or plan at start-up within
    memory_budget)."""
    plan: str | None = None
    """Plan JSON from lotus plan (per-block checkpointing, offload, resharding and the DP mode); used by mode auto."""
    memory_budget: str | None = None
    """Per-rank memory budget (8GiB, 512MiB, 1.5GB): mode auto without a plan plans within it at start-up; lotus
    plan's default --memory-budget."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after each block's forward (ZeRO-3), or keep them until its backward (more
    memory, one all-gather less)."""
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    """Uniform activation checkpointing for modes none/ddp/fsdp (mode auto: the plan chooses per block)."""
    blocks: list[int] | None = None
    """Which blocks get checkpointing / offload; null: all."""
    offload_activations: bool = False
    """Move saved activations of the chosen blocks to CPU memory during forward (CUDA only)."""
    cpu_offload: bool = False
    """FSDP2 CPUOffloadPolicy: sharded parameters, gradients and optimiser state on the CPU (CUDA only)."""
    mixed_precision: bool = False
    """FSDP2 MixedPrecisionPolicy (bf16 parameters, fp32 reductions; CUDA only)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto: nccl on CUDA, gloo on CPU."""
    profile_repeats: int = field(default=3, metadata={"min": 1})
    """Timed repetitions per block when mode auto profiles at start-up."""
    bandwidth: str | None = None
    """Interconnect bandwidth for the planner (25GB/s); null: measured when a process group exists, else a device
    default."""
    planner_buckets: int = field(default=1024, metadata={"min": 16, "max": 1_000_000})
    """Memory buckets of the planner's dynamic programme over the budget."""

    def check(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if self.memory_budget is not None:
            try:
                parse_bytes(self.memory_budget, f"{p}memory_budget")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.bandwidth is not None:
            try:
                parse_bandwidth(self.bandwidth, f"{p}bandwidth")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.mode == "auto" and self.plan is None and self.memory_budget is None:
            raise ConfigError(
                f"{p}mode: 'auto' needs {p}plan (a file from `lotus plan`) or {p}memory_budget (e.g. 8GiB)"
            )
        if self.cpu_offload and self.mode not in ("fsdp", "auto"):
            raise ConfigError(
                f"{p}cpu_offload: needs {p}mode 'fsdp' or 'auto' (FSDP2 CPUOffloadPolicy), got mode {self.mode!r}"
            )
        if self.mixed_precision and self.mode not in ("fsdp", "auto"):
            raise ConfigError(
                f"{p}mixed_precision: needs {p}mode 'fsdp' or 'auto' (FSDP2 MixedPrecisionPolicy); "
                f"for DDP or one process use train.amp, got mode {self.mode!r}"
            )
        if self.blocks is not None:
            if not self.blocks:
                raise ConfigError(f"{p}blocks: expected a non-empty list of block indices or null (all blocks)")
            bad = [b for b in self.blocks if b < 0]
            if bad:
                raise ConfigError(f"{p}blocks: expected block indices >= 0, got {bad[0]!r}")
            if len(set(self.blocks)) != len(self.blocks):
                raise ConfigError(f"{p}blocks: duplicate block index in {self.blocks!r}")
            if self.activation_checkpoint == "none" and not self.offload_activations:
                raise ConfigError(f"{p}blocks: only used with {p}activation_checkpoint or {p}offload_activations")
        if self.offload_activations and self.activation_checkpoint == "full":
            raise ConfigError(
                f"{p}offload_activations: cannot be combined with {p}activation_checkpoint 'full' "
                "(a fully checkpointed block saves no activations to offload); pick one per block with a plan"
            )

    @property
    def enabled(self) -> bool:
        """True when the section changes anything about training."""
        return self.mode != "none" or self.activation_checkpoint != "none" or self.offload_activations

    @property
    def budget_bytes(self) -> int | None:
        return None if self.memory_budget is None else parse_bytes(self.memory_budget)

    @property
    def bandwidth_bytes_per_s(self) -> float | None:
        return None if self.bandwidth is None else parse_bandwidth(self.bandwidth)
