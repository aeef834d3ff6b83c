"""``model.op``: the settings of the Outlier-Protected block (:mod:`lotus.models.op_block`); torch-free, so
the config validates without importing torch or timm."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["OPConfig"]


@dataclass
class OPConfig:
    """``model.op``: settings of the Outlier-Protected block (used when ``model.block: op``)."""

    beta: float | None = field(default=None, metadata={"min": 0.0, "min_exclusive": True})
    """Residual gain of each branch; default: 1/sqrt(depth)."""
    trainable_beta: bool = True
    """Train the residual gains."""
    qk_norm: Literal["rms", "tanh", "none"] = "rms"
    """Attention logit control: rms (QK-RMSNorm), tanh (soft-capping at softcap) or none."""
    softcap: float = field(default=30.0, metadata={"min": 0.0, "min_exclusive": True})
    """qk_norm tanh: logits become softcap x tanh(logits / softcap)."""
    input_scale: float | None = field(default=None, metadata={"min": 0.0, "min_exclusive": True})
    """A scale (alpha) on the first block's input; default: none."""
    trainable_input_scale: bool = True
    """Train input_scale."""
    embed_norm: bool = True
    """Keep the single norm after the patch embedding (timm's pre_norm)."""
    final_norm: bool = True
    """Keep the norm before the classifier head."""
