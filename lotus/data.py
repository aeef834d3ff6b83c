"""Datasets for training: digits (embedded), MNIST/Fashion-MNIST (idx files), CIFAR (torchvision), ImageFolder.

Every item is ``(image, label, index)`` where ``index`` is the sample's position in its dataset, so
data tickets and dynamic pruning can address samples. In-memory datasets keep images at their native
resolution and resize per batch, so a 224 px model on CIFAR does not need 30 GB of RAM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lotus.augment import Augmenter
from lotus.data_cache import Decoded, NativeSize, decoded, from_worker, pil_to_chw
from lotus.data_sources import digits, holdout, official_splits, stratified_split
from lotus.data_transforms import SeededTransformDataset, build_transform, resolve_mean_std, timm_data_config
from lotus.data_transforms import uses_pretrained_norm as _pretrained_norm
from lotus.errors import LotusError, RankError

__all__ = ["TensorImageDataset", "DataBundle", "build_datasets", "batches", "Augmenter", "describe"]


def _fit_channels(x: torch.Tensor, chans: int) -> torch.Tensor:
    c = x.shape[-3]
    if c == chans:
        return x
    if c == 1:
        return x.expand(*x.shape[:-3], chans, *x.shape[-2:])
    if chans == 1:
        return x.mean(dim=-3, keepdim=True)
    raise LotusError(f"data: cannot convert {c}-channel images to {chans} channels (set model.in_chans)")


class TensorImageDataset(Dataset):
    """Images held in memory as a float tensor [N, C, h, w] in [0, 1] (or uint8 in [0, 255]); resized and
    normalised on access."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        img_size: int,
        chans: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        classes: list[str],
    ):
        self.images, self.labels = images, labels.long()
        self.img_size, self.chans = img_size, chans
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Raw batch [B, C, h, w] in [0,1] (or uint8) -> model input [B, chans, img, img], normalised."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        x = _fit_channels(x, self.chans)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def get_batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.prepare(self.images[index]), self.labels[index], index

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x = self.prepare(self.images[i : i + 1])[0]
        return x, int(self.labels[i]), int(i)


class _FolderDataset(Dataset):
    """torchvision ImageFolder that returns (image, label, index)."""

    def __init__(self, folder: Any, img_size: int, chans: int, mean: list[float], std: list[float]):
        from torchvision import transforms as T

        self.folder, self.classes = folder, folder.classes
        self.labels = torch.tensor(folder.targets, dtype=torch.long)
        self.mode = "L" if chans == 1 else "RGB"
        self.resize = T.Resize((img_size, img_size), antialias=True)
        self.transform = T.Compose([self.resize, T.ToTensor(), T.Normalize(mean, std)])

    def pil(self, i: int) -> tuple[Any, int]:
        """Sample ``i`` decoded, in the model's colour mode, and its label."""
        path, label = self.folder.samples[i]
        return load_image(path, self.folder.loader).convert(self.mode), int(label)

    def load_size(self, i: int) -> np.ndarray:
        """Sample ``i`` resized to the load size (what every epoch would resize it to), uint8 [C, H, W]."""
        return pil_to_chw(self.resize(self.pil(i)[0]))

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.pil(i)
        return self.transform(image), label, int(i)


def load_image(path: str, loader: Any) -> Any:
    """``loader(path)`` (PIL open + decode), with a decode failure as a one-line error naming the file."""
    try:
        return loader(path)
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib.error, ... on bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankError(f"data.root: {path}: not a readable image ({reason}); remove or replace the file") from None


