"""``model.op``: the settings of the Outlier-Protected block (:mod:`lotus.models.op_block`); torch-free, so
the config validates without importing torch or timm."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["OPConfig"]


@dataclass
class OPConfig:
    """``model.op``: settings of the Outlier-Protected block (used when ``model.block: op``)."""

    beta: float | None = field(default=None, metadata={"min": 0.0, "min_exclusive": True})  # None: 1/sqrt(depth)
    trainable_beta: bool = True
    qk_norm: Literal["rms", "tanh", "none"] = "rms"
    softcap: float = field(default=30.0, metadata={"min": 0.0, "min_exclusive": True})  # for qk_norm: tanh
    input_scale: float | None = field(default=None, metadata={"min": 0.0, "min_exclusive": True})  # alpha
    trainable_input_scale: bool = True
    embed_norm: bool = True  # the single norm after the patch embedding (timm pre_norm)
    final_norm: bool = True  # norm before the classifier head
