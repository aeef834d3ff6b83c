"""The ``tickets.dynamic`` config section (see :mod:`lotus.features.dynamic.callback` for what ``ratio`` means)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lotus.errors import ConfigError

__all__ = ["DynamicConfig"]


@dataclass
class DynamicConfig:
    """``tickets.dynamic``: dynamic data pruning by a registered data rule (InfoBatch by default)."""

    enabled: bool = False
    """InfoBatch-style dynamic data pruning: each epoch skip part of the samples whose last loss is below the mean."""
    rule: str = "infobatch"
    """The data rule that picks each epoch's samples and loss weights (data_tickets.rules: infobatch, rs2, fixed, or
    one registered with register_rule)."""
    ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    """Share of the below-mean-loss samples skipped each epoch (not of the dataset); the kept ones are weighted 1/(1
    - ratio). Other rules: their strength (rs2, fixed: the share of the data skipped)."""
    anneal: float = field(default=0.125, metadata={"min": 0.0, "max": 1.0})
    """The last share of the epochs trains on all data (at least the schedule: section's anneal)."""
    seed: int | None = None
    """Seed of the random skips; default: train.seed."""
    export_ticket: bool = False
    """Write RUN_DIR/dynamic_ticket.npz (the final kept set and last losses) at the end."""

    def check(self, prefix: str) -> None:
        from data_tickets.rules import rule_names

        names = rule_names()
        if self.rule not in names:
            raise ConfigError(f"{prefix}.rule: unknown data rule {self.rule!r}; expected one of: {', '.join(names)}")
