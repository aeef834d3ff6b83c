"""First-order Taylor masks (:class:`pruning.config.TaylorConfig`): score ``sum_b |W_ij * dL_b/dW_ij|``.

Zeroing a weight changes the loss by about ``-w * dL/dw`` (first-order Taylor expansion), so ``|w * g|``
ranks weights by the loss change their removal costs. Gradients come from labelled calibration batches
(eval mode, no dropout); each batch's term is taken in absolute value and summed, as the structured Taylor
importance does, so gradients of different batches do not cancel. A masked layer's gradient is taken with
respect to its stored weight (``parametrizations.weight.original``): where the mask keeps a weight that is
``dL/dW`` itself, and a pruned weight scores 0 (its effective weight is 0). Weights that are exactly zero
(pruned by an earlier step of a gradual schedule, or in a checkpoint whose masks are re-applied) are ranked
below every other, since removing them costs nothing: they stay pruned even where a kept weight's gradient
vanished too (a unit cut off downstream), which would otherwise tie with them at 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import TaylorConfig
from .handlers import apply_masks, select_layers
from .mask_scores import masks_from_scores, weight_2d
from .registry import PruneInputs
from .structured_importance import LossFn, ReduceFn, _calib_batches, _EvalMode, _model_device

__all__ = ["taylor_scores", "prune_taylor"]


def _stored_weight(module: nn.Module) -> Tensor:
    """The leaf tensor that holds the weight (under a mask parametrization, its ``original``)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def taylor_scores(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calib_loader: Iterable[Any] | None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    reduce_sum: ReduceFn | None = None,
) -> dict[str, Tensor]:
    """``{fqn: sum over batches of |W * dL/dW|}`` as float32 ``(out, in)`` matrices (conv: ``in*kh*kw``).

    ``loss_fn(logits, y)`` defaults to cross-entropy on the batch labels. ``reduce_sum`` (data parallel):
    each process scores its share of the batches and the sums are added over processes.
    """
    if calib_loader is None:
        raise ValueError("calib_loader: Taylor scoring needs labelled calibration data; pass calib_loader")
    params = {fqn: _stored_weight(m) for fqn, m in modules.items()}
    flags = {fqn: p.requires_grad for fqn, p in params.items()}
    scores = {fqn: torch.zeros_like(weight_2d(m)) for fqn, m in modules.items()}
    names, leaves = list(params), list(params.values())
    try:
        for p in leaves:
            p.requires_grad_(True)
        with _EvalMode(model), torch.enable_grad():
            for x, y in _calib_batches(calib_loader, _model_device(model), max_batches):
                out = model(x.to(dtype=leaves[0].dtype) if x.is_floating_point() else x)
                out = out[0] if isinstance(out, tuple) else out
                if loss_fn is not None:
                    loss = loss_fn(out, y)
                elif y is None:
                    raise ValueError("calib_loader: Taylor scoring needs labelled batches (x, y) or a loss_fn")
                else:
                    loss = F.cross_entropy(out.float(), y)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                for fqn, g in zip(names, grads):
                    if g is not None:
                        w = weight_2d(modules[fqn])
                        scores[fqn] += (w * g.detach().reshape(w.shape).float()).abs()
    finally:
        for fqn, p in params.items():
            p.requires_grad_(flags[fqn])
    if reduce_sum is not None:  # sums over batches: the per-process sums add up
        scores = {fqn: reduce_sum(s) for fqn, s in scores.items()}
    return scores


def prune_taylor(model: nn.Module, config: TaylorConfig, inputs: PruneInputs) -> dict[str, Any]:
    """The ``TaylorConfig`` handler: Taylor scores -> masks at ``config.sparsity`` within ``config.scope``."""
    modules = select_layers(model, inputs.filter_fn)
    scores = taylor_scores(
        model, modules, inputs.calib_loader, inputs.loss_fn, config.max_calib_batches, inputs.reduce_sum
    )
    for fqn, mod in modules.items():  # zero weights (pruned ones) go first: a weight whose gradient vanished
        zero = weight_2d(mod) == 0  # (its unit is cut off downstream) also scores 0 and must not take their place
        scores[fqn] = scores[fqn].masked_fill(zero, float("-inf"))
    return apply_masks(model, config, modules, masks_from_scores(scores, config.sparsity, config.scope))
