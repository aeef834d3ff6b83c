"""Structured thinning of timm ViT blocks: remove whole attention heads and MLP hidden neurons.

Unlike masks, thinning physically shrinks the weights (qkv rows / proj columns of a head, fc1 rows / fc2
columns of a neuron), so the result is a smaller *dense* model that runs faster on any device. The thinned
model computes exactly what the original computes with the removed heads/neurons zeroed out (zeroed columns of
the attention ``proj`` / MLP ``fc2``), except in blocks that normalise their inner width (EVA-02's
``scale_attn_inner`` / ``scale_mlp`` norms): those norms are sliced too, but their statistics then cover only
the kept channels. Supported modules are listed in :mod:`pruning.structured_units`; anything else is refused
with an error naming it.

Typical use::

    cfg = StructuredConfig(heads=0.25, mlp=0.5, importance="taylor", round_to=8)
    report = prune_structured(model, cfg, calib_loader=loader)        # in place
    meta = {"lotus_widths": json.dumps(get_widths(model))}            # save with the weights
    ...
    fresh = timm.create_model(name, num_classes=...)                  # reload elsewhere
    apply_widths(fresh, json.loads(meta["lotus_widths"])).load_state_dict(state)

This module holds the selection (how many groups each block keeps, and which) and ``prune_structured``.
The pieces live next to it: :mod:`pruning.structured_importance` (scores), :mod:`pruning.structured_widths`
(``get_widths`` / ``apply_widths``), :mod:`pruning.optimizer_state` (``optimizer_param_names`` /
``slice_optimizer_state``, to keep the optimizer state of the unpruned model), :mod:`pruning.structured_units`
and :mod:`pruning.structured_slicing` (what each head/neuron is made of and how it is cut). ``StructuredConfig``
lives in :mod:`pruning.config`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict

import torch
import torch.nn as nn

from .config import StructuredConfig
from .structured_importance import LossFn, ReduceFn, unit_scores
from .structured_units import Unit, find_blocks
from .structured_widths import check_thinnable, get_widths

__all__ = ["prune_structured", "apply_kept"]


# --------------------------------------------------------------------------------------------------------------
# selection


def rounding_notes(before: dict, after: dict, asked: dict[str, float]) -> list[str]:
    """One line per field whose removed share differs from the ratio asked for (whole heads or neurons are
    removed: counts round to the nearest, halves up, then to ``round_to``), e.g. "heads: asked 0.5, removed
    2 of 3 per block (0.67)"."""
    notes = []
    for field, ratio in asked.items():
        if not ratio:
            continue
        n0 = [w[field] for w in before.values() if field in w]
        n1 = [after[b][field] for b, w in before.items() if field in w]
        if not n0 or sum(n0) == 0:
            continue
        share = 1 - sum(n1) / sum(n0)
        if abs(share - ratio) > 1e-9:
            per = " per block" if len(set(n0)) == 1 and len(set(n1)) == 1 else " in all"
            rm, tot = (n0[0] - n1[0], n0[0]) if per == " per block" else (sum(n0) - sum(n1), sum(n0))
            notes.append(
                f"{field}: asked {ratio:g}, removed {rm} of {tot}{per} ({share:.2f}; whole "
                f"{'heads' if field == 'heads' else 'neurons'}, rounded to the nearest)"
            )
    return notes


def _n_remove(ratio: float, n: int) -> int:
    """Number of groups a fraction removes: nearest integer, halves rounded up."""
    return int(math.floor(ratio * n + 0.5))


