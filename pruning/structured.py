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

To keep fine-tuning with the optimizer state of the unpruned model (Adam moments etc.)::

    names = optimizer_param_names(optimizer, model)                  # BEFORE pruning
    report = prune_structured(model, cfg)
    new_opt = make_optimizer(model)                                  # same param-group layout as before
    new_opt.load_state_dict(slice_optimizer_state(optimizer, report["kept_indices"], names))
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .structured_units import (
    Coupled, ThinnedEvaAttention, Unit, find_blocks, group_reduce, register_attention,
)

__all__ = [
    "StructuredConfig",
    "prune_structured",
    "get_widths",
    "apply_widths",
    "head_importance",
    "neuron_importance",
    "optimizer_param_names",
    "slice_optimizer_state",
    "ThinnedEvaAttention",
    "register_attention",
]

Importance = Literal["magnitude", "activation", "taylor"]
LossFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
_IMPORTANCE = ("magnitude", "activation", "taylor")
_SCOPE = ("layer", "global")


@dataclass
class StructuredConfig:
    """What to remove and how to rank it.

    heads / mlp: fraction of attention heads / MLP hidden neurons to remove, in [0, 1).
    importance: ``magnitude`` (L2 of the group's weights; no data), ``activation`` (calibration L2 norm of the
        group's activations times the L2 norm of its output-projection columns) or ``taylor`` (first-order
        Taylor, sum of |w * dL/dw| over the group's weights, accumulated over calibration batches).
    scope: ``layer`` removes the fraction from every block; ``global`` ranks the groups of all blocks together
        by raw score (taylor estimates the loss change and activation the output contribution, both comparable
        across blocks), so blocks lose different amounts; each still keeps ``min_heads`` heads and at least
        ``round_to`` neurons.
    round_to: kept MLP widths (and kept ``heads * head_dim``, where head_dim allows) are multiples of this.
    min_heads: every block keeps at least this many heads.
    """
    heads: float = 0.0
    mlp: float = 0.0
    importance: Importance = "magnitude"
    scope: Literal["layer", "global"] = "layer"
    round_to: int = 1
    min_heads: int = 1

    def __post_init__(self) -> None:
        for name, what in (("heads", "head"), ("mlp", "MLP neuron")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"StructuredConfig.{name}: expected a fraction in [0, 1), got {v!r}")
            if v >= 1:
                raise ValueError(f"StructuredConfig.{name}: expected a fraction in [0, 1), got {v!r} "
                                 f"(that would remove every {what})")
            setattr(self, name, float(v))
        if self.importance not in _IMPORTANCE:
            raise ValueError(f"StructuredConfig.importance: expected one of {', '.join(_IMPORTANCE)}, "
                             f"got {self.importance!r}")
        if self.scope not in _SCOPE:
            raise ValueError(f"StructuredConfig.scope: expected one of {', '.join(_SCOPE)}, got {self.scope!r}")
        for name in ("round_to", "min_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"StructuredConfig.{name}: expected an int >= 1, got {v!r}")


# --------------------------------------------------------------------------------------------------------------
# calibration

def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _split_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Calibration batch -> (inputs, targets or None); accepts x, (x,), (x, y) and (x, y, index)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device), None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 else None
        if y is not None and not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        return batch[0].to(device), (y.to(device) if y is not None else None)
    raise ValueError(f"calib_loader: expected batches that are a tensor, (x, y) or (x, y, index), "
                     f"got {type(batch).__name__}")


def _calib_batches(calib_loader: Iterable, device: torch.device, max_batches: Optional[int]):
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


def _activation_scores(model: nn.Module, units: Sequence[Unit], calib_loader: Iterable,
                       max_batches: Optional[int]) -> dict[str, torch.Tensor]:
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
    out = {}
    for u in units:
        act = sumsq[u.name].reshape(u.num_groups, u.group_size).sum(1).sqrt()
        out[u.name] = act * _consumer_column_norms(u)
    return out


def _taylor_scores(model: nn.Module, units: Sequence[Unit], calib_loader: Iterable, loss_fn: Optional[LossFn],
                   max_batches: Optional[int]) -> dict[str, torch.Tensor]:
    entries: list[tuple[Unit, Coupled]] = [(u, c) for u in units for c in u.coupled() if c.is_param]
    params = [c.tensor for _, c in entries]
    for (u, c), p in zip(entries, params):
        if not p.is_leaf:
            raise ValueError(f"taylor importance needs plain weights; {u.name}.{c.path} is computed by a "
                             f"parametrization (make pruning masks permanent first)")
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
                        scores[u.name] += group_reduce((c.tensor.detach() * g).abs(), c, u.num_groups,
                                                       u.group_size)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return scores


