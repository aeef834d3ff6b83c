"""Weight masks as ``torch.nn.utils.parametrize`` parametrizations: attach, read, save, enforce, fold away.

A masked layer computes with ``weight * mask``: the optimiser keeps updating the original tensor but the
gradient of pruned entries is zero (the chain rule through the mask), the forward never sees them, and
``make_permanent`` folds the mask into a plain weight again. Nothing patches ``forward``.

Supported layers: ``nn.Linear`` and ``nn.Conv2d`` (patch embeddings). Which entries to mask is decided in
:mod:`pruning.mask_scores` (magnitude, Wanda, N:M); the sparsity of the result is in :mod:`pruning.report`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "WeightMask",
    "FilterFn",
    "PRUNABLE_TYPES",
    "make_filter",
    "select_modules",
    "set_mask",
    "get_mask",
    "is_masked",
    "effective_weight",
    "masked_modules",
    "masks_state",
    "load_masks",
    "enforce_masks_",
    "make_permanent",
]

PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)
FilterFn = Callable[[nn.Module, str], bool]


class WeightMask(nn.Module):
    """Parametrization ``W -> W * mask``; the boolean mask is a buffer so it follows ``.to()`` and state dicts."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask

    def extra_repr(self) -> str:
        d = self.mask.float().mean().item() if self.mask.numel() else 1.0
        return f"shape={tuple(self.mask.shape)}, density={d:.4f}"


# --------------------------------------------------------------------------------------------- selection
def _classifier_modules(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            heads = get()
        except Exception:  # noqa: BLE001 - a model whose get_classifier fails just has no known head
            heads = None
        for h in heads if isinstance(heads, (tuple, list)) else (heads,):
            if isinstance(h, nn.Module):
                ids.update(id(m) for m in h.modules())
    return ids


def make_filter(
    model: nn.Module,
    include_head: bool = False,
    include_patch_embed: bool = False,
    exclude: Iterable[str] = (),
) -> FilterFn:
    """The default layer filter: every Linear/Conv2d except the classifier head(s) and the patch embedding.

    Heads are found through timm's ``get_classifier()`` plus any top-level module named ``head*``
    (``head``, ``head_dist``); the patch embedding is anything under ``patch_embed``. ``exclude`` holds
    extra fqn prefixes to keep dense.
    """
    head_ids = _classifier_modules(model)
    excluded = tuple(exclude)

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, PRUNABLE_TYPES):
            return False
        top = fqn.split(".", 1)[0]
        if not include_head and (id(module) in head_ids or top.startswith("head")):
            return False
        if not include_patch_embed and (top == "patch_embed" or ".patch_embed." in f".{fqn}."):
            return False
        if isinstance(module, nn.Conv2d) and not include_patch_embed:
            return False  # convolutions (patch embeddings, hybrid stems) stay dense unless asked
        return not any(fqn == p or fqn.startswith(p + ".") for p in excluded)

    return keep


def select_modules(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """Modules to prune, by fqn. ``filter_fn(module, fqn)`` replaces the default filter when given."""
    filter_fn = filter_fn or make_filter(model)
    out: dict[str, nn.Module] = {}
    for fqn, module in model.named_modules():
        if not fqn or not filter_fn(module, fqn):
            continue
        if not isinstance(module, PRUNABLE_TYPES):
            raise ValueError(
                f"filter_fn selected {fqn} ({type(module).__name__}); only nn.Linear and nn.Conv2d can be pruned"
            )
        out[fqn] = module
    return out


# --------------------------------------------------------------------------------------------- mask plumbing
# Two kinds of masked layer exist: a Linear/Conv2d with a ``WeightMask`` parametrization (the default), and a
# module that owns its mask as a ``weight_mask`` buffer (``pruning.semi_structured.SemiSparseLinear``, which
# needs the plain weight for its 2:4 sparse-kernel forward). The helpers below accept both.
def _mask_param(module: nn.Module, name: str = "weight") -> WeightMask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, WeightMask):
            return p
    return None


def get_mask(module: nn.Module, name: str = "weight") -> Tensor | None:
    p = _mask_param(module, name)
    if p is not None:
        return p.mask
    own = getattr(module, f"{name}_mask", None)
    return own if isinstance(own, Tensor) else None


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    return get_mask(module, name) is not None


def _raw_weight(module: nn.Module, name: str = "weight") -> Tensor:
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def effective_weight(module: nn.Module) -> Tensor:
    """The weight the forward computes with (mask applied; 2:4 sparse tensors densified)."""
    w = module.weight
    if type(w).__name__.startswith("SparseSemiStructuredTensor"):
        return w.to_dense()
    own = getattr(module, "weight_mask", None)
    if isinstance(own, Tensor) and not parametrize.is_parametrized(module, "weight"):
        return w * own
    return w


def set_mask(module: nn.Module, mask: Tensor, name: str = "weight") -> None:
    """Attach (or replace) the boolean mask of ``module.<name>``; the mask may be given as a 2-D view."""
    weight = _raw_weight(module, name)
    mask = mask.detach().to(device=weight.device, dtype=torch.bool).reshape(weight.shape)
    current = get_mask(module, name)
    if current is not None:
        current.copy_(mask)
    else:
        parametrize.register_parametrization(module, name, WeightMask(mask))


def masked_modules(model: nn.Module, name: str = "weight") -> dict[str, nn.Module]:
    return {
        fqn: m
        for fqn, m in model.named_modules()
        if fqn and ".parametrizations." not in f".{fqn}." and is_masked(m, name)
    }


def masks_state(model: nn.Module) -> dict[str, Tensor]:
    """``{fqn: bool mask}`` of every masked layer (CPU tensors: safe for ``torch.save``/``weights_only``)."""
    return {fqn: get_mask(m).detach().cpu().clone() for fqn, m in masked_modules(model).items()}


def load_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Re-attach masks saved by ``masks_state`` (e.g. before loading a resumed training state)."""
    modules = dict(model.named_modules())
    for fqn, mask in masks.items():
        if fqn not in modules:
            raise ValueError(f"masks: layer {fqn!r} not found in the model")
        w = _raw_weight(modules[fqn])
        if mask.numel() != w.numel():
            raise ValueError(f"masks: {fqn} mask has {mask.numel()} entries, weight has {w.numel()}")
        set_mask(modules[fqn], mask)


@torch.no_grad()
def enforce_masks_(model: nn.Module) -> None:
    """Zero the *stored* weights under each mask. Call after an optimiser step: weight decay and momentum
    move pruned entries even though the forward never sees them; this keeps exports exactly sparse."""
    for m in masked_modules(model).values():
        raw = _raw_weight(m)
        raw.mul_(get_mask(m).to(raw.dtype))


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight and drop the mask (the same Parameter object is kept, so an optimiser
    built on the masked model keeps working). Modules owning a ``weight_mask`` are turned back into plain
    layers through their ``to_dense_module()``."""
    enforce_masks_(model)
    for fqn, m in list(masked_modules(model).items()):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        elif hasattr(m, "to_dense_module"):
            parent_name, _, child = fqn.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, m.to_dense_module())
    return model
