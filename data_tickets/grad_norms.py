"""Per-sample gradient norms with ``torch.func`` vmap, without materialising per-sample weight gradients.

``vmap(grad(loss))`` over a batch builds one full gradient per sample: ``batch x parameters`` floats, which on
a CPU makes GraNd memory-bound (a 1.8 M-parameter ViT writes ~230 MB per 32-sample chunk). For an
``nn.Linear`` the per-sample weight gradient is a sum of outer products, ``dW_i = sum_t g_it x_it^T`` (``x``:
the layer's inputs at the sample's tokens, ``g``: the loss gradient w.r.t. its outputs), so its squared norm
needs only ``x`` and ``g``:

    ||dW_i||^2 = sum_{t,s} (x_it . x_is) (g_it . g_is)    (T x T Gram matrices, "ghost norm")
             or ||g_i^T x_i||^2                            (whichever is cheaper: T^2 vs in*out)
    ||db_i||^2 = ||sum_t g_it||^2

Inside one vmapped ``grad`` call a zero *probe* is added to every Linear's output (its gradient is ``g``) and
the Linear's input is returned as auxiliary output; parameters that are not Linear weights/biases (norms,
embeddings, convolutions, gains) get ordinary per-sample gradients, which are small. Forward hooks do the
adding and capturing; they are registered for the call and removed afterwards, so the model is unchanged.
The result equals ``vmap(grad)``'s up to float rounding. A Linear called more than once per forward, or whose
weight is tied to another parameter, falls back to the plain per-sample gradient. Call it with the model in
eval mode (a shape pass on one sample precedes the gradient pass; a forward that changes between the two
is an error, not a silent miscount).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["per_sample_grad_sq_norms", "sdpa_math"]


def sdpa_math():
    """vmap has no batching rule for the fused CPU flash-attention kernels; the math kernel decomposes."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - older torch
        return nullcontext()


def _linear_units(module: nn.Module, selected: set[str], x: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Linear layers (by module name) whose weight or bias is selected and that run exactly once per forward,
    with their per-sample output shape (from a no-grad dry run on one sample)."""
    uses: dict[int, int] = {}
    for _, prm in module.named_parameters(remove_duplicate=False):
        uses[id(prm)] = uses.get(id(prm), 0) + 1
    cands = {}
    for name, m in module.named_modules():
        if type(m) is not nn.Linear:  # subclasses may change forward(); leave them to the plain path
            continue
        if any(uses.get(id(prm), 0) > 1 for prm in m.parameters()):  # tied weights: used elsewhere too
            continue
        w, b = (f"{name}.weight", f"{name}.bias") if name else ("weight", "bias")
        has_w, has_b = w in selected, m.bias is not None and b in selected
        if has_w or has_b:
            cands[name] = {"module": m, "weight": w if has_w else None, "bias": b if has_b else None, "calls": 0}
    if not cands:
        return {}

    def hook(name: str) -> Callable:
        def fn(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            cands[name]["calls"] += 1
            cands[name]["shape"], cands[name]["dtype"] = tuple(out.shape), out.dtype

        return fn

    handles = [c["module"].register_forward_hook(hook(n)) for n, c in cands.items()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the dry run must not consume RNG state
            module(x[:1])
    finally:
        for h in handles:
            h.remove()
    return {n: c for n, c in cands.items() if c["calls"] == 1}


def _weight_sq_norm(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``||g^T x||_F^2`` for one sample's output gradients ``g`` (T, out) and inputs ``x`` (T, in)."""
    t, n_in, n_out = g.shape[0], x.shape[1], g.shape[1]
    if t * t <= n_in * n_out:
        return ((x @ x.T) * (g @ g.T)).sum()
    return (g.T @ x).pow(2).sum()


def per_sample_grad_sq_norms(
    module: nn.Module,
    params: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:
    """``||d loss(module(inputs[i]), labels[i]) / d params||^2`` for every sample ``i`` (shape ``(B,)``).

    params: the selected parameters by name; the others are held constant (factorised Linear layers use the
    module's own weights, so pass the module's current values). Uses ``torch.func``
    vmap over the batch (``chunk_size`` samples at a time, default all) with the Linear factorisation above.
    """
    from torch.func import functional_call, grad, vmap

    units = _linear_units(module, set(params), inputs)
    factored = {k for u in units.values() for k in (u["weight"], u["bias"]) if k}
    diff = {k: v for k, v in params.items() if k not in factored}
    held = {k: v.detach() for k, v in module.named_parameters() if k not in diff}
    buffers = {k: v.detach() for k, v in module.named_buffers()}
    state: dict[str, Any] = {"active": False}

    def hook(name: str) -> Callable:
        def fn(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not state["active"]:
                return None
            if name in state["inputs"]:
                raise RuntimeError(
                    f"per_sample_grad_sq_norms: Linear {name!r} ran twice in one forward but once "
                    "in the shape pass; call the model in eval mode with a deterministic forward"
                )
            state["inputs"][name] = args[0]
            return out + state["probes"][name]

        return fn

    def loss_of(d: dict[str, torch.Tensor], probes: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        state.update(active=True, probes=probes, inputs={})
        try:
            out = functional_call(module, (d, held, buffers), (x.unsqueeze(0),), strict=False)
        finally:
            state["active"] = False
        missing = set(units) - set(state["inputs"])
        if missing:
            raise RuntimeError(
                f"per_sample_grad_sq_norms: Linear layer(s) {sorted(missing)} ran in the shape pass "
                "but not in the gradient pass; call the model in eval mode"
            )
        return loss_fn(out, y.unsqueeze(0)), dict(state["inputs"])

    def sq_norm(
        d: dict[str, torch.Tensor], probes: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        (g_params, g_probes), xs = grad(loss_of, argnums=(0, 1), has_aux=True)(d, probes, x, y)
        total = sum((t.float().pow(2).sum() for t in g_params.values()), torch.zeros((), dtype=torch.float32))
        for name, u in units.items():
            g = g_probes[name].reshape(-1, g_probes[name].shape[-1]).float()
            if u["weight"]:
                total = total + _weight_sq_norm(g, xs[name].reshape(-1, xs[name].shape[-1]).float())
            if u["bias"]:
                total = total + g.sum(0).pow(2).sum()
        return total

    b = labels.shape[0]
    probes = {n: torch.zeros((b, *u["shape"]), dtype=u["dtype"], device=inputs.device) for n, u in units.items()}
    handles = [u["module"].register_forward_hook(hook(n)) for n, u in units.items()]
    try:
        with sdpa_math():
            sq = vmap(sq_norm, in_dims=(None, 0, 0, 0), chunk_size=chunk_size)(diff, probes, inputs, labels)
        return sq.clamp_min(0.0)  # the Gram form can round a tiny norm slightly below zero
    finally:
        for h in handles:
            h.remove()
