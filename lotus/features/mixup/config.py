"""The ``mixup:`` config section (off by default); the fields are ``timm.data.Mixup``'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lotus.errors import ConfigError

__all__ = ["MixupConfig"]


@dataclass
class MixupConfig:
    """``mixup:``: timm's ``Mixup`` (mixup and/or CutMix); ``train.label_smoothing`` applies to the mixed targets."""

    enabled: bool = False
    """Mix batches with timm's Mixup / CutMix (the loss becomes soft-target cross-entropy, or BCE)."""
    mixup_alpha: float = field(default=0.8, metadata={"min": 0.0})
    """Mixup's beta-distribution alpha; 0: no mixup."""
    cutmix_alpha: float = field(default=1.0, metadata={"min": 0.0})
    """CutMix's beta-distribution alpha; 0: no CutMix (unless cutmix_minmax)."""
    cutmix_minmax: list[float] | None = None
    """CutMix box area as [min, max] shares of the image (0 < min < max <= 1), instead of cutmix_alpha."""
    prob: float = field(default=1.0, metadata={"min": 0.0, "max": 1.0})
    """Probability of mixing a batch."""
    switch_prob: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    """When both are on: probability of CutMix instead of mixup."""
    mode: Literal["batch", "pair", "elem"] = "batch"
    """One mixing factor per batch, per pair or per sample (elem)."""

    def check(self, prefix: str) -> None:
        if self.cutmix_minmax is not None and (
            len(self.cutmix_minmax) != 2 or not 0.0 < self.cutmix_minmax[0] < self.cutmix_minmax[1] <= 1.0
        ):
            raise ConfigError(
                f"{prefix}.cutmix_minmax: expected [min, max] with 0 < min < max <= 1, got {self.cutmix_minmax!r}"
            )
        if self.enabled and self.mixup_alpha == 0.0 and self.cutmix_alpha == 0.0 and self.cutmix_minmax is None:
            raise ConfigError(f"{prefix}.mixup_alpha: mixup is enabled but mixup_alpha and cutmix_alpha are both 0")
