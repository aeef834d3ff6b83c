"""The GraNd scorer (Paul et al. 2021): the expected norm of each sample's loss gradient, from per-sample weight
gradients in one ``torch.func`` vmap (:func:`data_tickets.grad_norms.per_sample_grad_sq_norms`), with the plain
vmap and a per-sample loop as reference methods. Registered in :data:`data_tickets.scorers.SCORERS` as ``grand``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._batches import Batch
from .grad_norms import per_sample_grad_sq_norms, sdpa_math
from .scorer_registry import ScoreContext, register_scorer

__all__: list[str] = []


def _head_module(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("grand params='head': model has no classifier (get_classifier()) or Linear layer")
    return linears[-1]


def _grad_params(model: nn.Module, params: str | Callable[[str], bool]) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    if params == "all":
        keep = {k for k, v in named.items() if v.requires_grad}
    elif params == "head":
        head_ids = {id(p) for p in _head_module(model).parameters()}
        keep = {k for k, v in named.items() if id(v) in head_ids}
    elif callable(params):
        keep = {k for k in named if params(k)}
    else:
        raise ValueError(f"grand params: expected 'all', 'head' or a callable(name) -> bool, got {params!r}")
    if not keep:
        raise ValueError("grand: no parameters selected for the gradient norm")
    return {k: named[k].detach() for k in named if k in keep}


@register_scorer("grand")
def _grand(
    ctx: ScoreContext,
    repeats: int = 1,
    params: str | Callable[[str], bool] = "all",
    method: str = "vmap",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-sample gradient norm of the loss w.r.t. the parameters.

    method: ``vmap`` (torch.func vmap; Linear layers by input/output-gradient factorisation, see
    :mod:`data_tickets.grad_norms`), ``vmap_plain`` (vmap of the full per-sample gradient) or ``loop``
    (one backward per sample; the reference). chunk_size: samples per vmap call (default: the whole batch
    for ``vmap``, whose memory is that of a training batch; 32 for ``vmap_plain``, which holds a full
    gradient per sample).
    """
    from torch.func import functional_call, grad, vmap

    if method not in ("vmap", "vmap_plain", "loop"):
        raise ValueError(f"grand method: expected 'vmap', 'vmap_plain' or 'loop', got {method!r}")

    checked: dict[int, bool] = {}

    def target(m: nn.Module, b: Batch) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
        """(module to differentiate, its selected params, its inputs).

        With ``params="head"`` on a timm-style model the embeddings are computed once, batched and without
        autograd, and only the classifier runs per sample (logits = head(forward_head(.., pre_logits=True))).
        """
        if params == "head" and hasattr(m, "forward_features") and hasattr(m, "forward_head"):
            head = _head_module(m)
            with torch.no_grad():
                h = m.forward_head(m.forward_features(b.images), pre_logits=True)
                if id(m) not in checked:  # the head must map these embeddings to the model's logits
                    checked[id(m)] = torch.allclose(head(h[:2]), m(b.images[:2]), rtol=1e-4, atol=1e-5)
            if checked[id(m)]:
                return head, {k: v.detach() for k, v in head.named_parameters()}, h
        return m, _grad_params(m, params), b.images

    def per_sample_vmap(m: nn.Module, b: Batch) -> torch.Tensor:
        mod, p, inputs = target(m, b)
        return per_sample_grad_sq_norms(mod, p, inputs, b.labels, chunk_size=chunk_size).sqrt()

    def per_sample_vmap_plain(m: nn.Module, b: Batch) -> torch.Tensor:
        mod, p, inputs = target(m, b)
        buffers = {k: v.detach() for k, v in mod.named_buffers()}

        def loss_fn(pp: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = functional_call(mod, (pp, buffers), (x.unsqueeze(0),), strict=False)
            return F.cross_entropy(out, y.unsqueeze(0))

        def sq_norm(pp: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            g = grad(loss_fn)(pp, x, y)
            return sum(t.pow(2).sum() for t in g.values())

        with sdpa_math():
            sq = vmap(sq_norm, in_dims=(None, 0, 0), chunk_size=chunk_size or 32)(p, inputs, b.labels)
        return sq.sqrt()

    def per_sample_loop(m: nn.Module, b: Batch) -> torch.Tensor:
        mod, p, inputs = target(m, b)
        names = set(p)
        plist = [v for k, v in mod.named_parameters() if k in names]
        out = []
        for i in range(b.labels.numel()):
            loss = F.cross_entropy(mod(inputs[i : i + 1]), b.labels[i : i + 1])
            gs = torch.autograd.grad(loss, plist)
            out.append(torch.stack([g.pow(2).sum() for g in gs]).sum())
        return torch.stack(out).sqrt()

    fn = {"vmap": per_sample_vmap, "vmap_plain": per_sample_vmap_plain, "loop": per_sample_loop}[method]
    total = None
    for k, m in enumerate(ctx.models(repeats)):
        s = ctx.map(m, fn, grad=True, desc=f"grand {k + 1}/{repeats}" if repeats > 1 else "grand")
        total = s if total is None else total + s
    return total / repeats