@dataclass
class DataBundle:
    """Train and validation datasets plus what the model needs to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    labels_train: np.ndarray
    classes: list[str]
    train_aug: Dataset | None = None  # the training loop's view (timm's random transform); None: ``train``
    test: Dataset | None = None  # the official test split (mnist, fashion_mnist, cifar): reported, never chooses
    source_size: tuple[int, int] | None = None  # (h, w) of the stored images (a folder: its first image)


def _stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean, std


def _imagefolder(cfg: Any, img_size: int, chans: int | None, model_cfg: Any):
    from lotus.data_folder import image_folder  # torchvision; symlink loops and unreadable folders named

    out = []
    for split in ("train", "val"):
        path = os.path.join(cfg.root, split)
        if not os.path.isdir(path):
            raise LotusError(f"data.root: expected class folders in {path} (imagefolder needs train/ and val/)")
        try:
            folder = image_folder(path)
        except (FileNotFoundError, RuntimeError) as e:
            raise LotusError(f"data.root: {path}: {str(e).splitlines()[0]}") from None
        out.append(folder)
    train, val = out
    if train.classes != val.classes:
        raise LotusError(f"data.root: train/ and val/ in {cfg.root} have different class folders")
    if chans is None:
        from PIL import Image

        first = train.samples[0][0]
        with load_image(first, Image.open) as im:
            chans = 1 if im.mode in ("L", "1", "I", "I;16", "F") else 3
    mean, std = _norm(cfg, model_cfg, chans, ([0.5] * chans, [0.5] * chans))  # no dataset pass: 0.5 unless set
    return (
        _FolderDataset(train, img_size, chans, mean, std),
        _FolderDataset(val, img_size, chans, mean, std),
        train.classes,
        chans,
        mean,
        std,
    )


def _norm(cfg: Any, model_cfg: Any, chans: int, stats: tuple) -> tuple:
    """Normalisation of the inputs: none (``data.normalize: false``), else :func:`resolve_mean_std`."""
    if not cfg.normalize:
        return [0.0] * chans, [1.0] * chans
    return resolve_mean_std(getattr(cfg, "transform", None), model_cfg, chans, stats)


def _cache_folder(cfg: Any, ds: _FolderDataset, mean: list[float], std: list[float]) -> Any:
    """The tensor path's cache: images at the load size in one uint8 tensor, sliced a batch at a time."""
    images = torch.stack(decoded(len(ds), ds.load_size, cfg.num_workers, ds.folder.root))
    return TensorImageDataset(
        images, ds.labels, images.shape[-1], images.shape[1], torch.tensor(mean), torch.tensor(std), ds.classes
    )


def _timm_views(
    cfg: Any,
    model_cfg: Any,
    img_size: int,
    chans: int,
    mean: list,
    std: list,
    seed: int,
    sources: list[tuple[Any, int, torch.Tensor]],
    classes: list[str],
) -> tuple[Dataset, ...]:
    """``data.transform``: (train with timm's random transform, train with its eval transform, then each
    further source (val, test) with the eval transform)."""
    tcfg = cfg.transform
    dcfg = timm_data_config(tcfg, model_cfg, img_size, chans, mean, std)
    train_tf, eval_tf = build_transform(tcfg, dcfg, True), build_transform(tcfg, dcfg, False)
    (tr_load, tr_n, tr_labels), *rest = sources
    return (
        SeededTransformDataset(tr_load, tr_n, train_tf, tr_labels, classes, seed=seed),
        SeededTransformDataset(tr_load, tr_n, eval_tf, tr_labels, classes),
        *(SeededTransformDataset(load, n, eval_tf, lab, classes) for load, n, lab in rest),
    )


def _folder_source(cfg: Any, ds: _FolderDataset) -> tuple[Any, int, torch.Tensor]:
    if getattr(cfg, "cache", "none") != "memory":
        return ds.pil, len(ds), ds.labels
    arrays = decoded(len(ds), NativeSize(ds), cfg.num_workers, ds.folder.root)
    return Decoded(arrays, ds.labels, ds.mode), len(ds), ds.labels


def _tensor_source(images: torch.Tensor, labels: torch.Tensor, chans: int) -> tuple[Any, int, torch.Tensor]:
    u8 = images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)  # exact for data loaded as uint8 (CIFAR, MNIST)
    return Decoded(u8, labels.long(), "L" if chans == 1 else "RGB"), len(labels), labels.long()


