"""Proxy training for scorers that need briefly trained models (``el2n``, ``forgetting``, ``grand``).

Proxy protocol (what :func:`data_tickets.score` expects as ``proxy=``)::

    proxy(seed: int, on_epoch_end: Callable[[nn.Module, int], None] | None = None) -> nn.Module

A proxy trains a *fresh* model (initialised from ``seed``) for a few epochs on the training set and returns
it. After every epoch it calls ``on_epoch_end(model, epoch)`` (epoch counted from 1); the callback may run
inference on the model (the proxy restores train mode itself). The same seed must give the same model.
A proxy may carry a ``config`` dict attribute describing it; it is recorded in ticket files.

:func:`make_proxy` builds one on plain PyTorch (this module); ``lotus.tickets.make_proxy`` builds one on the
lotus training loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._batches import _unpack, resolve_device, show_progress

__all__ = ["Proxy", "EpochCallback", "train_proxy", "make_proxy"]

EpochCallback = Callable[[nn.Module, int], None]


class Proxy(Protocol):
    def __call__(self, seed: int, on_epoch_end: EpochCallback | None = None) -> nn.Module: ...


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def train_proxy(
    model_fn: Callable[[], nn.Module],
    dataset: Dataset,
    epochs: int = 3,
    lr: float = 1e-3,
    *,
    batch_size: int = 128,
    weight_decay: float = 0.05,
    seed: int = 0,
    device: str | torch.device | None = None,
    on_epoch_end: EpochCallback | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
) -> nn.Module:
    """Train ``model_fn()`` for ``epochs`` with AdamW + cosine schedule and cross-entropy; return the model.

    Deterministic for a given ``seed`` (model init, shuffling). Meant for short proxy runs, not for
    final training (use ``lotus train`` for that).
    """
    if epochs < 0:
        raise ValueError(f"epochs: expected int >= 0, got {epochs}")
    gen = _seed_everything(seed)
    model = model_fn()
    dev = resolve_device(model, device)
    model.to(dev).train()
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers, drop_last=False
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, total) / total)))
    from tqdm.auto import tqdm

    bar = tqdm(total=epochs * len(loader), desc=f"proxy seed {seed}", leave=False, disable=not show_progress(progress))
    try:
        for epoch in range(1, epochs + 1):
            offset = 0
            for raw in loader:
                images, labels, _ = _unpack(raw, offset)
                offset += labels.numel()
                loss = F.cross_entropy(model(images.to(dev)), labels.to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(model, epoch)
                model.train()
    finally:
        bar.close()
    return model.eval()


def make_proxy(
    model_fn: Callable[[], nn.Module], dataset: Dataset, epochs: int = 3, lr: float = 1e-3, **train_kw: Any
) -> Proxy:
    """Wrap :func:`train_proxy` into a :class:`Proxy` callable (``config`` records its settings)."""

    def proxy(seed: int, on_epoch_end: EpochCallback | None = None) -> nn.Module:
        return train_proxy(model_fn, dataset, epochs, lr, seed=seed, on_epoch_end=on_epoch_end, **train_kw)

    proxy.config = {
        "trainer": "data_tickets.proxy.train_proxy",
        "epochs": epochs,
        "lr": lr,
        **{k: v for k, v in train_kw.items() if isinstance(v, (int, float, str, bool))},
        "model": getattr(model_fn, "__name__", type(model_fn).__name__),
    }
    return proxy