def _scores(model: nn.Module, units: Sequence[Unit], importance: str, calib_loader: Optional[Iterable],
            loss_fn: Optional[LossFn], max_batches: Optional[int]) -> dict[str, torch.Tensor]:
    if importance not in _IMPORTANCE:
        raise ValueError(f"importance: expected one of {', '.join(_IMPORTANCE)}, got {importance!r}")
    if not units:
        return {}
    if importance == "magnitude":
        return _magnitude_scores(units)
    if calib_loader is None:
        raise ValueError(f"importance={importance!r} needs calibration data: pass calib_loader "
                         f"(or use importance='magnitude')")
    if importance == "activation":
        return _activation_scores(model, units, calib_loader, max_batches)
    return _taylor_scores(model, units, calib_loader, loss_fn, max_batches)


def head_importance(model: nn.Module, importance: Importance = "magnitude", calib_loader: Optional[Iterable] = None,
                    loss_fn: Optional[LossFn] = None, max_batches: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Score of every attention head, ``{block name: tensor[num_heads]}`` (higher = more important)."""
    blocks = find_blocks(model)
    units = [b.attn for b in blocks.values() if b.attn is not None]
    by_unit = _scores(model, units, importance, calib_loader, loss_fn, max_batches)
    return {b.name: by_unit[b.attn.name] for b in blocks.values() if b.attn is not None}


def neuron_importance(model: nn.Module, importance: Importance = "magnitude", calib_loader: Optional[Iterable] = None,
                      loss_fn: Optional[LossFn] = None, max_batches: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Score of every MLP hidden neuron, ``{block name: tensor[hidden]}`` (higher = more important)."""
    blocks = find_blocks(model)
    units = [b.mlp for b in blocks.values() if b.mlp is not None]
    by_unit = _scores(model, units, importance, calib_loader, loss_fn, max_batches)
    return {b.name: by_unit[b.mlp.name] for b in blocks.values() if b.mlp is not None}


# --------------------------------------------------------------------------------------------------------------
# selection

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


def _select(units: Sequence[Unit], scores: dict[str, torch.Tensor], ratio: float, scope: str, step: int,
            floor: int, field: str, what: str) -> dict[str, torch.Tensor]:
    """Kept group indices per unit (``ratio`` > 0), at least ``floor`` per unit, counts rounded to ``step``."""
    counts: dict[str, int] = {}
    if scope == "layer":
        for u in units:
            n = u.num_groups
            keep = n - _n_remove(ratio, n)
            if keep <= 0:
                raise ValueError(f"StructuredConfig.{field}={ratio:g} would remove all {n} {what}s of {u.name}")
            counts[u.name] = keep
    else:
        total = sum(u.num_groups for u in units)
        budget = _n_remove(ratio, total)
        if budget >= total:
            raise ValueError(f"StructuredConfig.{field}={ratio:g} would remove all {total} {what}s")
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


# --------------------------------------------------------------------------------------------------------------
# public API

def _check_thinnable(units: Sequence[Unit]) -> None:
    """One error naming every layer that cannot be sliced, before anything is changed."""
    problems = []
    for u in units:
        try:
            u.check_thinnable()
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("structured pruning does not support " + "; ".join(problems))


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per-block widths, ``{block: {"heads": num_heads, "mlp": hidden}}`` (JSON-serialisable).

    Saved next to a thinned model's weights, this is what :func:`apply_widths` needs to rebuild it.
    """
    out = {}
    for name, b in find_blocks(model).items():
        w = {}
        if b.attn is not None:
            w["heads"] = b.attn.num_groups
        if b.mlp is not None:
            w["mlp"] = b.mlp.num_groups
        out[name] = w
    return out


def apply_widths(model: nn.Module, widths: Union[dict, str]) -> nn.Module:
    """Shrink a freshly created model of the same timm architecture to ``widths`` (in place; returned).

    Keeps the first heads/neurons of each block: the values are meant to be overwritten by loading the thinned
    model's state dict, which then loads with ``strict=True``. ``widths`` is :func:`get_widths` output (or its
    JSON text).
    """
    if isinstance(widths, str):
        try:
            widths = json.loads(widths)
        except json.JSONDecodeError as e:
            raise ValueError(f"widths: not valid JSON ({e})") from None
    if not isinstance(widths, dict):
        raise ValueError(f"widths: expected a dict {{block: {{'heads': int, 'mlp': int}}}}, "
                         f"got {type(widths).__name__}")
    blocks = find_blocks(model)
    plan: list[tuple[Unit, int]] = []
    for bname, w in widths.items():
        if bname not in blocks:
            names = list(blocks)
            raise ValueError(f"widths: unknown block {bname!r} (model blocks: {names[0]} .. {names[-1]})")
        if not isinstance(w, dict):
            raise ValueError(f"widths[{bname!r}]: expected a dict with 'heads'/'mlp', got {type(w).__name__}")
        for key, v in w.items():
            unit = {"heads": blocks[bname].attn, "mlp": blocks[bname].mlp}.get(key, False)
            if unit is False:
                raise ValueError(f"widths[{bname!r}]: unknown key {key!r} (expected 'heads' or 'mlp')")
            if unit is None:
                raise ValueError(f"widths[{bname!r}][{key!r}]: block {bname} has no {key} module")
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= unit.num_groups:
                raise ValueError(f"widths[{bname!r}][{key!r}]: expected an int in [1, {unit.num_groups}], got {v!r}")
            plan.append((unit, v))
    _check_thinnable([u for u, v in plan if v < u.num_groups])
    for unit, v in plan:
        unit.thin(torch.arange(v))
    return model


def prune_structured(model: nn.Module, config: StructuredConfig, calib_loader: Optional[Iterable] = None,
                     loss_fn: Optional[LossFn] = None, *, max_batches: Optional[int] = None) -> dict:
    """Remove attention heads and MLP neurons from every timm ViT block of ``model``, in place.

    calib_loader: batches of ``x``, ``(x, y)`` or ``(x, y, index)``; needed for ``activation`` and ``taylor``
        importance (``max_batches`` caps how many are used). loss_fn: ``loss_fn(logits, y)`` for taylor
        (default cross-entropy; ``y`` is None for unlabelled batches).

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
                raise ValueError(f"StructuredConfig.min_heads={config.min_heads} exceeds the {u.num_groups} "
                                 f"heads of {u.name}")
    widths_before = get_widths(model)
    params_before = _count_params(model)

    units: list[Unit] = (attn_units if config.heads > 0 else []) + (mlp_units if config.mlp > 0 else [])
    _check_thinnable(units)
    scores = _scores(model, units, config.importance, calib_loader, loss_fn, max_batches) if units else {}

    keep: dict[str, torch.Tensor] = {}
    if config.heads > 0:
        steps = {_head_step(config.round_to, u.group_size) for u in attn_units}
        step = max(steps)
        keep.update(_select(attn_units, scores, config.heads, config.scope, step, config.min_heads,
                            "heads", "head"))
    if config.mlp > 0:
        keep.update(_select(mlp_units, scores, config.mlp, config.scope, config.round_to, config.round_to,
                            "mlp", "MLP neuron"))

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
        per_block[name] = {f"{k}_{when}": w[k] for k in before for when, w in (("before", before),
                                                                                 ("after", after))}
    return {
        "method": "structured",
        "config": asdict(config),
        "blocks": per_block,
        "widths": widths_after,
        "params_before": params_before,
        "params_after": _count_params(model),
        "kept": kept,
        "kept_indices": kept_indices,
    }


