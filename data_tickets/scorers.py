"""Per-sample informativeness scorers (one registry).

Every scorer returns a float32 CPU tensor ``s`` of length ``len(dataset)`` where ``s[i]`` belongs to dataset
index ``i``; **higher means more informative** (harder, rarer, more uncertain). Policies in
:mod:`data_tickets.policies` turn scores into subsets.

=============== ============================================================================ ========
scorer          score (higher = more informative)                                             needs
=============== ============================================================================ ========
loss            cross-entropy of the model on the sample                                      labels
el2n            ``||softmax(f(x)) - onehot(y)||_2`` (Paul et al. 2021), mean over ``repeats``  labels
                briefly trained proxy models (seeds ``seed .. seed+repeats-1``)
grand           per-sample gradient norm ``||d loss / d theta||_2`` (Paul et al. 2021), all   labels
                parameters (or ``params="head"``), computed with ``torch.func`` vmap
aum             negative area under the margin (Pleiss et al. 2020): ``-(z_y - max_{k!=y} z_k)`` labels,
                of the logits, averaged over the epoch-end evaluations of a proxy training     proxy
                (a training-dynamics score: steadier across proxy seeds than one end-point)
forgetting      forgetting events (correct -> wrong between consecutive epoch-end evaluations labels,
                of a proxy training, Toneva et al. 2019); never-learned samples get          proxy
                ``max + 1``
entropy         predictive entropy ``-sum p log p`` (uncertainty)                              -
margin          ``1 - (p_top1 - p_top2)`` (small margin = uncertain); ``use_labels=True``     -
                uses ``max_{k!=y} p_k - p_y`` instead
prototype       label-free (Sorscher et al. 2022): k-means (scikit-learn) on L2-normalised    -
                embeddings, cosine-space distance to the nearest centroid (far = atypical)
cls_attention   ViT only: normalised entropy of the CLS token's attention over the patches    -
                (diffuse attention = no compact discriminative region = harder image)
=============== ============================================================================ ========

Models come from ``proxy`` when given (``repeats`` fresh proxy trainings, see :mod:`data_tickets.proxy`)
and otherwise are the ``model`` argument itself (``repeats`` must then be 1). Single-pass scorers run batched
under :func:`torch.inference_mode` with the model in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ._batches import Batch, dataset_labels, resolve_device
from .attention import _attn_modules, cls_attention
from .proxy import Proxy
from .scorer_registry import SCORERS, ScoreContext, Scorer, mean_over, register_scorer

__all__ = ["Scorer", "ScoreContext", "SCORERS", "register_scorer", "score"]


def score(
    model: nn.Module | None,
    dataset: Dataset,
    scorer: str = "el2n",
    *,
    proxy: Proxy | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    num_workers: int = 0,
    seed: int = 0,
    **kw: Any,
) -> torch.Tensor:
    """Score every sample of ``dataset``; returns a float32 tensor aligned with dataset indices.

    ``model`` is scored directly unless ``proxy`` is given, in which case fresh models are trained by the
    proxy (required for ``forgetting``; recommended for ``el2n``). Scorer options go in ``**kw``
    (e.g. ``repeats=3`` for el2n, ``params="head"`` for grand, ``layer="rollout"`` for cls_attention).
    ``seed`` is the first proxy seed (proxy run ``k`` uses ``seed + k``) and seeds k-means.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer: expected one of {', '.join(sorted(SCORERS))}, got {scorer!r}")
    spec = SCORERS[scorer]
    allowed = spec.options()
    for key in kw:
        if key not in allowed:
            raise ValueError(f"scorer '{scorer}' has no option {key!r} (options: {', '.join(allowed) or 'none'})")
    if spec.needs_proxy and proxy is None:
        raise ValueError(
            f"scorer '{scorer}' needs proxy= (a callable proxy(seed, on_epoch_end) -> model that "
            "trains a fresh model; see data_tickets.proxy.make_proxy)"
        )
    if model is None and proxy is None:
        raise ValueError(f"scorer '{scorer}': pass a model or a proxy= trainer")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to score")
    ctx = ScoreContext(
        model,
        dataset,
        proxy,
        batch_size,
        device if device is not None else (resolve_device(model, None) if model is not None else None),
        num_workers,
        progress,
        seed,
        scorer,
    )
    out = spec.fn(ctx, **kw).float().cpu().reshape(-1)
    if out.numel() != len(dataset):
        raise RuntimeError(f"scorer '{scorer}' returned {out.numel()} scores for {len(dataset)} samples")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"scorer '{scorer}' produced non-finite scores (diverged model?)")
    return out


@register_scorer("loss")
def _loss(ctx: ScoreContext, repeats: int = 1) -> torch.Tensor:
    """Cross-entropy loss of the model on each sample (hard/mislabelled samples score high)."""
    return mean_over(ctx, repeats, lambda m, b: F.cross_entropy(m(b.images), b.labels, reduction="none"))


@register_scorer("el2n")
def _el2n(ctx: ScoreContext, repeats: int | None = None) -> torch.Tensor:
    """EL2N: L2 norm of softmax error, averaged over proxy models (default 3 with a proxy, else 1)."""
    if repeats is None:
        repeats = 3 if ctx.proxy is not None else 1

    def fn(m: nn.Module, b: Batch) -> torch.Tensor:
        logits = m(b.images)
        err = logits.softmax(-1) - F.one_hot(b.labels, logits.shape[-1]).to(logits.dtype)
        return err.norm(dim=-1)

    return mean_over(ctx, repeats, fn)


@register_scorer("entropy", needs_labels=False)
def _entropy(ctx: ScoreContext, repeats: int = 1) -> torch.Tensor:
    """Predictive entropy of the softmax (uncertain samples score high)."""

    def fn(m: nn.Module, b: Batch) -> torch.Tensor:
        logp = m(b.images).float().log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)

    return mean_over(ctx, repeats, fn)


