"""Slicing primitives for structured thinning: new ``nn.Linear`` / norm modules holding selected channels.

Modules are never resized in place: each helper builds a new module from the kept rows/columns, so the
original parameters (and any optimizer holding them) are left untouched. ``channel_index`` turns kept group
indices (heads, neurons) into the channel indices these helpers take.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import RmsNorm as TimmRmsNorm
from torch.nn.utils import parametrize, skip_init

__all__ = ["qualname", "check_linear", "sliced_linear", "norm_factory", "sliced_norm", "channel_index"]


def qualname(obj: object) -> str:
    """``module.QualName`` of ``obj``'s class, for error messages."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_linear(lin: nn.Module, where: str) -> nn.Linear:
    """``lin`` if it is a plain, unparametrized ``nn.Linear``; else a ``ValueError`` fragment naming ``where``."""
    if parametrize.is_parametrized(lin):
        raise ValueError(f"{where} with a parametrization (make pruning masks permanent first)")
    if type(lin) is not nn.Linear:
        raise ValueError(f"{where} ({qualname(lin)}, expected a plain torch.nn.Linear)")
    return lin


def sliced_linear(lin: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding the selected output rows / input columns of ``lin``."""
    with torch.no_grad():
        w = lin.weight
        if out_idx is not None:
            w = w.index_select(0, out_idx.to(w.device))
        if in_idx is not None:
            w = w.index_select(1, in_idx.to(w.device))
        b = lin.bias
        if b is not None and out_idx is not None:
            b = b.index_select(0, out_idx.to(b.device))
        elif b is not None:
            b = b.clone()
    new = skip_init(nn.Linear, w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)
    new.train(lin.training)
    return new


def norm_factory(norm: nn.Module, where: str = "inner norm") -> Callable[[int], nn.Module]:
    """Constructor of a same-type norm over ``n`` channels (only norms with a known signature)."""
    t = type(norm)
    has_w = getattr(norm, "weight", None) is not None
    has_b = getattr(norm, "bias", None) is not None
    dd = {}
    if has_w:
        dd = {"device": norm.weight.device, "dtype": norm.weight.dtype}
    if t is nn.LayerNorm:
        return lambda n: nn.LayerNorm(n, eps=norm.eps, elementwise_affine=norm.elementwise_affine, bias=has_b, **dd)
    if t is TimmLayerNorm:
        return lambda n: TimmLayerNorm(n, eps=norm.eps, affine=norm.elementwise_affine, bias=has_b, **dd)
    if t is TimmRmsNorm:
        return lambda n: TimmRmsNorm(n, eps=norm.eps, affine=norm.elementwise_affine, **dd)
    if t is nn.RMSNorm:
        return lambda n: nn.RMSNorm(n, eps=norm.eps, elementwise_affine=norm.elementwise_affine, **dd)
    raise ValueError(f"{where} ({qualname(norm)}; resizable norms: nn.LayerNorm, nn.RMSNorm, timm LayerNorm/RmsNorm)")


def sliced_norm(norm: nn.Module, idx: torch.Tensor) -> nn.Module:
    """A new norm of the same type over the channels ``idx`` of ``norm`` (Identity passes through)."""
    if isinstance(norm, nn.Identity):
        return norm
    new = norm_factory(norm)(int(idx.numel()))
    with torch.no_grad():
        for pname in ("weight", "bias"):
            src = getattr(norm, pname, None)
            if src is not None:
                dst = getattr(new, pname)
                dst.copy_(src.index_select(0, idx.to(src.device)))
                dst.requires_grad_(src.requires_grad)
    new.train(norm.training)
    return new


def channel_index(keep: torch.Tensor, num_groups: int, group_size: int, repeats: int) -> torch.Tensor:
    """Channel indices of the kept groups, for a dimension of ``repeats * num_groups * group_size``."""
    keep = keep.to(torch.long).cpu()
    inner = (keep[:, None] * group_size + torch.arange(group_size)[None, :]).reshape(-1)
    return torch.cat([r * num_groups * group_size + inner for r in range(repeats)])
