"""The ``outliers:`` config section: outlier-feature monitoring during training (off by default)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from lotus.errors import ConfigError

__all__ = ["OutliersConfig", "QuantConfig"]


@dataclass
class QuantConfig:
    """Settings of the W8A8 check (defaults: int8 weights per channel, int8 activations per tensor, absmax)."""

    weight_bits: int = field(default=8, metadata={"min": 2, "max": 8})
    """Bits of the simulated weights (symmetric, per output channel)."""
    act_bits: int = field(default=8, metadata={"min": 2, "max": 8})
    """Bits of the simulated activations (symmetric, per tensor)."""
    calib_batches: int = field(default=4, metadata={"min": 1})
    """Batches that calibrate the activation ranges."""
    act_observer: Literal["absmax", "percentile"] = "absmax"
    """How an activation range is set: absmax, or the percentile below."""
    percentile: float = field(default=99.99, metadata={"min": 50.0, "max": 100.0})
    """act_observer percentile: the range is this percentile of |activation|."""
    scope: Literal["blocks", "all"] = "blocks"
    """Quantise the Linear layers inside .blocks, or every Linear (head included)."""


_SITE = re.compile(r"^(blocks\.\d+|final)$")


@dataclass
class OutliersConfig:
    """Measure kurtosis / max-median ratio of the residual stream on a fixed probe batch every N steps."""

    enabled: bool = False
    """Measure kurtosis and max/median ratio of the residual stream on a fixed probe batch during training."""
    every_n_steps: int = field(default=50, metadata={"min": 1})
    """Optimiser steps between measurements."""
    probe_batch_size: int = field(default=128, metadata={"min": 1})
    """Images in the fixed probe batch."""
    probe_split: Literal["val", "train"] = "val"
    """Split the probe batch comes from."""
    layers: list[str] = field(default_factory=list)
    """Sites to measure: blocks.<i> (input of block i) and final (output of the last block); empty: all."""
    at_start: bool = True
    """Also measure the initialisation (step 0)."""
    report: bool = True
    """Write RUN_DIR/outliers.md (per-layer table) and outliers_history.png at the end."""
    quant_check: bool = False
    """Measure the W8A8 int8 accuracy drop at the end and add it to the summary."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """Settings of the int8 check (outliers.quant_check, lotus quantcheck)."""

    def check(self, prefix: str) -> None:
        for i, name in enumerate(self.layers):
            if not _SITE.match(name):
                raise ConfigError(f"{prefix}.layers[{i}]: expected 'blocks.<i>' or 'final', got {name!r}")
