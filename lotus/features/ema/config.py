"""The ``ema:`` config section (off by default)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EmaConfig"]


@dataclass
class EmaConfig:
    """``ema:``: timm's ``ModelEmaV3`` over the trained weights."""

    enabled: bool = False
    """Keep an exponential moving average of the weights (timm's ModelEmaV3)."""
    decay: float = field(default=0.9998, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    """EMA decay per optimiser step."""
    warmup: bool = False
    """ModelEmaV3's decay warm-up (the decay ramps up over the first steps)."""
    eval: bool = True
    """Evaluate the EMA model each evaluation epoch (ema_val_acc) and save it as RUN_DIR/ema.safetensors."""
