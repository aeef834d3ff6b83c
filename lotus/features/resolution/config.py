"""The ``resolution:`` config section: train early epochs on smaller images (fewer patch tokens)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ResolutionConfig"]


@dataclass
class ResolutionConfig:
    """``resolution``: progressive resolution, EfficientTrain-style. Epoch 0 trains on images resized to
    ``start`` x the model's input side, the side grows linearly (in whole patches) to the full side at
    ``full_at`` x ``train.epochs`` and stays there; evaluation is always at full size. The model needs
    ``model.kwargs.dynamic_img_size: true`` (timm interpolates the position embedding to the grid)."""

    enabled: bool = False
    start: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    full_at: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    mode: Literal["bilinear", "bicubic", "area"] = "bilinear"  # bilinear/bicubic resize with antialiasing
