"""timm's image pipeline for Lotus (the ``data.transform`` section): per-sample PIL transforms from
``timm.data.create_transform``, resolved with ``timm.data.resolve_data_config``.

With ``data.transform.enabled`` the training split goes through timm's training transform (RandomResizedCrop,
flips, RandAugment / AugMix / AutoAugment, colour jitter, random erasing) and the validation split through its
eval transform (resize to ``img_size / crop_pct``, centre crop), one sample at a time in DataLoader workers.
Items stay ``(image, label, index)``. Each sample's random draws are seeded from ``(seed, epoch, index)``
(:class:`SeededTransformDataset`), so an epoch's augmentations do not depend on the worker count and a
resumed run is bit-identical. Mean/std: :func:`resolve_mean_std`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lotus.errors import ConfigError
from lotus.transform_config import AA_ALIASES, INTERPOLATIONS, TransformConfig, check_auto_augment  # noqa: F401

__all__ = [
    "TransformConfig",
    "check_auto_augment",
    "resolve_mean_std",
    "timm_data_config",
    "build_transform",
    "SeededTransformDataset",
    "uses_pretrained_norm",
]


def _pretrained_cfg(model_cfg: Any) -> dict:
    """The timm pretrained_cfg of the model's name (``{}`` for names timm does not know, e.g. lotus_vit_*)."""
    import timm

    if model_cfg is None:
        return {}
    try:
        cfg = timm.models.get_pretrained_cfg(model_cfg.name)
    except Exception:  # noqa: BLE001 - unknown names have no pretrained_cfg
        return {}
    return cfg.to_dict() if cfg is not None else {}


def uses_pretrained_norm(model_cfg: Any) -> bool:
    """Fine-tuning timm weights: ``model.pretrained``, or ``model.checkpoint`` of a timm model with published
    weights (its pretrained_cfg names a hub id / url; lotus_vit_* have none and were trained on the data's own
    statistics)."""
    if model_cfg is None or not (model_cfg.pretrained or model_cfg.checkpoint):
        return False
    pc = _pretrained_cfg(model_cfg)
    return bool(pc.get("mean")) and bool(pc.get("hf_hub_id") or pc.get("url") or pc.get("file"))


def _fit(values: list[float] | tuple[float, ...], chans: int, key: str) -> list[float]:
    v = [float(x) for x in values]
    if len(v) == chans:
        return v
    if len(v) == 1:
        return v * chans
    if chans == 1:
        return [sum(v) / len(v)]
    raise ConfigError(f"{key}: {len(v)} values for {chans}-channel images")


def resolve_mean_std(
    tcfg: TransformConfig | None, model_cfg: Any, chans: int, data_stats: tuple[list[float], list[float]]
) -> tuple[list[float], list[float]]:
    """``data.transform.mean/std`` if set; else the model's pretrained_cfg when fine-tuning timm weights
    (:func:`uses_pretrained_norm`); else ``data_stats`` (the dataset's own statistics, as without timm)."""
    if tcfg is not None and tcfg.mean is not None:
        return _fit(tcfg.mean, chans, "data.transform.mean"), _fit(tcfg.std, chans, "data.transform.std")
    if uses_pretrained_norm(model_cfg):
        pc = _pretrained_cfg(model_cfg)
        return _fit(pc["mean"], chans, "model.name"), _fit(pc["std"], chans, "model.name")
    return list(data_stats[0]), list(data_stats[1])


def timm_data_config(
    tcfg: TransformConfig, model_cfg: Any, img_size: int, chans: int, mean: list[float], std: list[float]
) -> dict:
    """``timm.data.resolve_data_config``: our size, mean/std and overrides over the model's pretrained_cfg
    (interpolation, crop_pct, crop_mode)."""
    from timm.data import resolve_data_config

    args = {
        "input_size": (chans, img_size, img_size),
        "mean": mean,
        "std": std,
        "interpolation": tcfg.interpolation,
        "crop_pct": tcfg.crop_pct,
    }
    return resolve_data_config(args, pretrained_cfg=_pretrained_cfg(model_cfg))


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize op with 0 bits kept (a black image, as Pillow < 13 gave; Pillow 13 raises ValueError)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize() -> None:
    """RandAugment's PosterizeIncreasing reaches 0 bits at magnitude 10 (timm <= 1.0.31 passes it to Pillow)."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if auto_augment.NAME_TO_OP.get(name) is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize


def build_transform(tcfg: TransformConfig, data_cfg: dict, training: bool) -> Callable:
    """``timm.data.create_transform`` for the train (random) or eval split."""
    from timm.data import create_transform

    _patch_posterize()

    common = dict(
        input_size=data_cfg["input_size"],
        interpolation=data_cfg["interpolation"],
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        crop_pct=data_cfg["crop_pct"],
        crop_mode=data_cfg.get("crop_mode"),
    )
    if not training:
        return create_transform(is_training=False, **common)
    aa = check_auto_augment(tcfg.auto_augment, "data.transform.auto_augment") if tcfg.auto_augment else None
    return create_transform(
        is_training=True,
        scale=tuple(tcfg.scale),
        ratio=tuple(tcfg.ratio),
        hflip=tcfg.hflip,
        vflip=tcfg.vflip,
        color_jitter=tcfg.color_jitter,
        auto_augment=aa,
        re_prob=tcfg.re_prob,
        re_mode=tcfg.re_mode,
        re_count=tcfg.re_count,
        **common,
    )


@contextlib.contextmanager
def _restored_rng() -> Iterator[None]:
    """Put Python's, numpy's and torch's (CPU) generators back afterwards (once per batch: saving numpy's state
    costs more than a small image's transform)."""
    gen = torch.default_generator  # CPU only: torch.manual_seed would also queue lazy CUDA seeding (slow)
    py, npy, pt = random.getstate(), np.random.get_state(), gen.get_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        gen.set_state(pt)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


class SeededTransformDataset(Dataset):
    """``(transform(image), label, index)`` over a source of PIL images, ``load(i) -> (image, label)``.

    ``seed`` given: each call of a random transform is seeded from ``(seed, epoch, index)`` (set the epoch
    with :meth:`set_epoch` before iterating), so results do not depend on DataLoader workers or on what ran
    before (resume). ``seed=None``: a deterministic (eval) transform, no seeding.
    """

    def __init__(
        self,
        load: Callable[[int], tuple[Any, int]],
        length: int,
        transform: Callable,
        labels: torch.Tensor,
        classes: list[str],
        seed: int | None = None,
    ):
        self.load, self.length, self.transform = load, length, transform
        self.labels, self.classes, self.seed = labels, classes, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _item(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.load(i)
        if self.seed is not None:
            _seed_all(hash((self.seed, self.epoch, i)) & (2**63 - 1))
        return self.transform(image), int(label), i

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int, int]]:
        """A DataLoader batch (the generators are saved and restored once for it)."""
        if self.seed is None:
            return [self._item(int(i)) for i in indices]
        with _restored_rng():
            return [self._item(int(i)) for i in indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.__getitems__([i])[0]
