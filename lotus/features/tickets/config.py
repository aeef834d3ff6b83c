"""The ``tickets:`` config section: an offline ticket file, plus the dynamic-pruning and patch-ticket
subsections (each its own feature: :mod:`lotus.features.dynamic`, :mod:`lotus.features.patches`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lotus.errors import ConfigError
from lotus.features.dynamic.config import DynamicConfig
from lotus.features.patches.config import PatchConfig
from lotus.features.subsets.config import RandomSubsetConfig

__all__ = ["TicketsConfig"]


@dataclass
class TicketsConfig:
    """``tickets:`` section: an offline ticket file and the data-ticket features."""

    file: str | None = None
    """A ticket .npz from lotus select: train on its subset only."""
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    """InfoBatch-style dynamic data pruning (off by default)."""
    patches: PatchConfig = field(default_factory=PatchConfig)
    """Patch tickets: train on a share of each image's patches (off by default)."""
    random: RandomSubsetConfig = field(default_factory=RandomSubsetConfig)
    """Random-subset baselines, fixed or RS2 (off by default)."""

    def check(self, prefix: str) -> None:
        if self.file is not None and not str(self.file).endswith(".npz"):
            raise ConfigError(f"{prefix}.file: expected a ticket .npz file (from lotus select), got {self.file!r}")
        if self.file is not None and self.random.enabled:
            raise ConfigError(f"{prefix}.random.enabled: a random subset replaces {prefix}.file; use one of them")
