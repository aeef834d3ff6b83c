"""User-facing checks around the :mod:`pruning` library, shared by training (``pruning:``) and ``lotus prune``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lotus.errors import LotusError
from pruning.masks import select_modules

__all__ = ["check_nm_shapes"]


def _in_width(module: nn.Module) -> int:
    """The dimension N:M groups run along: a Linear's in_features, a Conv2d's in_channels x kernel area."""
    return int(module.weight[0].numel())


def check_nm_shapes(model: nn.Module, filter_fn: Callable | None, m: int, what: str) -> None:
    """Raise a LotusError when no layer that ``filter_fn`` selects has an input width divisible by ``m``.

    ``what`` names the setting, e.g. ``pruning.method: "2:4"`` or ``--method 2:4``. (Layers that do not
    divide are skipped by the library and listed in its report; only when none is left is it an error.)
    """
    widths = {fqn: _in_width(mod) for fqn, mod in select_modules(model, filter_fn).items()}
    if not widths or any(w % m == 0 for w in widths.values()):
        return
    fqn, width = next(iter(widths.items()))
    others = f" (no layer of the {len(widths)} it would prune has a multiple of {m})" if len(widths) > 1 else ""
    raise LotusError(f"{what} needs in_features divisible by {m}; {fqn} has {width}{others}")
