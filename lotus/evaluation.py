"""One evaluation loop for the whole project: top-1/top-5 accuracy and mean cross-entropy of a classifier.

Used by the Trainer (validation every epoch), ``lotus prune`` (before/after accuracy), ``lotus quantcheck``
and the benchmarks. Sums stay on the device (one host sync at the end); under ``torch.distributed`` each
rank evaluates its stripe of the dataset and the sums are all-reduced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lotus.data import batches

__all__ = ["evaluate"]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    num_workers: int = 0,
    limit: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """``{"val_loss", "val_acc", "val_acc5", "count"}`` of ``model`` on ``dataset`` (items ``(image, label[, index])``).

    ``val_acc5``: top-5 accuracy (top-k with k = min(5, classes)). ``num_classes``: also ``class_correct`` and
    ``class_count``, per-class lists of top-1 hits and samples.

    ``limit``: only the first ``limit`` samples. ``world_size > 1``: every rank runs the same number of
    batches (FSDP2 forwards are collective; the last stripe is padded with repeats that are masked out) and
    the sums are all-reduced. ``forward(model, images)`` replaces ``model(images)`` (e.g. a quantised model).
    The model's train/eval mode is restored afterwards.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    pos = np.arange(n + (-n) % world_size)[rank::world_size]
    idx = pos % max(n, 1)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, count, top-5 correct
    per_class = torch.zeros(2, num_classes or 0, dtype=torch.float64, device=device)  # correct, count
    offset = 0
    it = batches(dataset, idx, batch_size, num_workers, pin_memory=device.type == "cuda")
    if progress:
        it = tqdm(it, total=-(-len(idx) // batch_size), desc="eval", leave=False, dynamic_ncols=True)
    try:
        for x, y, _ in it:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits = model(x) if forward is None else forward(model, x)
            valid = torch.as_tensor(pos[offset : offset + len(y)] < n, device=device)
            offset += len(y)
            loss = (F.cross_entropy(logits.float(), y, reduction="none") * valid).sum()
            hit = (logits.argmax(-1) == y) & valid
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hit5 = ((top5 == y[:, None]).any(-1) & valid).sum()
            sums += torch.stack([loss.double(), hit.sum().double(), valid.sum().double(), hit5.double()])
            if num_classes:
                per_class[0].index_add_(0, y, hit.double())
                per_class[1].index_add_(0, y, valid.double())
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)
        if num_classes:
            dist.all_reduce(per_class)
    loss_sum, correct, count, correct5 = sums.cpu().tolist()
    count = max(count, 1.0)
    out: dict[str, Any] = {
        "val_loss": loss_sum / count,
        "val_acc": correct / count,
        "val_acc5": correct5 / count,
        "count": int(count),
    }
    if num_classes:
        hits, counts = per_class.cpu().tolist()
        out.update(class_correct=[int(h) for h in hits], class_count=[int(c) for c in counts])
    return out
