"""``prune_(model, config, ...)``: one entry point that applies any pruning config to a model in place."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

from torch import Tensor, nn

from .config import MagnitudeConfig, SemiStructuredConfig, StructuredConfig, WandaConfig
from .mask_scores import collect_input_norms, magnitude_masks, nm_masks, wanda_masks
from .masks import FilterFn, select_modules, set_mask
from .report import sparsity_report
from .semi_structured import CPU_NOTE, to_semi_structured_
from .structured import prune_structured

__all__ = ["prune_", "PruneConfig"]

PruneConfig = MagnitudeConfig | WandaConfig | SemiStructuredConfig | StructuredConfig


def prune_(
    model: nn.Module,
    config: PruneConfig,
    calib_loader: Iterable[Any] | None = None,
    filter_fn: FilterFn | None = None,
    *,
    loss_fn: Callable[[Tensor, Tensor | None], Tensor] | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place according to ``config`` and return a report.

    - ``MagnitudeConfig`` / ``WandaConfig`` / ``SemiStructuredConfig``: attach weight masks (parametrizations)
      to the layers ``filter_fn(module, fqn)`` selects (default: every Linear except the classifier head;
      the patch embedding stays dense). Wanda and ``score="wanda"`` need ``calib_loader`` (batches that are
      tensors or ``(x, y[, index])`` tuples). With ``kernels="auto"`` a 2:4 config on a CUDA model converts
      the layers that get faster to ``torch.sparse`` semi-structured weights (inference); pass
      ``kernels="off"`` to keep masked dense weights for training.
    - ``StructuredConfig``: physically removes heads / MLP neurons (``pruning.structured.prune_structured``);
      ``loss_fn(logits, y)`` is used for Taylor importance (default cross-entropy).

    The report has ``method``, ``config``, ``layers`` (per-layer shape/params/nonzeros/sparsity), ``total``
    (over pruned layers), ``model`` (all parameters), ``skipped`` ({layer: reason}) and ``notes``.

    ``reduce_sum`` (data parallel): each process passes its share of the calibration batches; Wanda norms and
    activation/Taylor statistics are summed over processes by it (e.g. a ``torch.distributed.all_reduce``).
    """
    if isinstance(config, StructuredConfig):
        if filter_fn is not None:
            raise ValueError("filter_fn: structured pruning chooses blocks itself; filter_fn is not supported")
        return prune_structured(model, config, calib_loader=calib_loader, loss_fn=loss_fn, reduce_sum=reduce_sum)
    if not isinstance(config, (MagnitudeConfig, WandaConfig, SemiStructuredConfig)):
        raise ValueError(
            "config: expected MagnitudeConfig, WandaConfig, SemiStructuredConfig or StructuredConfig, "
            f"got {type(config).__name__}"
        )
    modules = select_modules(model, filter_fn)
    if not modules:
        raise ValueError("filter_fn: selected no nn.Linear/nn.Conv2d layers to prune")
    skipped: dict[str, str] = {}
    notes: list[str] = []
    if isinstance(config, MagnitudeConfig):
        method = "magnitude"
        masks = magnitude_masks(modules, config.sparsity, config.scope)
    elif isinstance(config, WandaConfig):
        method = "wanda"
        norms = collect_input_norms(model, modules, calib_loader, config.max_calib_batches, reduce_sum)
        masks = wanda_masks(modules, norms, config.sparsity, config.scope)
    else:
        method = f"{config.n}:{config.m}"
        norms = None
        if config.score == "wanda":
            norms = collect_input_norms(model, modules, calib_loader, config.max_calib_batches, reduce_sum)
        masks, skipped = nm_masks(modules, config.n, config.m, norms)
        if not masks:
            raise ValueError(f"N:M: no selected layer has an input dim divisible by m={config.m}")
    for fqn, mask in masks.items():
        set_mask(modules[fqn], mask)

    kernels: dict[str, Any] | None = None
    if isinstance(config, SemiStructuredConfig):
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

    report = sparsity_report(model)
    report.update(method=method, config=asdict(config), skipped=skipped, notes=notes)
    if kernels is not None:
        report["kernels"] = kernels
    return report
