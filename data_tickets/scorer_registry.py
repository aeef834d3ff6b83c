"""The scorer registry: what a scorer gets (:class:`ScoreContext`), what it declares (:class:`Scorer`), the
registry :data:`SCORERS` filled by :func:`register_scorer`, and :func:`mean_over` (a per-sample statistic averaged
over the context's models). Scorer modules (:mod:`data_tickets.scorers`, :mod:`data_tickets.scorers_grand`)
import this one, so adding a scorer touches no other module's code."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from ._batches import Batch, map_batches
from .proxy import Proxy

__all__ = ["ScoreContext", "Scorer", "SCORERS", "register_scorer", "mean_over"]


@dataclass
class ScoreContext:
    """What a scorer function receives besides its own keyword options."""

    model: nn.Module | None
    dataset: Dataset
    proxy: Proxy | None
    batch_size: int
    device: torch.device | str | None
    num_workers: int
    progress: bool | None
    seed: int
    name: str

    def map(
        self,
        model: nn.Module,
        fn: Callable[[nn.Module, Batch], torch.Tensor],
        *,
        grad: bool = False,
        batch_size: int | None = None,
        desc: str | None = None,
    ) -> torch.Tensor:
        return map_batches(
            model,
            self.dataset,
            fn,
            batch_size=batch_size or self.batch_size,
            device=self.device,
            num_workers=self.num_workers,
            progress=self.progress,
            desc=desc or self.name,
            grad=grad,
        )

    def models(self, repeats: int) -> Iterator[nn.Module]:
        """``repeats`` proxy-trained models, or the given model once."""
        if repeats < 1:
            raise ValueError(f"repeats: expected int >= 1, got {repeats}")
        if self.proxy is None:
            if self.model is None:
                raise ValueError(f"scorer '{self.name}': pass a model or a proxy= trainer")
            if repeats != 1:
                raise ValueError(
                    f"scorer '{self.name}': repeats={repeats} needs proxy= (a trainer for fresh "
                    "models); with a fixed model use repeats=1"
                )
            yield self.model
            return
        for k in range(repeats):
            m = self.proxy(self.seed + k, None)
            if self.device is not None:
                m.to(self.device)
            yield m


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[..., torch.Tensor]
    needs_labels: bool
    needs_proxy: bool
    description: str

    def options(self) -> list[str]:
        return [p for p in inspect.signature(self.fn).parameters if p != "ctx"]


SCORERS: dict[str, Scorer] = {}


def register_scorer(
    name: str, *, needs_labels: bool = True, needs_proxy: bool = False, description: str | None = None
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator registering ``fn(ctx: ScoreContext, **options) -> Tensor[len(dataset)]`` under ``name``.

    Convention: higher score = more informative. Re-registering a name replaces the scorer.
    """

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        SCORERS[name] = Scorer(name, fn, needs_labels, needs_proxy, doc)
        return fn

    return deco


def mean_over(ctx: ScoreContext, repeats: int, fn: Callable[[nn.Module, Batch], torch.Tensor]) -> torch.Tensor:
    total = None
    for k, m in enumerate(ctx.models(repeats)):
        s = ctx.map(m, fn, desc=f"{ctx.name} {k + 1}/{repeats}" if repeats > 1 else ctx.name)
        total = s if total is None else total + s
    return total / repeats