@register_scorer("margin", needs_labels=False)
def _margin(ctx: ScoreContext, repeats: int = 1, use_labels: bool = False) -> torch.Tensor:
    """1 - (top1 - top2 probability); with use_labels: max other-class probability minus true-class one."""

    def fn(m: nn.Module, b: Batch) -> torch.Tensor:
        p = m(b.images).float().softmax(-1)
        if use_labels:
            py = p.gather(1, b.labels[:, None]).squeeze(1)
            other = p.scatter(1, b.labels[:, None], float("-inf")).amax(1)
            return other - py
        top = p.topk(2, dim=-1).values
        return 1.0 - (top[:, 0] - top[:, 1])

    return mean_over(ctx, repeats, fn)


@register_scorer("forgetting", needs_proxy=True)
def _forgetting(ctx: ScoreContext, repeats: int = 1) -> torch.Tensor:
    """Forgetting events during proxy training (epoch-end evaluations); never-learned samples get max + 1."""
    assert ctx.proxy is not None
    total = torch.zeros(len(ctx.dataset))
    for k in range(repeats):
        state: dict[str, torch.Tensor] = {}
        n = len(ctx.dataset)
        state["prev"] = torch.zeros(n, dtype=torch.bool)
        state["events"] = torch.zeros(n)
        state["learned"] = torch.zeros(n, dtype=torch.bool)
        state["evals"] = torch.zeros(())

        def on_epoch_end(model: nn.Module, epoch: int) -> None:
            correct = ctx.map(
                model, lambda m, b: (m(b.images).argmax(-1) == b.labels).float(), desc=f"forgetting eval epoch {epoch}"
            ).bool()
            state["events"] += (state["prev"] & ~correct).float()
            state["learned"] |= correct
            state["prev"] = correct
            state["evals"] += 1

        ctx.proxy(ctx.seed + k, on_epoch_end)
        if int(state["evals"]) < 2:
            raise ValueError(
                "scorer 'forgetting': the proxy must train >= 2 epochs and call on_epoch_end after "
                f"each (got {int(state['evals'])} evaluations)"
            )
        ev = state["events"]
        ev[~state["learned"]] = ev.max() + 1
        total += ev
    return total / repeats


@register_scorer("aum", needs_proxy=True)
def _aum(ctx: ScoreContext, repeats: int = 1) -> torch.Tensor:
    """Negative area under the margin: the logit margin of the labelled class, averaged over every epoch-end
    evaluation of ``repeats`` proxy trainings and negated (low, often negative margins = hard or mislabelled)."""
    assert ctx.proxy is not None
    total, evals = torch.zeros(len(ctx.dataset)), 0

    def margin(m: nn.Module, b: Batch) -> torch.Tensor:
        z = m(b.images).float()
        zy = z.gather(1, b.labels[:, None]).squeeze(1)
        return zy - z.scatter(1, b.labels[:, None], float("-inf")).amax(1)

    def on_epoch_end(model: nn.Module, epoch: int) -> None:
        nonlocal total, evals
        total = total + ctx.map(model, margin, desc=f"aum eval epoch {epoch}")
        evals += 1

    for k in range(repeats):
        ctx.proxy(ctx.seed + k, on_epoch_end)
    if evals == 0:
        raise ValueError("scorer 'aum': the proxy must call on_epoch_end after each epoch (got no evaluations)")
    return -total / evals


def _embed(m: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if hasattr(m, "forward_features") and hasattr(m, "forward_head"):
        return m.forward_head(m.forward_features(images), pre_logits=True)
    raise ValueError("scorer 'prototype' needs a model with forward_features/forward_head (timm) or embed_fn=")


@register_scorer("prototype", needs_labels=False)
def _prototype(
    ctx: ScoreContext,
    n_clusters: int | None = None,
    normalize: bool = True,
    embed_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    n_init: int = 3,
) -> torch.Tensor:
    """Distance to the nearest k-means centroid of the (L2-normalised) embeddings; label-free."""
    from sklearn.cluster import KMeans

    model = next(ctx.models(1))
    embed = embed_fn or _embed
    feats = ctx.map(model, lambda m, b: embed(m, b.images).flatten(1), desc="prototype embed")
    if normalize:
        feats = F.normalize(feats, dim=1)
    n = feats.shape[0]
    if n_clusters is None:  # only the number of classes is used, never the labels themselves
        n_clusters = int(torch.unique(dataset_labels(ctx.dataset, ctx.batch_size)).numel())
    if not 1 <= n_clusters <= n:
        raise ValueError(f"prototype n_clusters: expected 1..{n} (dataset size), got {n_clusters}")
    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=ctx.seed)
    dist = km.fit_transform(feats.double().numpy()).min(axis=1)
    return torch.from_numpy(np.asarray(dist, dtype=np.float32))


@register_scorer("cls_attention", needs_labels=False)
def _cls_attention(ctx: ScoreContext, layer: int | str = -1) -> torch.Tensor:
    """Normalised entropy of the CLS-to-patch attention (last block or 'rollout'), mean over heads."""
    model = next(ctx.models(1))
    _attn_modules(model)  # clear error for non-ViTs before the first batch

    def fn(m: nn.Module, b: Batch) -> torch.Tensor:
        a = cls_attention(m, b.images, layer=layer)
        ent = -(a * a.clamp_min(1e-12).log()).sum(-1)
        return ent / float(np.log(a.shape[-1])) if a.shape[-1] > 1 else ent

    return ctx.map(model, fn, desc="cls_attention")


from . import scorers_grand  # noqa: E402, F401  (registers "grand": per-sample gradient norms)
