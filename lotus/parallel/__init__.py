"""Memory and parallelism on torch.distributed: an H3T-style planner executed with FSDP2/DDP.

* :mod:`~lotus.parallel.config`: the ``parallel:`` config section (:class:`ParallelConfig`).
* :mod:`~lotus.parallel.runtime`: :func:`init_distributed` from the torchrun environment.
* :mod:`~lotus.parallel.strategies`: one transform per concern (:func:`apply_ac`, :func:`apply_offload`,
  :func:`apply_fsdp`, :func:`apply_ddp`).
* :mod:`~lotus.parallel.measure` / :mod:`~lotus.parallel.comm`: allocator, clock and collective timings.
* :mod:`~lotus.parallel.profiler`: per-block costs of a timm ViT (a :class:`CostTable`,
  :mod:`~lotus.parallel.cost_table`).
* :mod:`~lotus.parallel.cost_model`: predicted peak memory and step time of an assignment (:func:`evaluate`).
* :mod:`~lotus.parallel.planner`: the DP / greedy search (:func:`make_plan`).
* :mod:`~lotus.parallel.plan_file`: the :class:`Plan` (per-block :class:`BlockChoice`) and its JSON file.
* :mod:`~lotus.parallel.apply`: :func:`parallelize`, the Trainer's entry point.
* :mod:`~lotus.parallel.full_state`: full, rank-agnostic state dicts.
* :mod:`~lotus.parallel.compat`: which feature combinations are supported under DDP/FSDP2.

Names are resolved lazily (module ``__getattr__``), so ``import lotus.parallel.config`` (done by the
config) does not import torch.distributed, the profiler or the planner.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ParallelConfig": "config",
    "parse_bytes": "config",
    "format_bytes": "config",
    "parse_bandwidth": "config",
    "DistInfo": "runtime",
    "init_distributed": "runtime",
    "destroy": "runtime",
    "apply_ac": "strategies",
    "apply_offload": "strategies",
    "apply_fsdp": "strategies",
    "apply_ddp": "strategies",
    "wrap_block": "strategies",
    "MemoryMeasure": "measure",
    "measure_memory": "measure",
    "saved_activation_bytes": "measure",
    "use_clock": "measure",
    "StepMeasure": "measure",
    "measure_training_step": "measure",
    "comm_costs": "comm",
    "DEFAULT_BANDWIDTH": "comm",
    "DEFAULT_LATENCY": "comm",
    "profile_model": "profiler",
    "profile_block": "profiler",
    "MEMORY_OPTIONS": "cost_table",
    "OptionCost": "cost_table",
    "StageCost": "cost_table",
    "BlockCost": "cost_table",
    "CostTable": "cost_table",
    "scale_batch": "cost_table",
    "Prediction": "cost_model",
    "evaluate": "cost_model",
    "PlanInfeasible": "planner",
    "make_plan": "planner",
    "solve_dp": "planner",
    "solve_greedy": "planner",
    "brute_force": "planner",
    "minimum_memory": "planner",
    "BlockChoice": "plan_file",
    "Plan": "plan_file",
    "uniform_choices": "plan_file",
    "read_plan": "plan_file",
    "write_plan": "plan_file",
    "plan_table": "plan_file",
    "parallelize": "apply",
    "get_plan": "apply",
    "get_full_state": "full_state",
    "set_full_state": "full_state",
    "check_compat": "compat",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"lotus.parallel.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lotus.parallel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
