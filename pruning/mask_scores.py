"""Which weights a mask keeps: magnitude, Wanda (|W| x input-activation norm) and N:M scores, as boolean masks.

Weights are viewed as 2-D ``(out, in)`` matrices (conv: ``(out, in*kh*kw)``), so N:M groups run along the
input dimension, which is the reduction dimension of the matmul and the one the 2:4 hardware format
compresses. Wanda's input norms come from calibration batches (``collect_input_norms``, forward hooks).
The masks are attached with :func:`pruning.masks.set_mask`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import effective_weight

__all__ = [
    "masks_from_scores",
    "magnitude_masks",
    "wanda_masks",
    "nm_masks",
    "wanda_scores",
    "topk_mask",
    "weight_2d",
    "nm_mask",
    "is_nm_sparse",
    "collect_input_norms",
    "batch_inputs",
]


# --------------------------------------------------------------------------------------------- scores -> masks
def weight_2d(module: nn.Module) -> Tensor:
    """The effective (masked) weight as a float ``(out, in)`` matrix (conv: ``(out, in*kh*kw)``)."""
    w = effective_weight(module).detach()
    return w.reshape(w.shape[0], -1).float()


def topk_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep exactly ``numel - round(sparsity * numel)`` highest scores (ties broken by position)."""
    flat = scores.reshape(-1)
    n_prune = int(round(sparsity * flat.numel()))
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        idx = torch.topk(flat, n_prune, largest=False, sorted=False).indices
        mask[idx] = False
    return mask.reshape(scores.shape)


