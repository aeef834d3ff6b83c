"""The ``outliers:`` config section: outlier-feature monitoring during training (off by default)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from lotus.outliers.quant import QuantConfig

__all__ = ["OutliersConfig", "QuantConfig"]

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
        from lotus.errors import ConfigError

        for i, name in enumerate(self.layers):
            if not _SITE.match(name):
                raise ConfigError(f"{prefix}.layers[{i}]: expected 'blocks.<i>' or 'final', got {name!r}")
