"""The ``data.transform`` config section (:class:`TransformConfig`) and the check of timm's auto_augment
strings; torch-free, so validating a config imports neither torch nor timm. The transforms themselves are
built in :mod:`lotus.data_transforms`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from lotus.errors import ConfigError

__all__ = ["TransformConfig", "check_auto_augment", "AA_ALIASES", "INTERPOLATIONS"]

# names timm's create_transform does not know, spelled in its RandAugment grammar
AA_ALIASES = {"trivialaugment": "rand-n1-m10-mstd101-p1.0-inc1"}  # one op, uniform magnitude, always applied
_AA_SECTIONS = {  # the numeric sections timm's parsers accept (timm.data.auto_augment), by family
    "rand": {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int},
    "augmix": {"m": int, "w": int, "d": int, "a": float, "b": int, "mstd": float},
    "auto": {"mstd": float},
}
_AA_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
_RAND_SETS = ("weights", "3aw", "3a")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos", "random")


@dataclass
class TransformConfig:
    """timm's train/eval transforms (``timm.data.create_transform`` keyword names). Off by default: the
    in-memory datasets then keep the batched tensor augmenter (``data.augment``)."""

    enabled: bool = False
    """Use timm's create_transform (per-sample PIL transforms in DataLoader workers) instead of data.augment."""
    auto_augment: str | None = None
    """timm policy string: rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0, ... or trivialaugment; checked
    section by section."""
    re_prob: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    """Random erasing probability."""
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    """Random erasing fill."""
    re_count: int = field(default=1, metadata={"min": 1})
    """Random erasing boxes per image."""
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range [min, max], 0 < min <= max <= 1."""
    ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    """RandomResizedCrop aspect-ratio range [min, max]."""
    hflip: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """Horizontal flip probability."""
    vflip: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    """Vertical flip probability."""
    color_jitter: float | None = field(default=0.4, metadata={"min": 0.0})
    """Colour jitter strength (timm turns it off under auto_augment); null: off."""
    interpolation: Literal["bilinear", "bicubic", "nearest", "box", "hamming", "lanczos", "random"] | None = None
    """Resize interpolation; default: the model's pretrained_cfg."""
    crop_pct: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    """Eval: resize to img_size / crop_pct, then centre-crop; default: the model's pretrained_cfg."""
    mean: list[float] | None = None
    """Normalisation mean (1 or 3 values, set with std); default: the model's pretrained_cfg when fine-tuning timm
    weights, else the data's."""
    std: list[float] | None = None
    """Normalisation std (1 or 3 values > 0, set with mean); default as for mean."""

    def check(self, prefix: str) -> None:
        if self.auto_augment is not None:
            check_auto_augment(self.auto_augment, f"{prefix}.auto_augment")
        for key, lo_ok in (("scale", lambda a: 0.0 < a[0] <= a[1] <= 1.0), ("ratio", lambda a: 0.0 < a[0] <= a[1])):
            v = getattr(self, key)
            if len(v) != 2 or not lo_ok(v):
                bound = "0 < min <= max <= 1" if key == "scale" else "0 < min <= max"
                raise ConfigError(f"{prefix}.{key}: expected [min, max] with {bound}, got {v!r}")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and (len(v) not in (1, 3) or (key == "std" and min(v) <= 0)):
                raise ConfigError(f"{prefix}.{key}: expected 1 or 3 values{' > 0' if key == 'std' else ''}, got {v!r}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError(f"{prefix}.{'std' if self.std is None else 'mean'}: set mean and std together")


def check_auto_augment(text: str, key: str) -> str:
    """The timm string for ``text`` (aliases resolved), or a :class:`ConfigError` naming ``key``.

    timm's parsers skip sections they cannot split (``rand-zz`` silently means plain ``rand``), so the
    grammar is checked here: ``<family>-<section>-...`` with each section ``<name><number>``."""
    s = AA_ALIASES.get(text, text)
    parts = s.split("-")
    head = parts[0]
    family = head if head in ("rand", "augmix") else "auto" if head in _AA_POLICIES else None
    if family is None:
        raise ConfigError(
            f"{key}: unknown policy {head!r} in {text!r}; expected rand-..., augmix-..., "
            f"{', '.join(_AA_POLICIES)} or {', '.join(AA_ALIASES)} (timm's auto_augment strings)"
        )
    allowed = _AA_SECTIONS[family]
    for part in parts[1:]:
        if family == "rand" and part.startswith("t"):
            if part[1:] not in _RAND_SETS:
                raise ConfigError(
                    f"{key}: unknown transform set {part!r} in {text!r}; expected t + one of {', '.join(_RAND_SETS)}"
                )
            continue
        m = re.fullmatch(r"([a-z]+)(\d[\d.]*)", part)
        if not m or m.group(1) not in allowed:
            raise ConfigError(
                f"{key}: bad section {part!r} in {text!r}; {family} takes {', '.join(k + '<number>' for k in allowed)}"
            )
        try:
            allowed[m.group(1)](m.group(2))
        except ValueError:
            raise ConfigError(f"{key}: bad number in {part!r} of {text!r}") from None
    return s
