"""Weight masks as ``torch.nn.utils.parametrize`` parametrizations, and the scores that choose them.

A masked layer computes with ``weight * mask``: the optimiser keeps updating the original tensor but the
gradient of pruned entries is zero (the chain rule through the mask), the forward never sees them, and
``make_permanent`` folds the mask into a plain weight again. Nothing patches ``forward``.

Supported layers: ``nn.Linear`` and ``nn.Conv2d`` (patch embeddings, groups=1 for Wanda). Weights are viewed
as 2-D ``(out, in)`` matrices (conv: ``(out, in*kh*kw)``), so N:M groups run along the input dimension,
which is the reduction dimension of the matmul and the one the 2:4 hardware format compresses.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "WeightMask", "FilterFn", "PRUNABLE_TYPES",
    "make_filter", "select_modules",
    "set_mask", "get_mask", "is_masked", "effective_weight", "masked_modules", "masks_state", "load_masks",
    "enforce_masks_",
    "make_permanent", "squash",
    "magnitude_masks", "wanda_masks", "nm_masks", "topk_mask", "nm_mask", "is_nm_sparse",
    "collect_input_norms", "batch_inputs",
    "sparsity_report", "effective_parameters",
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
        fqn: m for fqn, m in model.named_modules()
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


squash = make_permanent


# --------------------------------------------------------------------------------------------- scores -> masks
def _weight_2d(module: nn.Module) -> Tensor:
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


def magnitude_masks(
    modules: Mapping[str, nn.Module], sparsity: float, scope: str = "layer"
) -> dict[str, Tensor]:
    """Masks pruning the smallest |w|. Scores use the *current* (masked) weights, so pruned entries stay
    pruned when sparsity grows (gradual schedules)."""
    if scope == "layer":
        return {fqn: topk_mask(_weight_2d(m).abs(), sparsity) for fqn, m in modules.items()}
    if scope != "global":
        raise ValueError(f"scope: expected 'layer' or 'global', got {scope!r}")
    if not modules:
        return {}
    scores = [_weight_2d(m).abs() for m in modules.values()]
    flat_mask = topk_mask(torch.cat([s.reshape(-1).cpu() for s in scores]), sparsity)
    out: dict[str, Tensor] = {}
    start = 0
    for (fqn, _), s in zip(modules.items(), scores):
        out[fqn] = flat_mask[start:start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return out


def wanda_masks(
    modules: Mapping[str, nn.Module], norms: Mapping[str, Tensor], sparsity: float, scope: str = "row"
) -> dict[str, Tensor]:
    """Wanda masks: score ``|W_ij| * ||X_j||_2``; ``scope='row'`` prunes each output row to ``sparsity``."""
    out = {}
    for fqn, m in modules.items():
        scores = wanda_scores(m, norms[fqn])
        out[fqn] = _rowwise_mask(scores, sparsity) if scope == "row" else topk_mask(scores, sparsity)
    return out


def wanda_scores(module: nn.Module, norm: Tensor) -> Tensor:
    w = _weight_2d(module)
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
        scores = _weight_2d(mod).abs() if norms is None else wanda_scores(mod, norms[fqn])
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
) -> dict[str, Tensor]:
    """L2 norm of every input feature of each module over all calibration tokens (forward hooks, eval mode).

    Conv2d inputs are unfolded into patches so the norm lines up with the flattened ``(out, in*kh*kw)`` weight.
    A Linear that its parent calls functionally (timm EVA's ``F.linear(x, self.qkv.weight, qkv_bias)``) never
    fires its own hook; it gets the parent's input instead, which is what that call multiplies.
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
    return {fqn: v.sqrt() for fqn, v in sq.items()}


# --------------------------------------------------------------------------------------------- report
@torch.no_grad()
def sparsity_report(model: nn.Module, modules: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
    """Per-layer and total sparsity of the effective (masked) weights.

    ``layers`` lists every Linear/Conv2d (pruned or not) unless ``modules`` restricts it; ``total`` sums the
    pruned (masked) layers; ``model`` counts every parameter of the model.
    """
    layers: dict[str, dict[str, Any]] = {}
    items = modules.items() if modules is not None else (
        (fqn, m) for fqn, m in model.named_modules() if fqn and isinstance(m, PRUNABLE_TYPES)
    )
    tot_p = tot_nz = 0
    for fqn, m in items:
        w = effective_weight(m)
        numel, nnz = w.numel(), int((w != 0).sum())
        masked = is_masked(m)
        layers[fqn] = {
            "shape": list(w.shape), "params": numel, "nonzeros": nnz,
            "sparsity": 1.0 - nnz / numel if numel else 0.0, "masked": masked,
            "kernel": "2:4" if type(m.weight).__name__.startswith("SparseSemiStructured") else "dense",
        }
        if masked or layers[fqn]["kernel"] == "2:4":
            tot_p += numel
            tot_nz += nnz
    model_p = model_nz = 0
    for _, t in effective_parameters(model):
        model_p += t.numel()
        model_nz += int((t != 0).sum())
    return {
        "layers": layers,
        "total": {"params": tot_p, "nonzeros": tot_nz, "sparsity": 1.0 - tot_nz / tot_p if tot_p else 0.0},
        "model": {"params": model_p, "nonzeros": model_nz, "sparsity": 1.0 - model_nz / model_p if model_p else 0.0},
    }


def effective_parameters(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    """Every parameter of the model as the forward sees it (masked weights, not their originals)."""
    for mod_name, mod in model.named_modules():
        if ".parametrizations." in f".{mod_name}.":
            continue  # originals live here; the parametrized module yields the effective tensor instead
        params = dict(mod.named_parameters(recurse=False))
        if parametrize.is_parametrized(mod):
            for pname in mod.parametrizations.keys():
                yield f"{mod_name}.{pname}".lstrip("."), getattr(mod, pname)
        for pname, p in params.items():
            if pname == "weight" and isinstance(mod, PRUNABLE_TYPES):
                p = effective_weight(mod)
            yield f"{mod_name}.{pname}".lstrip("."), p