def _rowwise_mask(scores: Tensor, sparsity: float) -> Tensor:
    n_prune = int(round(sparsity * scores.shape[1]))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        idx = torch.topk(scores, n_prune, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, False)
    return mask


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive entries along dim 1 of a 2-D score."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M: input dimension {cols} is not a multiple of m={m}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=True, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def is_nm_sparse(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive entries along the input dim has at most ``n`` nonzeros."""
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.shape[1] % m:
        return False
    return bool(((w != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all())


def masks_from_scores(scores: Mapping[str, Tensor], sparsity: float, scope: str = "layer") -> dict[str, Tensor]:
    """Boolean masks dropping the lowest scores: per layer (``"layer"``), per output row (``"row"``) or
    ranked over all layers together (``"global"``). Scores are 2-D ``(out, in)`` tensors keyed by fqn."""
    if scope == "layer":
        return {fqn: topk_mask(s, sparsity) for fqn, s in scores.items()}
    if scope == "row":
        return {fqn: _rowwise_mask(s, sparsity) for fqn, s in scores.items()}
    if scope != "global":
        raise ValueError(f"scope: expected 'layer', 'row' or 'global', got {scope!r}")
    if not scores:
        return {}
    flat_mask = topk_mask(torch.cat([s.reshape(-1).cpu() for s in scores.values()]), sparsity)
    out: dict[str, Tensor] = {}
    start = 0
    for fqn, s in scores.items():
        out[fqn] = flat_mask[start : start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return out


def magnitude_masks(modules: Mapping[str, nn.Module], sparsity: float, scope: str = "layer") -> dict[str, Tensor]:
    """Masks pruning the smallest |w|. Scores use the *current* (masked) weights, so pruned entries stay
    pruned when sparsity grows (gradual schedules)."""
    if scope not in ("layer", "global"):
        raise ValueError(f"scope: expected 'layer' or 'global', got {scope!r}")
    return masks_from_scores({fqn: weight_2d(m).abs() for fqn, m in modules.items()}, sparsity, scope)


def wanda_masks(
    modules: Mapping[str, nn.Module], norms: Mapping[str, Tensor], sparsity: float, scope: str = "row"
) -> dict[str, Tensor]:
    """Wanda masks: score ``|W_ij| * ||X_j||_2``; ``scope='row'`` prunes each output row to ``sparsity``."""
    scores = {fqn: wanda_scores(m, norms[fqn]) for fqn, m in modules.items()}
    return masks_from_scores(scores, sparsity, "row" if scope == "row" else "layer")


def wanda_scores(module: nn.Module, norm: Tensor) -> Tensor:
    w = weight_2d(module)
    if norm.numel() != w.shape[1]:
        raise ValueError(f"wanda: activation norm has {norm.numel()} entries, weight has {w.shape[1]} inputs")
    return w.abs() * norm.to(w.device, torch.float32).reshape(1, -1)


def nm_masks(
    modules: Mapping[str, nn.Module], n: int, m: int, norms: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """N:M masks scored by magnitude (``norms=None``) or Wanda. Returns ``(masks, skipped)`` where
    ``skipped`` maps layers whose input dim is not a multiple of ``m`` to the reason."""
    masks, skipped = {}, {}
    for fqn, mod in modules.items():
        scores = weight_2d(mod).abs() if norms is None else wanda_scores(mod, norms[fqn])
        if scores.shape[1] % m:
            skipped[fqn] = f"input dim {scores.shape[1]} is not a multiple of {m}"
            continue
        masks[fqn] = nm_mask(scores, n, m)
    return masks, skipped


# --------------------------------------------------------------------------------------------- calibration
def batch_inputs(batch: Any) -> Tensor:
    """The model input of a calibration batch: a tensor, or the first item of an ``(x, y[, index])`` tuple,
    or ``batch['image']``/``batch['pixel_values']`` of a dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("image", "images", "pixel_values", "input"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise ValueError(
        f"calib_loader: expected batches that are tensors or (x, y[, index]) tuples, got {type(batch).__name__}"
    )


def _input_sq_norm(module: nn.Module, x: Tensor) -> Tensor:
    x = x.detach().float()
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).pow(2).sum(0)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or not isinstance(module.padding, tuple):
            raise ValueError("wanda: grouped or 'same'-padded Conv2d layers are not supported; exclude them")
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return cols.pow(2).sum((0, 2))
    raise ValueError(f"wanda: unsupported layer type {type(module).__name__}")


@torch.no_grad()
def collect_input_norms(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    loader: Iterable[Any],
    max_batches: int | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """L2 norm of every input feature of each module over all calibration tokens (forward hooks, eval mode).

    Conv2d inputs are unfolded into patches so the norm lines up with the flattened ``(out, in*kh*kw)`` weight.
    A Linear that its parent calls functionally (timm EVA's ``F.linear(x, self.qkv.weight, qkv_bias)``) never
    fires its own hook; it gets the parent's input instead, which is what that call multiplies.
    ``reduce_sum`` (data-parallel calibration): each process feeds its share of the batches and the squared
    norms are summed over processes (e.g. ``torch.distributed.all_reduce``) before the square root.
    """
    if loader is None:
        raise ValueError("calib_loader: Wanda scoring needs calibration data; pass calib_loader")
    sq: dict[str, Tensor | None] = {fqn: None for fqn in modules}
    parent_sq: dict[str, Tensor | None] = {}
    parent_of: dict[str, str] = {}
    hooks = []

    def own_hook(fqn: str):
        def hook(mod: nn.Module, args: tuple, _out: Any) -> None:
            s = _input_sq_norm(mod, args[0])
            sq[fqn] = s if sq[fqn] is None else sq[fqn] + s

        return hook

    def parent_hook(pfqn: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if x is not None and x.is_floating_point():
                s = x.detach().float().reshape(-1, x.shape[-1]).pow(2).sum(0)
                parent_sq[pfqn] = s if parent_sq.get(pfqn) is None else parent_sq[pfqn] + s

        return hook

    for fqn, mod in modules.items():
        hooks.append(mod.register_forward_hook(own_hook(fqn)))
        pfqn = fqn.rpartition(".")[0]
        if isinstance(mod, nn.Linear) and pfqn:
            parent_of[fqn] = pfqn
            if pfqn not in parent_sq:
                parent_sq[pfqn] = None
                hooks.append(model.get_submodule(pfqn).register_forward_pre_hook(parent_hook(pfqn)))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        seen = 0
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            model(batch_inputs(batch).to(device=device, dtype=dtype))
            seen += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("calib_loader: yielded no batches")
    missing = []
    for fqn, v in sq.items():
        if v is None:
            fallback = parent_sq.get(parent_of.get(fqn, ""))
            if fallback is not None and fallback.numel() == modules[fqn].in_features:
                sq[fqn] = fallback
            else:
                missing.append(fqn)
    if missing:
        raise ValueError(f"wanda: layers never ran during calibration: {', '.join(missing[:5])}")
    if reduce_sum is not None:
        sq = {fqn: reduce_sum(v) for fqn, v in sq.items()}
    return {fqn: v.sqrt() for fqn, v in sq.items()}
