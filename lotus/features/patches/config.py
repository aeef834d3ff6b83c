"""The ``tickets.patches`` config section (patch tickets, see :mod:`lotus.features.patches.callback`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_tickets import KeepRateSchedule
from lotus.errors import ConfigError

__all__ = ["PatchConfig"]


@dataclass
class PatchConfig:
    """``tickets.patches``: train on the most informative ``keep_rate`` share of each image's patches."""

    enabled: bool = False
    """Patch tickets: train on the top keep_rate share of each image's patches (evaluation uses all)."""
    keep_rate: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    """Share of the patches kept (the lowest rate under schedule.mode: auto)."""
    schedule: list[list[float]] = field(default_factory=list)
    """Keep rate per epoch as [[epoch, keep_rate], ...] points; overrides keep_rate."""
    schedule_mode: Literal["step", "linear"] = "step"
    """step: the rate of the last point reached; linear: interpolated between points."""
    scorer: Literal["cls_attention", "random"] = "cls_attention"
    """How patches are ranked: the CLS attention of the model being trained, or random (FLIP-style, a fresh draw per
    sample and epoch)."""
    source: Literal["online", "file"] = "online"
    """online: rank with the model during training; file: rankings from a ticket file."""
    file: str | None = None
    """Ticket .npz with patch rankings (source: file)."""
    rollout: bool = False
    """Rank by attention rollout over all blocks instead of the last block's attention."""
    refresh_every: int = field(default=1, metadata={"min": 0})
    """Epochs between re-rankings of the training set (online cls_attention); 0: rank every batch."""
    seed: int | None = None
    """Seed of the random scorer; default: train.seed."""

    def check(self, prefix: str) -> None:
        if self.schedule:
            try:
                KeepRateSchedule(self.schedule, self.schedule_mode)
            except ValueError as e:
                raise ConfigError(f"{prefix}.{e}") from None
        if self.source == "file":
            if not self.file:
                raise ConfigError(
                    f"{prefix}.file: required with {prefix}.source: file (a ticket .npz with patch tickets)"
                )
            if not str(self.file).endswith(".npz"):
                raise ConfigError(f"{prefix}.file: expected a ticket .npz file, got {self.file!r}")
            if self.scorer == "random":
                raise ConfigError(
                    f"{prefix}.scorer: 'random' draws fresh patches online every epoch; "
                    f"use source: online (the file already fixes the patches)"
                )
        elif self.file is not None:
            raise ConfigError(f"{prefix}.file: only used with {prefix}.source: file (got source {self.source!r})")
