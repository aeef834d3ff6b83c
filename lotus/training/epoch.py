"""One training epoch of the :class:`~lotus.training.trainer.Trainer`: the sample order, the step loop (batch
hooks, FLOPs of the epoch's first batch, thread tuning, finite-loss checks, step records) and the epoch record.
Functions of the trainer, so the trainer module keeps set-up, the epoch sequence and its services."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from lotus.data import batches
from lotus.errors import LotusError
from lotus.training.step import LossMeter

__all__ = ["epoch_order", "forward_flops", "check_finite", "observe_threads", "train_epoch"]


def epoch_order(trainer: Any, epoch: int) -> np.ndarray:
    """The epoch's sample order: the sampler's, else a seeded shuffle of the subset; striped across ranks."""
    if trainer.sampler is not None:
        if hasattr(trainer.sampler, "set_epoch"):
            trainer.sampler.set_epoch(epoch)
        order = np.fromiter((int(i) for i in trainer.sampler), dtype=np.int64)
    else:
        base = (
            np.arange(len(trainer.train_set)) if trainer.subset is None else np.asarray(trainer.subset, dtype=np.int64)
        )
        g = torch.Generator().manual_seed(trainer.cfg.train.seed * 100003 + epoch)
        order = base[torch.randperm(len(base), generator=g).numpy()]
    if trainer.dist.world_size > 1:  # pad to a multiple of world size, then stripe across ranks
        w = trainer.dist.world_size
        pad = (-len(order)) % w
        if pad:
            order = np.concatenate([order, order[:pad]])
        order = order[trainer.dist.rank :: w]
    return order


def forward_flops(trainer: Any, images: torch.Tensor, index: torch.Tensor) -> float:
    """Forward FLOPs per sample of the current training forward (x3 for forward+backward)."""
    n = min(2, len(images))
    was = trainer.model.training
    trainer.model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            trainer.forward(trainer.model, images[:n], index[:n])
        return fc.get_total_flops() / n
    except Exception:  # noqa: BLE001 - FLOP counting is informational only
        return float("nan")
    finally:
        trainer.model.train(was)


def observe_threads(trainer: Any, step_seconds: float | None = None) -> None:
    """``train.threads: auto`` on the real steps (no probe copies): before a step (``step_seconds`` None) set the
    tuner's count, after an optimiser step feed its host wall time; log ``threads_tuned`` when a tune settles."""
    tuner = trainer.thread_tuner
    if tuner.apply() if step_seconds is None else tuner.observe(step_seconds):
        trainer.log("threads_tuned", **tuner.describe())


def check_finite(trainer: Any, meter: LossMeter, epoch: int) -> None:
    """Stop with a one-line error at the first non-finite loss (one host sync; collective under torchrun)."""
    bad = meter.first_non_finite(trainer.dist.world_size)  # every rank checks at the same steps
    if bad is not None:
        step, value = bad
        kept = (
            f"the last good checkpoint is kept in {trainer.run_dir}"
            if os.path.isfile(trainer.checkpoints.state_path)
            else "no checkpoint was written yet"
        )
        raise LotusError(
            f"train: loss became {value} at step {step} (epoch {epoch + 1}); stopped, {kept} "
            "(try a lower optim.lr or train.grad_clip)"
        )


def train_epoch(trainer: Any, epoch: int, steps_cap: int | None) -> dict:
    """One epoch of optimisation steps; the epoch record (loss, throughput, samples and FLOPs so far)."""
    cfg = trainer.cfg
    order = epoch_order(trainer, epoch)
    bs = cfg.data.batch_size
    n_batches = max(1, math.ceil(len(order) / bs))
    trainer.steps_per_epoch = math.ceil(n_batches / cfg.train.accumulate_steps)  # optimiser steps
    trainer.stepper.start_epoch()
    log_every = cfg.train.log_every_n_steps
    trainer.model.train()
    meter = LossMeter(trainer.device)
    check_every = cfg.train.finite_check_every
    epoch_flops = None
    tuner = trainer.thread_tuner
    step_s = 0.0  # host seconds of the current optimiser step's micro-steps
    t0 = time.perf_counter()
    if hasattr(trainer.loop_set, "set_epoch"):  # per-sample transform seeds from (seed, epoch, index)
        trainer.loop_set.set_epoch(epoch)
    loader = batches(trainer.loop_set, order, bs, cfg.data.num_workers, pin_memory=trainer.device.type == "cuda")
    it = trainer.run_log.progress(loader, n_batches, f"epoch {epoch + 1}/{cfg.train.epochs}")
    for b, (x, y, idx) in enumerate(it):
        if steps_cap is not None and trainer.step >= steps_cap:
            break
        x, y = x.to(trainer.device, non_blocking=True), y.to(trainer.device, non_blocking=True)
        if trainer.augment.active:
            x = trainer.augment(x)
        for cb in trainer.callbacks:
            x, y, idx = cb.transform_batch(trainer, x, y, idx)
        if epoch_flops is None:
            epoch_flops = forward_flops(trainer, x, idx)
        trainer.scheduler.set_position(epoch + b / n_batches)
        if tuner is not None:
            observe_threads(trainer)  # the count changes only between optimiser steps
        t_step = time.perf_counter()
        loss, stepped = trainer.stepper.micro_step(
            trainer.model,
            trainer.optimizer,
            trainer.forward,
            trainer.callbacks,
            trainer,
            x,
            y,
            idx,
            trainer.autocast,
            last=b + 1 == n_batches,
        )
        step_s += time.perf_counter() - t_step
        meter.add(loss, len(y), trainer.step + 1)
        if not stepped:
            continue
        trainer.step += 1
        if tuner is not None:
            observe_threads(trainer, step_s)
        step_s = 0.0
        if trainer.step % check_every == 0:
            check_finite(trainer, meter, epoch)
        if log_every and trainer.step % log_every == 0:  # one host sync per record
            trainer.run_log.record(
                {
                    "type": "step",
                    "epoch": epoch + 1,
                    "step": trainer.step,
                    "loss": float(loss),
                    "lr": trainer.optimizer.param_groups[0]["lr"],
                    "throughput": round(meter.count * trainer.dist.world_size / max(time.perf_counter() - t0, 1e-9), 2),
                }
            )
        for cb in trainer.callbacks:
            cb.on_step_end(trainer, trainer.step)  # may replace trainer.model / trainer.optimizer
    check_finite(trainer, meter, epoch)
    dt = time.perf_counter() - t0
    seen_all = meter.count * trainer.dist.world_size
    trainer.samples_seen += seen_all
    flops = (epoch_flops or 0.0) * 3 * seen_all
    if not math.isnan(flops):
        trainer.train_flops += flops
    return {
        "type": "epoch",
        "epoch": epoch + 1,
        "step": trainer.step,
        "samples_seen": trainer.samples_seen,
        "train_loss": meter.mean(trainer.dist.world_size),
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "throughput": round(seen_all / dt, 2) if dt > 0 else None,
        "epoch_samples": seen_all,
        "train_flops": trainer.train_flops,
    }