def _round_keep(keep: int, step: int, lo: int, n: int) -> int:
    """Nearest multiple of ``step`` (halves up), at least ``lo`` (itself rounded up to ``step``), at most ``n``."""
    k = int(math.floor(keep / step + 0.5)) * step
    lo = int(math.ceil(lo / step)) * step
    return max(min(max(k, lo), n), 1)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending index order (ties broken by lower index)."""
    order = torch.sort(-scores, stable=True).indices[:k]
    return torch.sort(order).values


def _select(
    units: Sequence[Unit],
    scores: dict[str, torch.Tensor],
    ratio: float,
    scope: str,
    step: int,
    floor: int,
    field: str,
    what: str,
) -> dict[str, torch.Tensor]:
    """Kept group indices per unit (``ratio`` > 0), at least ``floor`` per unit, counts rounded to ``step``."""
    counts: dict[str, int] = {}
    if scope == "layer":
        for u in units:
            n = u.num_groups
            keep = n - _n_remove(ratio, n)
            if keep <= 0:
                raise ValueError(f"{field}: {ratio:g} would remove all {n} {what}s of {u.name}")
            counts[u.name] = keep
    else:
        total = sum(u.num_groups for u in units)
        budget = _n_remove(ratio, total)
        if budget >= total:
            raise ValueError(f"{field}: {ratio:g} would remove all {total} {what}s")
        cand = [(float(v), j, i) for j, u in enumerate(units) for i, v in enumerate(scores[u.name])]
        cand.sort()
        cand = [(v, units[j].name, i) for v, j, i in cand]
        left = {u.name: u.num_groups for u in units}
        removed = 0
        for _, name, _i in cand:
            if removed >= budget:
                break
            if left[name] > floor:
                left[name] -= 1
                removed += 1
        counts = left
    out = {}
    for u in units:
        n = u.num_groups
        k = _round_keep(counts[u.name], step, floor, n)
        out[u.name] = _top(scores[u.name], k) if k < n else torch.arange(n)
    return out


def _head_step(round_to: int, head_dim: int) -> int:
    """Smallest head-count step that keeps ``heads * head_dim`` a multiple of ``round_to``."""
    return round_to // math.gcd(round_to, head_dim)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_structured(
    model: nn.Module,
    config: StructuredConfig,
    calib_loader: Iterable | None = None,
    loss_fn: LossFn | None = None,
    *,
    max_batches: int | None = None,
    reduce_sum: ReduceFn | None = None,
) -> dict:
    """Remove attention heads and MLP neurons from every timm ViT block of ``model``, in place.

    calib_loader: batches of ``x``, ``(x, y)`` or ``(x, y, index)``; needed for ``activation`` and ``taylor``
        importance (``max_batches`` caps how many are used). loss_fn: ``loss_fn(logits, y)`` for taylor
        (default cross-entropy; ``y`` is None for unlabelled batches). reduce_sum: data-parallel scoring, each
        process passes its share of the batches and the statistics are summed (see ``unit_scores``).

    Returns a JSON-serialisable report: ``blocks`` (per block heads/mlp before and after), ``widths`` (after,
    for :func:`apply_widths`), ``params_before``/``params_after``, ``kept`` (per block kept head / neuron
    indices) and ``kept_indices`` (per parameter name: ``dim``, kept ``index``, ``old_shape``, ``new_shape``;
    see :func:`slice_optimizer_state`).
    """
    if not isinstance(config, StructuredConfig):
        raise ValueError(f"config: expected a StructuredConfig, got {type(config).__name__}")
    blocks = find_blocks(model)
    attn_units = [b.attn for b in blocks.values() if b.attn is not None]
    mlp_units = [b.mlp for b in blocks.values() if b.mlp is not None]
    if config.heads > 0 and config.min_heads > 1:
        for u in attn_units:
            if config.min_heads > u.num_groups:
                raise ValueError(f"min_heads: {config.min_heads} exceeds the {u.num_groups} heads of {u.name}")
    widths_before = get_widths(model)
    params_before = _count_params(model)

    units: list[Unit] = (attn_units if config.heads > 0 else []) + (mlp_units if config.mlp > 0 else [])
    check_thinnable(units)
    scores = (
        unit_scores(model, units, config.importance, calib_loader, loss_fn, max_batches, reduce_sum) if units else {}
    )

    keep: dict[str, torch.Tensor] = {}
    if config.heads > 0:
        steps = {_head_step(config.round_to, u.group_size) for u in attn_units}
        step = max(steps)
        keep.update(_select(attn_units, scores, config.heads, config.scope, step, config.min_heads, "heads", "head"))
    if config.mlp > 0:
        keep.update(
            _select(mlp_units, scores, config.mlp, config.scope, config.round_to, config.round_to, "mlp", "MLP neuron")
        )

    kept_indices: dict[str, dict] = {}
    kept: dict[str, dict[str, list[int]]] = {}
    for b in blocks.values():
        for field, u in (("heads", b.attn), ("mlp", b.mlp)):
            if u is None or u.name not in keep or keep[u.name].numel() == u.num_groups:
                continue
            kept.setdefault(b.name, {})[field] = keep[u.name].tolist()
            kept_indices.update(u.kept_indices(keep[u.name]))
            u.thin(keep[u.name])

    widths_after = get_widths(model)
    per_block = {}
    for name, before in widths_before.items():
        after = widths_after[name]
        per_block[name] = {f"{k}_{when}": w[k] for k in before for when, w in (("before", before), ("after", after))}
    return {
        "method": "structured",
        "config": asdict(config),
        "rounded": rounding_notes(widths_before, widths_after, {"heads": config.heads, "mlp": config.mlp}),
        "blocks": per_block,
        "widths": widths_after,
        "params_before": params_before,
        "params_after": _count_params(model),
        "kept": kept,
        "kept_indices": kept_indices,
    }


def apply_kept(model: nn.Module, kept: dict[str, dict[str, list[int]]]) -> nn.Module:
    """Thin ``model`` to exactly the heads / neurons in ``kept`` (``prune_structured``'s ``report["kept"]``),
    in place: for a second copy of the same architecture (an EMA model, a teacher) that must follow the
    decision made on the first."""
    blocks = find_blocks(model)
    for bname, fields in kept.items():
        if bname not in blocks:
            raise ValueError(f"kept: block {bname} is not in the model")
        for field, idx in fields.items():
            unit = blocks[bname].attn if field == "heads" else blocks[bname].mlp
            device = next(model.parameters()).device
            unit.thin(torch.as_tensor(idx, dtype=torch.long, device=device))
    return model
