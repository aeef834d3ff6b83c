"""Dataset fingerprints: detect that a ticket file is applied to the dataset it was made for.

A fingerprint holds the dataset size, a SHA-256 of its labels (int64, in index order) and a SHA-256 of a few
deterministically sampled images (pixels rounded to 1e-3 so harmless float noise does not matter). Images
are read under fixed RNG seeds so random train-time augmentation reads the same way every time; if two
reads of an item still differ, the pixel hash is recorded as ``None`` (skipped when comparing).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._batches import dataset_labels

__all__ = ["dataset_fingerprint", "labels_hash", "compare_fingerprints"]

FINGERPRINT_KEYS = ("size", "labels_sha256", "pixels_sha256", "pixel_samples")


def labels_hash(labels: Any) -> str:
    arr = np.ascontiguousarray(np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).astype("<i8"))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def _sample_positions(n: int, k: int) -> list[int]:
    if n == 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(k, n)).round()})


def _read_image(dataset: Dataset, i: int) -> np.ndarray:
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234 + i)
            random.seed(1234 + i)
            np.random.seed(1234 + i)
            item = dataset[i]
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    img = item[0] if isinstance(item, (tuple, list)) else item
    img = img.detach().cpu().float().numpy() if torch.is_tensor(img) else np.asarray(img, dtype=np.float32)
    return np.round(img.astype(np.float64), 3).astype("<f4")


def _pixels_hash(dataset: Dataset, k: int) -> str | None:
    h = hashlib.sha256()
    pos = _sample_positions(len(dataset), k)
    for j, i in enumerate(pos):
        a = _read_image(dataset, i)
        if j == 0 and not np.array_equal(a, _read_image(dataset, i)):
            return None  # reads are not reproducible: cannot fingerprint pixels
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset: Dataset | None = None, labels: Any = None, pixel_samples: int = 16) -> dict:
    """Fingerprint dict ``{size, labels_sha256, pixels_sha256, pixel_samples}``.

    With only ``labels`` the pixel hash is ``None``. Labels default to the dataset's (``labels``/``targets``
    attribute or one pass over the items).
    """
    if dataset is None and labels is None:
        raise ValueError("dataset_fingerprint: pass a dataset or labels")
    if labels is None:
        labels = dataset_labels(dataset)
    lab = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).reshape(-1)
    if dataset is not None and lab.size != len(dataset):
        raise ValueError(f"labels: expected {len(dataset)} labels (dataset size), got {lab.size}")
    return {
        "size": int(lab.size),
        "labels_sha256": labels_hash(lab),
        "pixels_sha256": _pixels_hash(dataset, pixel_samples) if dataset is not None else None,
        "pixel_samples": int(pixel_samples) if dataset is not None else 0,
    }


def compare_fingerprints(expected: dict, actual: dict) -> str | None:
    """``None`` if compatible, else a short reason (which part differs)."""
    if int(expected["size"]) != int(actual["size"]):
        return f"dataset size differs (file {expected['size']}, dataset {actual['size']})"
    if expected["labels_sha256"] != actual["labels_sha256"]:
        return f"labels hash differs (file {expected['labels_sha256'][:12]}, dataset {actual['labels_sha256'][:12]})"
    pe, pa = expected.get("pixels_sha256"), actual.get("pixels_sha256")
    if pe and pa and expected.get("pixel_samples") == actual.get("pixel_samples") and pe != pa:
        return f"sampled pixels hash differs (file {pe[:12]}, dataset {pa[:12]})"
    return None
