"""pruning: sparsity for vision transformers on plain PyTorch/timm (no lotus import).

    from pruning import prune_, MagnitudeConfig, WandaConfig, TaylorConfig, SemiStructuredConfig, StructuredConfig
    report = prune_(model, SemiStructuredConfig(score="wanda"), calib_loader=loader)

``prune_`` dispatches on the config's type through one registry (:mod:`pruning.registry`): each config is
registered with its handler and its capabilities (needs calibration data / gradients, gradual, structured),
which ``GradualPruner`` and front ends such as ``lotus prune`` read. A new criterion is a config registered
with ``register_method`` plus its handler.

The package exports the entry point, its configs and the few calls a training loop needs; everything else is
imported from its module:

- ``pruning.api``: ``prune_`` (any registered config, in place), ``PruneConfig`` (the built-in configs)
- ``pruning.config``: ``MagnitudeConfig``, ``WandaConfig``, ``TaylorConfig``, ``SemiStructuredConfig``,
  ``StructuredConfig``
- ``pruning.registry``: ``register_method``, ``PruneMethod`` (handler + capabilities), ``method_for``,
  ``method_named``, ``method_names``, ``config_for``, ``needs_calibration``, ``needs_grad``, ``PruneInputs``
- ``pruning.handlers``: the built-in handlers and the shared mask plumbing (``select_layers``, ``apply_masks``)
- ``pruning.taylor``: first-order Taylor masks (``taylor_scores``, ``prune_taylor``)
- ``pruning.masks``: mask parametrizations (``set_mask``, ``get_mask``, ``is_masked``, ``masked_modules``,
  ``masks_state``/``load_masks``, ``enforce_masks_``, ``make_permanent``) and layer filters (``make_filter``)
- ``pruning.mask_scores``: magnitude / Wanda / N:M masks, ``masks_from_scores``, ``is_nm_sparse``,
  ``collect_input_norms``
- ``pruning.semi_structured``: 2:4 ``torch.sparse`` kernels (``to_semi_structured_``, ``SemiSparseLinear``,
  ``enable_sparse_training_``/``disable_sparse_training_``, ``CPU_NOTE``)
- ``pruning.structured``: structured thinning (``prune_structured``); ``pruning.structured_widths``
  (``get_widths``/``apply_widths``), ``pruning.optimizer_state`` (``optimizer_param_names``,
  ``slice_optimizer_state``), ``pruning.structured_importance`` (head/neuron scores),
  ``pruning.structured_units`` / ``structured_slicing`` / ``structured_eva`` (what is cut and how)
- ``pruning.schedule``: ``GradualSchedule``, ``OneShotSchedule``, ``cubic_sparsity``, ``GradualPruner``
- ``pruning.soup``: Instant Soup Pruning (``instant_soup_prune_``, ``merge_masks``)
- ``pruning.sweep``: essential-sparsity sweep (``essential_sparsity_sweep``, ``find_knee``, ``save_sweep``)
- ``pruning.report``: ``sparsity_report``, ``model_stats``, params/FLOPs/latency counters, ``format_report``
"""

import importlib
from typing import Any

# name -> module that defines it; imported on first use (module __getattr__), so ``pruning.MagnitudeConfig``
# (read by a config) does not import torch
_WHERE = {
    "prune_": "api",
    "MagnitudeConfig": "config",
    "SemiStructuredConfig": "config",
    "StructuredConfig": "config",
    "TaylorConfig": "config",
    "WandaConfig": "config",
    "method_for": "registry",
    "register_method": "registry",
    "make_permanent": "masks",
    "model_stats": "report",
    "sparsity_report": "report",
    "GradualPruner": "schedule",
    "GradualSchedule": "schedule",
    "OneShotSchedule": "schedule",
    "enable_sparse_training_": "semi_structured",
    "to_semi_structured_": "semi_structured",
    "prune_structured": "structured",
    "apply_widths": "structured_widths",
    "get_widths": "structured_widths",
}

__all__ = [
    # one entry point + configs
    "prune_",
    "MagnitudeConfig",
    "WandaConfig",
    "TaylorConfig",
    "SemiStructuredConfig",
    "StructuredConfig",
    # the method registry: add a criterion, read a config's capabilities
    "register_method",
    "method_for",
    # structured thinning
    "prune_structured",
    "get_widths",
    "apply_widths",
    # masks: fold into plain weights, measure
    "make_permanent",
    "sparsity_report",
    "model_stats",
    # 2:4 kernels
    "to_semi_structured_",
    "enable_sparse_training_",
    # schedules
    "GradualPruner",
    "GradualSchedule",
    "OneShotSchedule",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
