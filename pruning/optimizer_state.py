"""Carry optimizer state (Adam moments, SGD momentum, SOAP/Shampoo preconditioners) across structured thinning.

Thinning replaces parameter tensors with smaller ones, so the old optimizer's per-parameter state no longer
fits. Record the parameter names before pruning, then slice the state to the kept rows/columns::

    names = optimizer_param_names(optimizer, model)                  # BEFORE pruning
    report = prune_structured(model, cfg)
    new_opt = make_optimizer(model)                                  # same param-group layout as before
    new_opt.load_state_dict(slice_optimizer_state(optimizer, report["kept_indices"], names))

Kronecker-factored states (pytorch-optimizer's SOAP ``GG``/``Q``/``exp_avg_sq``, Shampoo ``pre_cond_<d>`` /
``inv_pre_cond_<d>``) are restricted to the kept coordinates of the thinned dimension: the factor of that
dimension keeps its kept rows and columns, SOAP's eigenbasis of it is recomputed from the restricted factor
(as SOAP does at its first step), and SOAP's second moment, which lives in that eigenbasis, keeps its scale
(the mean over the old basis) along it. The factors of the other dimensions are kept as they are. Shampoo's
restricted inverse root is an approximation until the optimiser recomputes it from ``pre_cond_<d>``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["optimizer_param_names", "slice_optimizer_state"]


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
                raise ValueError(
                    "optimizer holds a parameter that is not in the model; call "
                    "optimizer_param_names before pruning (old optimizer) or with the rebuilt one"
                )
            out.append(names[id(p)])
    return out


def slice_optimizer_state(
    optimizer_state: torch.optim.Optimizer | dict, kept_indices: dict, param_names: Sequence[str]
) -> dict:
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
        state[pid] = _slice_param_state(st, info, name)
    return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}


_FACTOR_KEY = re.compile(r"pre_cond_(\d+)$")


def _restrict(m: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return m.index_select(0, index).index_select(1, index)


def _eigenbasis(m: torch.Tensor) -> torch.Tensor:
    """SOAP's eigenbasis of one factor: eigenvectors by descending eigenvalue."""
    eye = torch.eye(m.shape[0], device=m.device, dtype=m.dtype)
    _, q = torch.linalg.eigh(m.to(torch.float64) + 1e-30 * eye.to(torch.float64))
    return torch.flip(q, dims=[1]).to(m.dtype)


def _slice_param_state(st: dict, info: dict, name: str) -> dict:
    old_shape, dim = tuple(info["old_shape"]), int(info["dim"])
    n = old_shape[dim]
    factored = isinstance(st.get("GG"), list) and isinstance(st.get("Q"), list) and len(st["GG"]) == len(old_shape)
    if isinstance(st.get("GG"), list) and not factored:  # e.g. SOAP with merge_dims: factors of merged shapes
        raise ValueError(
            f"optimizer state 'GG' of {name} has {len(st['GG'])} factors for a {len(old_shape)}-d "
            "parameter (merged dimensions?); cannot slice it"
        )
    out = {}
    for key, v in st.items():
        index = torch.as_tensor(info["index"], device=v.device if isinstance(v, torch.Tensor) else None)
        if factored and key in ("GG", "Q"):
            continue  # below, together
        if factored and key == "exp_avg_sq" and isinstance(st["GG"][dim], torch.Tensor):
            # SOAP: the second moment is in the eigenbasis of dim's factor, which changes: keep its scale
            shape = list(v.shape)
            shape[dim] = len(info["index"])
            out[key] = v.mean(dim=dim, keepdim=True).expand(shape).contiguous()
            continue
        factor = _FACTOR_KEY.search(key)  # Shampoo's pre_cond_<d> / inv_pre_cond_<d>: the factor of dim d
        if isinstance(v, torch.Tensor) and factor is not None and v.dim() == 2:
            if int(factor.group(1)) == dim:
                if tuple(v.shape) != (n, n):
                    raise ValueError(
                        f"optimizer state {key!r} of {name} has shape {tuple(v.shape)}, not ({n}, {n}); cannot slice it"
                    )
                v = _restrict(v, index)
        elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.numel() > 1:
            if tuple(v.shape) != old_shape:
                raise ValueError(
                    f"optimizer state {key!r} of {name} has shape {tuple(v.shape)}, not the "
                    f"parameter's {old_shape}; cannot slice it"
                )
            v = v.index_select(dim, index)
        out[key] = v
    if factored:
        gg, q = list(st["GG"]), list(st["Q"])
        if isinstance(gg[dim], torch.Tensor) and tuple(gg[dim].shape) == (n, n):
            index = torch.as_tensor(info["index"], device=gg[dim].device)
            gg[dim] = _restrict(gg[dim], index)
            q[dim] = _eigenbasis(gg[dim])
        out["GG"], out["Q"] = gg, q
    return out