# --------------------------------------------------------------------------------------------------------------
# optimizer state

def optimizer_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """Names of ``optimizer``'s parameters in its flat param-group order (the keys of its state dict).

    Call it with the old optimizer *before* pruning (pruning replaces the parameter tensors), or with a new
    optimizer built over the pruned model; names do not change.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError("optimizer holds a parameter that is not in the model; call "
                                 "optimizer_param_names before pruning (old optimizer) or with the rebuilt one")
            out.append(names[id(p)])
    return out


def slice_optimizer_state(optimizer_state: Union[torch.optim.Optimizer, dict], kept_indices: dict,
                          param_names: Sequence[str]) -> dict:
    """Optimizer state dict with per-parameter state (e.g. Adam moments, SGD momentum) sliced to thinned shapes.

    optimizer_state: the old optimizer or its ``state_dict()``. kept_indices: ``report["kept_indices"]`` from
    :func:`prune_structured`. param_names: :func:`optimizer_param_names` of the old optimizer. The result loads
    into a new optimizer built over the pruned model with the same param-group layout. State tensors shaped
    like the parameter are sliced; scalars (``step``) are kept; other shapes (factored states) are an error.
    """
    sd = optimizer_state.state_dict() if isinstance(optimizer_state, torch.optim.Optimizer) else optimizer_state
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("optimizer_state: expected a torch optimizer or its state_dict()")
    ids = [pid for g in sd["param_groups"] for pid in g["params"]]
    if len(ids) != len(param_names):
        raise ValueError(f"param_names: optimizer has {len(ids)} parameters but {len(param_names)} names were given")
    state = {}
    for pid, name in zip(ids, param_names):
        st = sd["state"].get(pid)
        if st is None:
            continue
        info = kept_indices.get(name)
        if info is None:
            state[pid] = dict(st)
            continue
        old_shape = tuple(info["old_shape"])
        new_st = {}
        for key, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.numel() > 1:
                if tuple(v.shape) != old_shape:
                    raise ValueError(f"optimizer state {key!r} of {name} has shape {tuple(v.shape)}, not the "
                                     f"parameter's {old_shape}; cannot slice it")
                v = v.index_select(info["dim"], torch.as_tensor(info["index"], device=v.device))
            new_st[key] = v
        state[pid] = new_st
    return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}
