"""The ``resolution:`` config section: train early epochs on smaller images (fewer patch tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ResolutionConfig"]


@dataclass
class ResolutionConfig:
    """``resolution``: progressive resolution, EfficientTrain-style; evaluation is always at full size, and timm
    interpolates the position embedding to the smaller grids (``model.kwargs.dynamic_img_size: true``)."""

    enabled: bool = False
    """Progressive resolution (EfficientTrain-style); needs model.kwargs.dynamic_img_size: true."""
    start: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    """Epoch 0 trains on images resized to this share of the model's input side (schedule.mode: auto: the lowest
    side it may choose; it starts there and raises the side on measured signals)."""
    full_at: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """The side grows linearly (in whole patches) to the full side at this share of train.epochs, then stays
    (schedule.mode: fixed; under auto the side is decided)."""
    mode: Literal["bilinear", "bicubic", "area"] = "bilinear"
    """Resize interpolation (bilinear and bicubic with antialiasing)."""
