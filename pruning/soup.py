"""Instant Soup Pruning (ISSP, Jaiswal et al. ICML 2023, used by the LOTUS paper).

Instead of expensive iterative magnitude pruning, draw ``k`` *weak* masks cheaply: copy the model, train each
copy briefly on a small data fraction with its own seed (the caller's ``train_fn`` decides how), magnitude-prune
the copy, and merge the masks ("mask soup"). Weights that many weak runs agree to keep are robust to the
noise of short training; the merged mask is then applied to the main (untouched) model.

Merges: ``vote`` keeps the weights kept by most copies, with ties broken by the main model's magnitude, so the
result hits the requested sparsity exactly; ``union`` keeps what any copy kept (sparsity <= target);
``intersection`` keeps what every copy kept (sparsity >= target).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .config import check_sparsity
from .mask_scores import magnitude_masks, topk_mask
from .masks import FilterFn, effective_weight, select_modules, set_mask
from .report import sparsity_report

__all__ = ["instant_soup_prune_", "merge_masks"]


def merge_masks(
    masks: Sequence[dict[str, Tensor]],
    how: Literal["vote", "union", "intersection"] = "vote",
    sparsity: float | None = None,
    tiebreak: dict[str, Tensor] | None = None,
    scope: Literal["layer", "global"] = "layer",
) -> dict[str, Tensor]:
    """Merge boolean masks layer by layer. ``vote`` needs ``sparsity``; ``tiebreak`` (scores, e.g. |w|) orders
    weights with equal vote counts (default: index order)."""
    if not masks:
        raise ValueError("masks: need at least one mask to merge")
    counts = {f: torch.stack([m[f].to(torch.int16) for m in masks]).sum(0) for f in masks[0]}
    k = len(masks)
    if how == "union":
        return {f: c > 0 for f, c in counts.items()}
    if how == "intersection":
        return {f: c == k for f, c in counts.items()}
    if how != "vote":
        raise ValueError(f"merge: expected 'vote', 'union' or 'intersection', got {how!r}")
    if sparsity is None:
        raise ValueError("sparsity: vote merging needs the target sparsity")
    scores = {}
    for f, c in counts.items():
        tb = torch.zeros_like(c, dtype=torch.float32) if tiebreak is None else tiebreak[f].float().reshape(c.shape)
        tb = tb / tb.abs().max().clamp_min(1e-12) * 0.5  # in [0, 0.5]: never outweighs one vote
        scores[f] = c.float() + tb
    if scope == "layer":
        return {f: topk_mask(s, sparsity) for f, s in scores.items()}
    flat = topk_mask(torch.cat([s.reshape(-1).cpu() for s in scores.values()]), sparsity)
    out, start = {}, 0
    for f, s in scores.items():
        out[f] = flat[start : start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return out


def instant_soup_prune_(
    model: nn.Module,
    train_fn: Callable[[nn.Module, int], Any],
    sparsity: float,
    k: int = 4,
    merge: Literal["vote", "union", "intersection"] = "vote",
    seeds: Sequence[int] | None = None,
    filter_fn: FilterFn | None = None,
    scope: Literal["layer", "global"] = "layer",
) -> dict[str, Any]:
    """Apply an ISSP mask of ``sparsity`` to ``model`` in place and return a report.

    ``train_fn(copy, seed)`` trains one weak copy briefly (e.g. 1 epoch on a 10% subset drawn with ``seed``);
    the global RNG is seeded with ``seed`` before it is called. Returns the sparsity report plus
    ``copies`` (per-copy info), ``agreement`` (fraction of weights on which all copies agree) and ``merge``.
    """
    sparsity = check_sparsity(sparsity)
    if k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k}")
    seeds = list(seeds) if seeds is not None else list(range(k))
    if len(seeds) != k:
        raise ValueError(f"seeds: expected {k} seeds, got {len(seeds)}")
    modules = select_modules(model, filter_fn)
    if not modules:
        raise ValueError("filter_fn: selected no nn.Linear/nn.Conv2d layers to prune")
    fqns = list(modules)
    masks: list[dict[str, Tensor]] = []
    copies: list[dict[str, Any]] = []
    for seed in seeds:
        weak = copy.deepcopy(model)
        torch.manual_seed(seed)
        result = train_fn(weak, seed)
        weak_modules = {f: weak.get_submodule(f) for f in fqns}
        masks.append({f: m.cpu() for f, m in magnitude_masks(weak_modules, sparsity, scope).items()})
        info: dict[str, Any] = {"seed": seed}
        if isinstance(result, dict):
            info.update({k_: v for k_, v in result.items() if isinstance(v, (int, float, str))})
        elif isinstance(result, (int, float)):
            info["result"] = result
        copies.append(info)
        del weak
    tiebreak = {f: effective_weight(modules[f]).detach().abs().reshape(masks[0][f].shape).cpu() for f in fqns}
    merged = merge_masks(masks, merge, sparsity, tiebreak, scope)
    total = sum(m.numel() for m in merged.values())
    agree = sum(int(((torch.stack([mk[f] for mk in masks]).sum(0)) % k == 0).sum()) for f in fqns) if k > 1 else total
    for f, mask in merged.items():
        set_mask(modules[f], mask)
    report = sparsity_report(model)
    report.update(
        method="issp",
        merge=merge,
        k=k,
        seeds=seeds,
        target_sparsity=sparsity,
        copies=copies,
        agreement=agree / total if total else 1.0,
        skipped={},
        notes=[],
    )
    return report
