"""The in-memory data sets: scikit-learn's digits, MNIST / Fashion-MNIST from idx files (:mod:`lotus.data_idx`),
CIFAR through torchvision, and the seeded class-stratified splits (validation held out of the training images,
``data.limit_train``). Each source returns float images in [0, 1] as ``[N, C, H, W]`` and integer labels."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lotus.data_idx import IDX_DATASETS, find_idx_files, read_idx
from lotus.errors import LotusError

__all__ = ["stratified_split", "digits", "official_splits", "holdout"]


def stratified_split(
    labels: np.ndarray, val_fraction: float | None, seed: int, train_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified seeded split: ``val_fraction`` of the samples to val, or exactly ``train_size`` to train."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    kw = {"train_size": train_size} if train_size is not None else {"test_size": val_fraction}
    try:
        tr, va = train_test_split(idx, random_state=seed, stratify=labels, **kw)
    except ValueError:  # a class too small to stratify: plain seeded split
        tr, va = train_test_split(idx, random_state=seed, **kw)
    return np.sort(tr), np.sort(va)


def digits(cfg: Any):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(d.target)
    tr, va = stratified_split(d.target, cfg.val_fraction, cfg.split_seed)
    return images[tr], labels[tr], images[va], labels[va], [str(c) for c in d.target_names]


_TV = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _as_chw(data: Any) -> torch.Tensor:
    data = torch.as_tensor(np.asarray(data))
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    return images.float().div_(255.0)


def _idx(cfg: Any) -> tuple | None:
    """MNIST / Fashion-MNIST from idx files under ``data.root`` (Debian's or torchvision's layout), or None."""
    files = find_idx_files(cfg.root, cfg.name)
    if files is None:
        return None
    out = []
    for train in (True, False):
        try:
            images, labels = (read_idx(p) for p in files[train])
        except ValueError as e:
            raise LotusError(f"data.root: {e}") from None
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise LotusError(
                f"data.root: {files[train][0]}: expected N images of HxW and N labels, got shapes "
                f"{images.shape} and {labels.shape}"
            )
        out += [_as_chw(images), torch.as_tensor(labels.astype(np.int64))]
    return (*out, IDX_DATASETS[cfg.name][1])


def official_splits(cfg: Any):
    """(train images, labels, test images, labels, classes): idx files on disk first, else torchvision."""
    if cfg.name in IDX_DATASETS and not cfg.download:
        found = _idx(cfg)
        if found is not None:
            return found
        raise LotusError(
            f"data.root: {cfg.name} idx files not found under {cfg.root!r} (neither "
            f"train-images-idx3-ubyte[.gz] there nor in {IDX_DATASETS[cfg.name][0]}/raw/); "
            f"{IDX_DATASETS[cfg.name][2]}"
        )
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TV[cfg.name])
    sets = []
    for train in (True, False):
        try:
            ds = cls(cfg.root, train=train, download=cfg.download)
        except RuntimeError as e:
            if cfg.download:
                raise LotusError(f"data: cannot download {cfg.name} into {cfg.root} ({e})") from None
            raise LotusError(
                f"data.root: {cfg.name} not found under {cfg.root!r}; set data.download: true to download it "
                "or point data.root at a folder that has it"
            ) from None
        except OSError as e:
            raise LotusError(f"data: cannot download {cfg.name} into {cfg.root} ({e})") from None
        sets.append((_as_chw(ds.data), torch.as_tensor(np.asarray(ds.targets))))
    (xtr, ytr), (xte, yte) = sets
    return xtr, ytr, xte, yte, [str(c) for c in ds.classes]


def holdout(cfg: Any, xtr: torch.Tensor, ytr: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``data.val_size`` class-stratified training images (``split_seed``) as the validation split; at most
    a fifth of the training split, so tiny files still keep most of it for training."""
    n_val = min(cfg.val_size, len(ytr) // 5)
    if n_val < 1:
        raise LotusError(f"data: {cfg.name} has {len(ytr)} training images, too few to hold out a validation split")
    tr, va = stratified_split(ytr.numpy(), None, cfg.split_seed, train_size=len(ytr) - n_val)
    return xtr[tr], ytr[tr], xtr[va], ytr[va]
