"""The ``mixup:`` config section (off by default); the fields are ``timm.data.Mixup``'s."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lotus.errors import ConfigError

__all__ = ["MixupConfig"]


@dataclass
class MixupConfig:
    """Mixup (``mixup_alpha``) and/or CutMix (``cutmix_alpha`` or ``cutmix_minmax``), applied with
    probability ``prob`` per batch, switching to CutMix with ``switch_prob`` when both are on; ``mode``
    ``batch`` | ``pair`` | ``elem`` (one lambda per batch, pair or sample). ``train.label_smoothing`` is
    applied to the mixed targets."""

    enabled: bool = False
    mixup_alpha: float = field(default=0.8, metadata={"min": 0.0})
    cutmix_alpha: float = field(default=1.0, metadata={"min": 0.0})
    cutmix_minmax: list[float] | None = None
    prob: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    switch_prob: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    mode: Literal["batch", "pair", "elem"] = "batch"

    def check(self, prefix: str) -> None:
        if self.cutmix_minmax is not None and (len(self.cutmix_minmax) != 2 or
                                               not 0.0 < self.cutmix_minmax[0] < self.cutmix_minmax[1] <= 1.0):
            raise ConfigError(f"{prefix}.cutmix_minmax: expected [min, max] with 0 < min < max <= 1, "
                              f"got {self.cutmix_minmax!r}")
        if self.enabled and self.mixup_alpha == 0.0 and self.cutmix_alpha == 0.0 and self.cutmix_minmax is None:
            raise ConfigError(f"{prefix}.mixup_alpha: mixup is enabled but mixup_alpha and cutmix_alpha are both 0")
