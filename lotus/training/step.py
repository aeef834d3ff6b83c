"""One optimisation step, and the loss bookkeeping that keeps it free of host syncs.

The step is plain PyTorch: forward (the trainer's possibly-wrapped forward), per-sample loss, callbacks'
re-weighting, mean, backward, clip, optimiser step. The loss is summed on the device; whether it stayed
finite is tracked on the device too (with the first bad step) and looked at only every
``train.finite_check_every`` steps and at the end of each epoch, so on CUDA no step waits for the host.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lotus.callbacks import Callback, Forward

__all__ = ["LossMeter", "train_step"]


class LossMeter:
    """Device-side running sums of one epoch's loss, and the first step whose loss was not finite."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.bad_value = torch.zeros((), dtype=torch.float32, device=self.device)

    def add(self, loss: torch.Tensor, n: int, step: int) -> None:
        """Record the mean loss of a batch of ``n`` samples taken at optimizer step ``step`` (no sync)."""
        loss = loss.detach()
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_value = torch.where(bad, loss.float(), self.bad_value)
        self.loss_sum += loss.double() * n
        self.count += n

    def first_non_finite(self, world_size: int = 1) -> tuple[int, float] | None:
        """``(step, loss)`` of the first non-finite loss on any rank, or ``None`` (one host sync; collective
        when ``world_size > 1``, so every rank must call it at the same step)."""
        step = self.first_bad.clone()
        if world_size > 1:
            flag = torch.where(step < 0, torch.full_like(step, torch.iinfo(torch.int64).max), step)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            step = torch.where(flag == torch.iinfo(torch.int64).max, torch.full_like(step, -1), flag)
        s = int(step)
        return None if s < 0 else (s, float(self.bad_value))

    def mean(self) -> float:
        return float(self.loss_sum) / max(self.count, 1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, forward: Forward, callbacks: Sequence[Callback],
               trainer: Any, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
               autocast: Callable[[], Any], label_smoothing: float = 0.0,
               grad_clip: float | None = None) -> torch.Tensor:
    """Forward, loss, backward and optimiser step on one batch; returns the (detached) mean loss."""
    with autocast():
        logits = forward(model, images, index)
    loss_vec = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=label_smoothing)
    for cb in callbacks:
        loss_vec = cb.per_sample_loss(trainer, loss_vec, index)
    loss = loss_vec.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for cb in callbacks:
        cb.on_after_backward(trainer)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()
