"""Memory and parallelism on torch.distributed: an H3T-style planner executed with FSDP2/DDP.

* :mod:`~lotus.parallel.config`: the ``parallel:`` config section (:class:`ParallelConfig`).
* :mod:`~lotus.parallel.runtime`: :func:`init_distributed` from the torchrun environment.
* :mod:`~lotus.parallel.strategies`: one transform per concern (:func:`apply_ac`, :func:`apply_offload`,
  :func:`apply_fsdp`, :func:`apply_ddp`).
* :mod:`~lotus.parallel.profiler` / :mod:`~lotus.parallel.planner`: per-block costs and the DP planner.
* :mod:`~lotus.parallel.apply`: :func:`parallelize`, the Trainer's entry point.
* :mod:`~lotus.parallel.checkpoint`: full, rank-agnostic state dicts.
* :mod:`~lotus.parallel.compat`: which feature combinations are supported under DDP/FSDP2.

Submodules import torch.distributed lazily, so ``import lotus.parallel`` (done by the config) is cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ParallelConfig", "parse_bytes", "format_bytes",
    "DistInfo", "init_distributed", "destroy",
    "apply_ac", "apply_offload", "apply_fsdp", "apply_ddp", "wrap_block",
    "profile_model", "measure_memory",
    "CostTable", "Plan", "BlockChoice", "make_plan", "evaluate", "read_plan", "write_plan", "PlanInfeasible",
    "parallelize", "get_plan",
    "get_full_state", "set_full_state",
    "check_compat",
]

_WHERE = {
    "ParallelConfig": "config", "parse_bytes": "config", "format_bytes": "config",
    "DistInfo": "runtime", "init_distributed": "runtime", "destroy": "runtime",
    "apply_ac": "strategies", "apply_offload": "strategies", "apply_fsdp": "strategies",
    "apply_ddp": "strategies", "wrap_block": "strategies",
    "profile_model": "profiler", "measure_memory": "profiler",
    "CostTable": "planner", "Plan": "planner", "BlockChoice": "planner", "make_plan": "planner",
    "evaluate": "planner", "read_plan": "planner", "write_plan": "planner", "PlanInfeasible": "planner",
    "parallelize": "apply", "get_plan": "apply",
    "get_full_state": "checkpoint", "set_full_state": "checkpoint",
    "check_compat": "compat",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"lotus.parallel.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lotus.parallel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
