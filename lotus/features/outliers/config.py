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
    act_bits: int = field(default=8, metadata={"min": 2, "max": 8})
    calib_batches: int = field(default=4, metadata={"min": 1})
    act_observer: Literal["absmax", "percentile"] = "absmax"
    percentile: float = field(default=99.99, metadata={"min": 50.0, "max": 100.0})
    scope: Literal["blocks", "all"] = "blocks"  # Linear layers inside .blocks, or every Linear (incl. head)


_SITE = re.compile(r"^(blocks\.\d+|final)$")


@dataclass
class OutliersConfig:
    """Measure kurtosis / max-median ratio of the residual stream on a fixed probe batch every N steps.

    ``layers`` lists sites to measure: ``blocks.i`` (input of block i) and ``final`` (output of the last
    block); empty means all. At the end of training the run directory gets ``outliers.md`` (per-layer table)
    and ``outliers_history.png`` (metrics over training); with ``quant_check`` the W8A8 int8 accuracy drop
    is measured too and added to the summary.
    """

    enabled: bool = False
    every_n_steps: int = field(default=50, metadata={"min": 1})
    probe_batch_size: int = field(default=128, metadata={"min": 1})
    probe_split: Literal["val", "train"] = "val"
    layers: list[str] = field(default_factory=list)
    at_start: bool = True  # also measure the initialisation (step 0)
    report: bool = True
    quant_check: bool = False
    quant: QuantConfig = field(default_factory=QuantConfig)

    def check(self, prefix: str) -> None:
        for i, name in enumerate(self.layers):
            if not _SITE.match(name):
                raise ConfigError(f"{prefix}.layers[{i}]: expected 'blocks.<i>' or 'final', got {name!r}")
