"""One optimisation step, and the loss bookkeeping that keeps it free of host syncs.

The step is plain PyTorch: forward (the trainer's possibly-wrapped forward), per-sample loss, callbacks'
re-weighting, mean, backward (accumulated over micro-batches), clip, optimiser step. The loss is summed on the
device; whether it stayed finite is tracked on the device too (with the first bad step) and looked at only every
``train.finite_check_every`` steps and at the end of each epoch, so on CUDA no step waits for the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from timm.utils import dispatch_clip_grad
from torch import nn

from lotus.callbacks import Callback, Forward
from lotus.training.loss import per_sample_loss

__all__ = ["LossMeter", "Stepper"]


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

    def mean(self, world_size: int = 1) -> float:
        """The epoch's mean loss per sample (over every rank when ``world_size > 1``: a collective)."""
        if world_size <= 1:
            return float(self.loss_sum) / max(self.count, 1)
        total = torch.stack([self.loss_sum, torch.full_like(self.loss_sum, self.count)])
        dist.all_reduce(total)
        return float(total[0]) / max(float(total[1]), 1.0)


class Stepper:
    """Optimisation steps over micro-batches: ``accumulate`` micro-batches per optimiser step (the loss of
    each divided by ``accumulate``), clipping by norm / value / AGC (``timm.utils.dispatch_clip_grad``) and,
    for fp16, a ``torch.amp.GradScaler``. ``micro_step`` returns the detached mean loss of the micro-batch
    and whether the optimiser stepped."""

    def __init__(self, train_cfg: Any, device: torch.device, fp16: bool = False):
        self.cfg = train_cfg
        self.accumulate = int(train_cfg.accumulate_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=True) if fp16 else None
        self.micro = 0

    def start_epoch(self) -> None:
        self.micro = 0

    def micro_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        forward: Forward,
        callbacks: Sequence[Callback],
        trainer: Any,
        images: torch.Tensor,
        targets: torch.Tensor,
        index: torch.Tensor,
        autocast: Callable[[], Any],
        last: bool,
    ) -> tuple[torch.Tensor, bool]:
        c = self.cfg
        with autocast():
            logits = forward(model, images, index)
        loss_vec = per_sample_loss(logits, targets, c.loss, c.label_smoothing, c.bce_target_thresh)
        for cb in callbacks:
            loss_vec = cb.per_sample_loss(trainer, loss_vec, index)
        loss = loss_vec.mean()
        self.micro += 1
        scaled = loss / self.accumulate if self.accumulate > 1 else loss
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if self.micro % self.accumulate and not last:
            return loss.detach(), False
        for cb in callbacks:
            cb.on_after_backward(trainer)
        if c.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            dispatch_clip_grad(model.parameters(), c.grad_clip, mode=c.clip_mode)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), True

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
