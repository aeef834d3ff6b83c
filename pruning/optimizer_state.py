"""Carry optimizer state (Adam moments, SGD momentum) across structured thinning.

Thinning replaces parameter tensors with smaller ones, so the old optimizer's per-parameter state no longer
fits. Record the parameter names before pruning, then slice the state to the kept rows/columns::

    names = optimizer_param_names(optimizer, model)                  # BEFORE pruning
    report = prune_structured(model, cfg)
    new_opt = make_optimizer(model)                                  # same param-group layout as before
    new_opt.load_state_dict(slice_optimizer_state(optimizer, report["kept_indices"], names))
"""
from __future__ import annotations

import copy
from typing import Sequence, Union

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
