"""Handlers of the built-in methods (magnitude, Wanda, N:M, structured) and the plumbing every mask method shares.

A handler is ``handler(model, config, inputs) -> report`` (:class:`pruning.registry.PruneInputs`); the
registry in :mod:`pruning.config` names it, :func:`pruning.prune_` calls it. A mask method only computes
boolean masks: :func:`select_layers` picks the layers and :func:`apply_masks` attaches the masks and builds
the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from torch import Tensor, nn

from .config import MagnitudeConfig, SemiStructuredConfig, StructuredConfig, WandaConfig
from .mask_scores import collect_input_norms, magnitude_masks, nm_masks, wanda_masks
from .masks import FilterFn, select_modules, set_mask
from .registry import PruneInputs, method_for
from .report import sparsity_report
from .semi_structured import CPU_NOTE, to_semi_structured_
from .structured import prune_structured

__all__ = [
    "select_layers",
    "apply_masks",
    "prune_magnitude",
    "prune_wanda",
    "prune_nm",
    "prune_structured_handler",
]


def select_layers(model: nn.Module, filter_fn: FilterFn | None) -> dict[str, nn.Module]:
    """The layers a mask method prunes (``filter_fn``, default: Linears except the head); never empty."""
    modules = select_modules(model, filter_fn)
    if not modules:
        raise ValueError("filter_fn: selected no nn.Linear/nn.Conv2d layers to prune")
    return modules


def apply_masks(
    model: nn.Module,
    config: Any,
    modules: Mapping[str, nn.Module],
    masks: Mapping[str, Tensor],
    *,
    method: str | None = None,
    skipped: dict[str, str] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Attach ``masks`` to their layers and return the ``prune_`` report (``method``: the registered name)."""
    for fqn, mask in masks.items():
        set_mask(modules[fqn], mask)
    report = sparsity_report(model)
    report.update(
        method=method or method_for(config).name, config=asdict(config), skipped=skipped or {}, notes=notes or []
    )
    return report


def prune_magnitude(model: nn.Module, config: MagnitudeConfig, inputs: PruneInputs) -> dict[str, Any]:
    """Smallest-|w| masks."""
    modules = select_layers(model, inputs.filter_fn)
    return apply_masks(model, config, modules, magnitude_masks(modules, config.sparsity, config.scope))


def prune_wanda(model: nn.Module, config: WandaConfig, inputs: PruneInputs) -> dict[str, Any]:
    """Wanda masks from the input-activation norms of the calibration batches."""
    modules = select_layers(model, inputs.filter_fn)
    norms = collect_input_norms(model, modules, inputs.calib_loader, config.max_calib_batches, inputs.reduce_sum)
    return apply_masks(model, config, modules, wanda_masks(modules, norms, config.sparsity, config.scope))


def prune_nm(model: nn.Module, config: SemiStructuredConfig, inputs: PruneInputs) -> dict[str, Any]:
    """N:M masks (magnitude or Wanda scored); 2:4 layers become sparse kernels where ``kernels="auto"`` pays."""
    modules = select_layers(model, inputs.filter_fn)
    norms = None
    if config.score == "wanda":
        norms = collect_input_norms(model, modules, inputs.calib_loader, config.max_calib_batches, inputs.reduce_sum)
    masks, skipped = nm_masks(modules, config.n, config.m, norms)
    if not masks:
        raise ValueError(f"N:M: no selected layer has an input dim divisible by m={config.m}")
    notes: list[str] = []
    kernels: dict[str, Any] | None = None
    for fqn, mask in masks.items():  # attached before the kernel conversion, which reads them
        set_mask(modules[fqn], mask)
    if (config.n, config.m) != (2, 4):
        notes.append(f"{config.n}:{config.m} has no sparse kernels in torch; masked dense used")
    elif config.kernels == "auto":
        kernels = to_semi_structured_(
            model, filter_fn=lambda m, f: f in masks, backend=config.backend, probe_tokens=config.probe_tokens
        )
        if kernels.get("note"):
            notes.append(kernels["note"])
    elif not any(m.weight.is_cuda for m in modules.values()):
        notes.append(CPU_NOTE)
    else:
        notes.append("kernels='off': masked dense used")
    report = apply_masks(model, config, {}, {}, method=f"{config.n}:{config.m}", skipped=skipped, notes=notes)
    if kernels is not None:
        report["kernels"] = kernels
    return report


def prune_structured_handler(model: nn.Module, config: StructuredConfig, inputs: PruneInputs) -> dict[str, Any]:
    """Structured thinning (:func:`pruning.structured.prune_structured`); it picks blocks itself."""
    if inputs.filter_fn is not None:
        raise ValueError("filter_fn: structured pruning chooses blocks itself; filter_fn is not supported")
    return prune_structured(
        model, config, calib_loader=inputs.calib_loader, loss_fn=inputs.loss_fn, reduce_sum=inputs.reduce_sum
    )