def build_datasets(
    cfg: Any, img_size: int, in_chans: int | None = None, model_cfg: Any = None, seed: int = 0
) -> DataBundle:
    """Build the train/val datasets named by the ``data`` config section.

    ``in_chans`` forces a channel count (model.in_chans); by default the data's own is used. ``model_cfg``
    (the ``model`` section) picks the pretrained mean/std when fine-tuning timm weights and timm's
    interpolation / crop_pct defaults; ``seed`` (``train.seed``) seeds timm's random train transform.
    """
    transform = getattr(cfg, "transform", None)
    timm_on = transform is not None and transform.enabled
    train_aug = test = None
    if cfg.name == "imagefolder":
        if cfg.limit_train is not None:
            raise LotusError(
                "data.limit_train: only supported for in-memory datasets (digits, mnist, fashion_mnist, "
                "cifar10, cifar100); for imagefolder use a ticket file (tickets.file) or a smaller folder"
            )
        train, val, classes, chans, mean, std = _imagefolder(cfg, img_size, in_chans, model_cfg)
        labels = train.labels.numpy()
        w, h = train.pil(0)[0].size if len(train) else (img_size, img_size)
        source_size = (h, w)
        if timm_on:
            sources = [_folder_source(cfg, train), _folder_source(cfg, val)]
            train_aug, train, val = _timm_views(cfg, model_cfg, img_size, chans, mean, std, seed, sources, classes)
        elif getattr(cfg, "cache", "none") == "memory":
            train, val = _cache_folder(cfg, train, mean, std), _cache_folder(cfg, val, mean, std)
    else:
        xte = yte = None
        if cfg.name == "digits":
            xtr, ytr, xva, yva, classes = digits(cfg)
        else:  # the official test split reports; the validation split comes out of the training split
            xtr, ytr, xte, yte, classes = official_splits(cfg)
            xtr, ytr, xva, yva = holdout(cfg, xtr, ytr)
        if cfg.limit_train is not None and cfg.limit_train < len(ytr):
            keep, _ = stratified_split(ytr.numpy(), None, cfg.split_seed, train_size=cfg.limit_train)
            xtr, ytr = xtr[keep], ytr[keep]
        chans = in_chans or xtr.shape[1]
        source_size = (int(xtr.shape[-2]), int(xtr.shape[-1]))
        if cfg.normalize:
            mean, std = _stats(_fit_channels(xtr, chans))
        else:
            mean, std = torch.zeros(chans), torch.ones(chans)
        if cfg.normalize and (getattr(transform, "mean", None) is not None or _pretrained_norm(model_cfg)):
            mean, std = (torch.tensor(v) for v in _norm(cfg, model_cfg, chans, (mean.tolist(), std.tolist())))
        train = TensorImageDataset(xtr, ytr, img_size, chans, mean, std, classes)
        val = TensorImageDataset(xva, yva, img_size, chans, mean, std, classes)
        test = None if xte is None else TensorImageDataset(xte, yte, img_size, chans, mean, std, classes)
        labels = ytr.numpy()
        if timm_on:
            sources = [_tensor_source(xtr, ytr, chans), _tensor_source(xva, yva, chans)]
            if xte is not None:
                sources.append(_tensor_source(xte, yte, chans))
            views = _timm_views(cfg, model_cfg, img_size, chans, mean.tolist(), std.tolist(), seed, sources, classes)
            train_aug, val = views[0], views[2]  # the clean train view stays batch-sliced
            test = views[3] if xte is not None else None
    if len(train) == 0 or len(val) == 0:
        raise LotusError(f"data: {cfg.name} has an empty {'train' if len(train) == 0 else 'val'} split")
    present = np.unique(labels)
    if len(present) < 2:
        raise LotusError(f"data: {cfg.name} training split has only one class ({classes[int(present[0])]}); need >= 2")
    return DataBundle(train, val, len(classes), chans, img_size, labels, list(classes), train_aug, test, source_size)


def describe(cfg: Any, data: DataBundle) -> dict:
    """What a run trained and evaluated on, for its summary: the data set's name, split sizes and classes."""
    return {
        "name": cfg.name,
        "train_size": len(data.train),
        "val_size": len(data.val),
        "test_size": len(data.test) if data.test is not None else None,
        "classes": list(data.classes),
        "source_size": list(data.source_size) if data.source_size else None,
        "img_size": data.img_size,
    }


def batches(
    dataset: Dataset,
    indices: np.ndarray | torch.Tensor,
    batch_size: int,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels, index)`` batches over ``indices`` in the given order.

    In-memory datasets are sliced a whole batch at a time (no per-sample Python work); others go through
    a ``DataLoader`` with the same order (``pin_memory``: page-locked batches for a CUDA copy).
    """
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    n = len(idx)
    stop = n - n % batch_size if drop_last else n
    if hasattr(dataset, "get_batch"):
        for s in range(0, stop, batch_size):
            yield dataset.get_batch(idx[s : s + batch_size])
        return
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=idx[:stop].tolist(),
        num_workers=num_workers,
        drop_last=False,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    try:
        yield from loader
    except LotusError as e:
        raise from_worker(e) from None
