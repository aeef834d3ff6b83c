"""The ``ema:`` config section (off by default)."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EmaConfig"]


@dataclass
class EmaConfig:
    """``decay`` per optimiser step (timm's ``ModelEmaV3``; ``warmup``: its decay warm-up, which ramps the
    decay up over the first steps). ``eval``: evaluate the EMA model each evaluation epoch (``ema_val_acc``)
    and save it as ``RUN_DIR/ema.safetensors``."""

    enabled: bool = False
    decay: float = field(default=0.9998, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    warmup: bool = False
    eval: bool = True
