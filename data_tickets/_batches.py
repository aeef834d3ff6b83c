"""Batched iteration over index-carrying datasets (internal).

Lotus datasets yield ``(image, label, index)`` where ``index`` is the item's position in the dataset.
Plain ``(image, label)`` datasets are accepted too: the running position is used as the index.
Everything in :mod:`data_tickets` that walks a dataset goes through :func:`iter_batches`, so scores
always land at the right dataset index whatever the loader order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

__all__ = ["Batch", "iter_batches", "resolve_device", "show_progress", "map_batches", "dataset_labels"]


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor  # dataset positions, int64, on CPU


def show_progress(progress: bool | None) -> bool:
    """``None`` means: show a bar only when stderr is an interactive terminal."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def resolve_device(model: nn.Module | None, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if model is not None:
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _unpack(batch, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        raise ValueError("dataset items must be (image, label, index) or (image, label) tuples, got a dict")
    if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
        got = type(batch).__name__ if not isinstance(batch, (list, tuple)) else f"a {len(batch)}-tuple"
        raise ValueError(f"dataset items must be (image, label, index) or (image, label) tuples, got {got}")
    images, labels = batch[0], batch[1]
    labels = torch.as_tensor(labels).long().reshape(-1)
    if len(batch) == 3:
        index = torch.as_tensor(batch[2]).long().reshape(-1).cpu()
    else:
        index = torch.arange(offset, offset + labels.numel(), dtype=torch.long)
    return images, labels, index


def iter_batches(
    dataset: Dataset,
    batch_size: int = 256,
    *,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool | None = None,
    desc: str = "scoring",
) -> Iterator[Batch]:
    """Yield :class:`Batch` es in dataset order (no shuffling, no dropped samples).

    Datasets with a ``get_batch(index: LongTensor) -> (images, labels, index)`` method are sliced a batch
    at a time (no per-item Python work); others go through a ``DataLoader``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected int >= 1, got {batch_size}")
    n = len(dataset)
    if callable(getattr(dataset, "get_batch", None)):
        # in-memory datasets that slice a whole batch at once (e.g. lotus TensorImageDataset)
        loader = (dataset.get_batch(torch.arange(s, min(s + batch_size, n))) for s in range(0, n, batch_size))
    else:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=torch.device(device).type == "cuda",
        )
    offset = 0
    with tqdm(total=n, desc=desc, unit="img", disable=not show_progress(progress), leave=False) as bar:
        for raw in loader:
            images, labels, index = _unpack(raw, offset)
            offset += labels.numel()
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
                bad = int(index.max()) if int(index.max()) >= n else int(index.min())
                raise ValueError(
                    f"dataset item index {bad} is out of range for a dataset of {n} items; the third item "
                    "element must be the item's position in this dataset (re-index Subset datasets)"
                )
            yield Batch(images.to(device, non_blocking=True), labels.to(device, non_blocking=True), index)
            bar.update(labels.numel())


def map_batches(
    model: nn.Module,
    dataset: Dataset,
    fn: Callable[[nn.Module, Batch], torch.Tensor],
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
    desc: str = "scoring",
    grad: bool = False,
) -> torch.Tensor:
    """Run ``fn(model, batch) -> per-sample values [B, ...]`` over the dataset in eval mode.

    Returns a CPU float tensor ``[len(dataset), ...]`` whose row ``i`` belongs to dataset index ``i``.
    Runs under :func:`torch.inference_mode` unless ``grad=True``. The model's train/eval mode is restored.
    """
    dev = resolve_device(model, device)
    n = len(dataset)
    out: torch.Tensor | None = None
    seen = torch.zeros(n, dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        ctx = torch.enable_grad() if grad else torch.inference_mode()
        with ctx:
            for batch in iter_batches(
                dataset, batch_size, device=dev, num_workers=num_workers, progress=progress, desc=desc
            ):
                vals = fn(model, batch).detach().float().cpu()
                if out is None:
                    out = torch.zeros((n, *vals.shape[1:]), dtype=torch.float32)
                out[batch.index] = vals
                seen[batch.index] = True
    finally:
        model.train(was_training)
    if out is None:
        raise ValueError("dataset is empty: nothing to score")
    if not bool(seen.all()):
        missing = int((~seen).nonzero()[0])
        raise ValueError(f"dataset index {missing} was never produced by the dataset (duplicate item indices?)")
    return out


def dataset_labels(dataset: Dataset, batch_size: int = 256, num_workers: int = 0) -> torch.Tensor:
    """Labels aligned with dataset indices (uses ``dataset.targets``/``labels`` when present)."""
    for attr in ("labels", "targets"):
        lab = getattr(dataset, attr, None)
        if lab is not None and not callable(lab):
            t = torch.as_tensor(lab).long().reshape(-1)
            if t.numel() == len(dataset):
                return t
    n = len(dataset)
    out = torch.full((n,), -1, dtype=torch.long)
    for b in iter_batches(dataset, batch_size, num_workers=num_workers, progress=False, desc="labels"):
        out[b.index] = b.labels.cpu()
    return out
