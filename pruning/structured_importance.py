"""Importance of attention heads and MLP neurons for structured thinning: magnitude, activation and Taylor.

``magnitude`` needs no data; ``activation`` and ``taylor`` run calibration batches (``x``, ``(x, y)`` or
``(x, y, index)``) through the model in eval mode. Scores are per unit (``{unit name: tensor[groups]}``,
higher = more important) and come from the unit descriptions in :mod:`pruning.structured_units`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import IMPORTANCE, Importance
from .structured_units import Coupled, Unit, find_blocks, group_reduce

__all__ = ["LossFn", "ReduceFn", "unit_scores", "head_importance", "neuron_importance"]

LossFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
# Sums a tensor over the processes of a data-parallel job (e.g. a ``torch.distributed.all_reduce``): each
# process scored its own calibration batches, the sum is what one process scoring all of them computes.
ReduceFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# calibration


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _split_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibration batch -> (inputs, targets or None); accepts x, (x,), (x, y) and (x, y, index)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device), None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 else None
        if y is not None and not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        return batch[0].to(device), (y.to(device) if y is not None else None)
    raise ValueError(
        f"calib_loader: expected batches that are a tensor, (x, y) or (x, y, index), got {type(batch).__name__}"
    )


def _calib_batches(
    calib_loader: Iterable, device: torch.device, max_batches: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    n = 0
    for batch in calib_loader:
        if max_batches is not None and n >= max_batches:
            break
        yield _split_batch(batch, device)
        n += 1
    if n == 0:
        raise ValueError("calib_loader: yielded no batches")


class _EvalMode:
    """Context manager: model in eval mode (no dropout / drop-path) for scoring, previous modes restored."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for m, mode in self.modes.items():
            m.training = mode


# --------------------------------------------------------------------------------------------------------------
# importance


def _magnitude_scores(units: Sequence[Unit]) -> dict[str, torch.Tensor]:
    out = {}
    for u in units:
        acc = torch.zeros(u.num_groups, dtype=torch.float64)
        for c in u.coupled():
            if c.is_weight:
                acc += group_reduce(c.tensor.detach().float() ** 2, c, u.num_groups, u.group_size)
        out[u.name] = acc.sqrt()
    return out


def _consumer_column_norms(u: Unit) -> torch.Tensor:
    c = next(c for c in u.coupled() if c.consumer)
    return group_reduce(c.tensor.detach().float() ** 2, c, u.num_groups, u.group_size).sqrt()


def _activation_scores(
    model: nn.Module,
    units: Sequence[Unit],
    calib_loader: Iterable,
    max_batches: int | None,
    reduce_sum: ReduceFn | None = None,
) -> dict[str, torch.Tensor]:
    sumsq = {u.name: torch.zeros(u.num_groups * u.group_size, dtype=torch.float64) for u in units}

    def make_hook(name: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            sumsq[name] += x.to(torch.float64).pow(2).reshape(-1, x.shape[-1]).sum(0).cpu()

        return hook

    handles = [u.consumer_linear().register_forward_pre_hook(make_hook(u.name)) for u in units]
    try:
        with _EvalMode(model), torch.no_grad():
            for x, _ in _calib_batches(calib_loader, _model_device(model), max_batches):
                model(x)
    finally:
        for h in handles:
            h.remove()
    if reduce_sum is not None:
        sumsq = {k: reduce_sum(v) for k, v in sumsq.items()}
    out = {}
    for u in units:
        act = sumsq[u.name].reshape(u.num_groups, u.group_size).sum(1).sqrt()
        out[u.name] = act * _consumer_column_norms(u)
    return out


def _taylor_scores(
    model: nn.Module,
    units: Sequence[Unit],
    calib_loader: Iterable,
    loss_fn: LossFn | None,
    max_batches: int | None,
    reduce_sum: ReduceFn | None = None,
) -> dict[str, torch.Tensor]:
    entries: list[tuple[Unit, Coupled]] = [(u, c) for u in units for c in u.coupled() if c.is_param]
    params = [c.tensor for _, c in entries]
    for (u, c), p in zip(entries, params):
        if not p.is_leaf:
            raise ValueError(
                f"taylor importance needs plain weights; {u.name}.{c.path} is computed by a "
                f"parametrization (make pruning masks permanent first)"
            )
    flags = [p.requires_grad for p in params]
    scores = {u.name: torch.zeros(u.num_groups, dtype=torch.float64) for u in units}
    try:
        for p in params:
            p.requires_grad_(True)
        with _EvalMode(model), torch.enable_grad():
            for x, y in _calib_batches(calib_loader, _model_device(model), max_batches):
                out = model(x)
                if loss_fn is not None:
                    loss = loss_fn(out, y)
                elif y is None:
                    raise ValueError("calib_loader: taylor importance needs labelled batches (x, y) or a loss_fn")
                else:
                    loss = F.cross_entropy(out, y)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for (u, c), g in zip(entries, grads):
                    if g is not None:
                        scores[u.name] += group_reduce((c.tensor.detach() * g).abs(), c, u.num_groups, u.group_size)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    if reduce_sum is not None:  # a sum over batches: the per-process sums add up
        scores = {k: reduce_sum(v) for k, v in scores.items()}
    return scores


def unit_scores(
    model: nn.Module,
    units: Sequence[Unit],
    importance: str,
    calib_loader: Iterable | None,
    loss_fn: LossFn | None,
    max_batches: int | None,
    reduce_sum: ReduceFn | None = None,
) -> dict[str, torch.Tensor]:
    """Score of every group of every unit, ``{unit name: tensor[num_groups]}`` (higher = more important).

    ``reduce_sum`` (data-parallel scoring): each process passes its share of the calibration batches and
    the calibration statistics are summed over processes before they become scores, so every process gets
    the scores of all the batches (``magnitude`` needs no data and ignores it)."""
    if importance not in IMPORTANCE:
        raise ValueError(f"importance: expected one of {', '.join(IMPORTANCE)}, got {importance!r}")
    if not units:
        return {}
    if importance == "magnitude":
        return _magnitude_scores(units)
    if calib_loader is None:
        raise ValueError(
            f"importance={importance!r} needs calibration data: pass calib_loader (or use importance='magnitude')"
        )
    if importance == "activation":
        return _activation_scores(model, units, calib_loader, max_batches, reduce_sum)
    return _taylor_scores(model, units, calib_loader, loss_fn, max_batches, reduce_sum)


def _importance(
    model: nn.Module,
    kind: str,
    importance: Importance,
    calib_loader: Iterable | None,
    loss_fn: LossFn | None,
    max_batches: int | None,
) -> dict[str, torch.Tensor]:
    """``{block name: scores}`` of one unit kind (``attn`` heads or ``mlp`` neurons) of every block."""
    blocks = [b for b in find_blocks(model).values() if getattr(b, kind) is not None]
    by_unit = unit_scores(model, [getattr(b, kind) for b in blocks], importance, calib_loader, loss_fn, max_batches)
    return {b.name: by_unit[getattr(b, kind).name] for b in blocks}


def head_importance(
    model: nn.Module,
    importance: Importance = "magnitude",
    calib_loader: Iterable | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Score of every attention head, ``{block name: tensor[num_heads]}`` (higher = more important)."""
    return _importance(model, "attn", importance, calib_loader, loss_fn, max_batches)


def neuron_importance(
    model: nn.Module,
    importance: Importance = "magnitude",
    calib_loader: Iterable | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Score of every MLP hidden neuron, ``{block name: tensor[hidden]}`` (higher = more important)."""
    return _importance(model, "mlp", importance, calib_loader, loss_fn, max_batches)
