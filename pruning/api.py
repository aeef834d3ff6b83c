"""``prune_(model, config, ...)``: one entry point that applies any pruning config to a model in place."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from .config import MagnitudeConfig, SemiStructuredConfig, StructuredConfig, TaylorConfig, WandaConfig
from .masks import FilterFn
from .registry import PruneInputs, method_for

__all__ = ["prune_", "PruneConfig"]

# the built-in configs, for annotations; prune_ accepts any registered config (pruning.registry)
PruneConfig = MagnitudeConfig | WandaConfig | SemiStructuredConfig | StructuredConfig | TaylorConfig


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

    Dispatches on ``type(config)`` through :mod:`pruning.registry` (``method_for(config).handler``):

    - mask methods (``MagnitudeConfig``, ``WandaConfig``, ``TaylorConfig``, ``SemiStructuredConfig``) attach
      weight masks (parametrizations) to the layers ``filter_fn(module, fqn)`` selects (default: every Linear
      except the classifier head; the patch embedding stays dense). Methods whose ``needs_calibration`` holds
      (Wanda, Taylor, ``score="wanda"``) need ``calib_loader`` (batches that are tensors or ``(x, y[, index])``
      tuples); ``needs_grad`` ones (Taylor) backpropagate ``loss_fn(logits, y)`` (default cross-entropy).
      With ``kernels="auto"`` a 2:4 config on a CUDA model converts the layers that get faster to
      ``torch.sparse`` semi-structured weights (inference); ``kernels="off"`` keeps masked dense weights.
    - ``StructuredConfig``: physically removes heads / MLP neurons (``pruning.structured.prune_structured``);
      ``loss_fn(logits, y)`` is used for Taylor importance (default cross-entropy).

    The report has ``method``, ``config``, ``layers`` (per-layer shape/params/nonzeros/sparsity), ``total``
    (over pruned layers), ``model`` (all parameters), ``skipped`` ({layer: reason}) and ``notes``.

    ``reduce_sum`` (data parallel): each process passes its share of the calibration batches; Wanda norms and
    activation/Taylor statistics are summed over processes by it (e.g. a ``torch.distributed.all_reduce``).
    """
    handler = method_for(config).resolve_handler()
    return handler(model, config, PruneInputs(calib_loader, filter_fn, loss_fn, reduce_sum))
