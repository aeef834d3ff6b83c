"""What a weights file must say about its inputs so the model can be used without the training data.

:func:`data_metadata` reads it off a run's data (``DataBundle``): the data set's name, class names, the
normalisation actually applied (mean/std), and the eval preprocessing in timm's vocabulary (input_size,
interpolation, crop_pct, crop_mode). Every Lotus weights file stores it as its metadata's ``"data"`` entry
(:func:`read_data_metadata`); ``lotus export`` turns it into timm's ``pretrained_cfg`` + ``label_names``, and
``lotus validate`` / ``lotus predict`` rebuild the eval transform from it (:func:`eval_transform`).

Lotus' own eval paths resize to the model's size without cropping (``crop_mode: squash``, ``crop_pct: 1``,
bilinear); with ``data.transform`` on, timm's resolved eval settings are recorded instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["DATA_KEYS", "data_metadata", "read_data_metadata", "eval_transform", "normalization_of"]

DATA_KEYS = ("dataset", "classes", "mean", "std", "input_size", "interpolation", "crop_pct", "crop_mode")


def normalization_of(dataset: Any) -> tuple[list[float], list[float]] | None:
    """(mean, std) a dataset applies: a TensorImageDataset's tensors, or the Normalize in its transform."""
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        return [float(v) for v in mean.flatten()], [float(v) for v in std.flatten()]
    from torchvision.transforms import Normalize

    stack = [getattr(dataset, "transform", None)]
    while stack:
        t = stack.pop()
        if isinstance(t, Normalize):
            return [float(v) for v in torch.as_tensor(t.mean).flatten()], [
                float(v) for v in torch.as_tensor(t.std).flatten()
            ]
        stack.extend(getattr(t, "transforms", None) or [])
    return None


def data_metadata(bundle: Any, data_cfg: Any, model_cfg: Any = None) -> dict:
    """The ``"data"`` metadata of a run's weights (see the module docstring); keys :data:`DATA_KEYS`."""
    chans, size = int(bundle.in_chans), int(bundle.img_size)
    norm = normalization_of(bundle.val) or ([0.0] * chans, [1.0] * chans)
    meta = {
        "dataset": getattr(data_cfg, "name", None),
        "classes": [str(c) for c in bundle.classes],
        "mean": norm[0],
        "std": norm[1],
        "input_size": [chans, size, size],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }
    tcfg = getattr(data_cfg, "transform", None)
    if tcfg is not None and getattr(tcfg, "enabled", False):
        from lotus.data_transforms import timm_data_config

        dcfg = timm_data_config(tcfg, model_cfg, size, chans, norm[0], norm[1])
        meta.update(
            interpolation=dcfg["interpolation"],
            crop_pct=float(dcfg["crop_pct"]),
            crop_mode=dcfg.get("crop_mode") or "center",
        )
    return meta


def read_data_metadata(path: str | os.PathLike, key: str = "checkpoint") -> dict | None:
    """The ``"data"`` entry of a Lotus weights file, or None (a file of an older version, or not Lotus')."""
    from lotus.weights_meta import read_metadata

    data = read_metadata(path, key).get("data")
    return data if isinstance(data, dict) and data.get("mean") is not None else None


def eval_transform(meta: dict) -> Callable[[Any], torch.Tensor]:
    """PIL image -> normalised model input, as the run evaluated: the image converted to the model's channels
    (L or RGB), then timm's eval transform with the recorded size, interpolation, crop and mean/std."""
    from timm.data import create_transform

    chans = int(meta["input_size"][0])
    tf = create_transform(
        input_size=tuple(meta["input_size"]),
        is_training=False,
        interpolation=meta.get("interpolation") or "bilinear",
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        crop_pct=meta.get("crop_pct") or 1.0,
        crop_mode=meta.get("crop_mode") or "squash",
    )
    mode = "L" if chans == 1 else "RGB"

    def apply(image: Any) -> torch.Tensor:
        return tf(image.convert(mode))

    return apply


def run_data_metadata(trainer: Any) -> dict:
    """:func:`data_metadata` of a Trainer's data (computed once per Trainer)."""
    meta = getattr(trainer, "_data_metadata", None)
    if meta is None:
        meta = data_metadata(trainer.data, trainer.cfg.data, trainer.cfg.model)
        trainer._data_metadata = meta
    return meta


def carried_data_metadata(source: str | None, bundle: Any = None, cfg: Any = None) -> dict | None:
    """The ``"data"`` metadata for weights derived from ``source`` (pruned, exported): the source file's own,
    else that of ``bundle`` (built from the config ``cfg``), else None."""
    if source and os.path.isfile(source):
        meta = read_data_metadata(source, "checkpoint")
        if meta is not None:
            return meta
    if bundle is not None and cfg is not None:
        return data_metadata(bundle, cfg.data, cfg.model)
    return None
