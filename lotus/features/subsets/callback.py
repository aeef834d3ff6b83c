"""Random subsets in lotus training (``tickets.random``): owns the ``subset`` slot with the registered data rule
``tickets.random.mode`` (``rs2`` or ``fixed``, :mod:`data_tickets.rules`), planned over the whole training split.
The rules are pure functions of the epoch and seed (:mod:`data_tickets.random_subsets`), so resume needs no state.
The same rules also run as ``tickets.dynamic.rule`` (then they own the sampler and compose with a ticket)."""

from __future__ import annotations

import numpy as np

from data_tickets.rules import DataRule, RuleState, make_rule
from lotus.callbacks import Callback, Trainer
from lotus.features.subsets.config import RandomSubsetConfig

__all__ = ["RandomSubsetCallback"]


class RandomSubsetCallback(Callback):
    """The epoch's train indices: the plan of the rule ``cfg.mode`` (a fixed random subset or RS2's draw)."""

    def __init__(self, cfg: RandomSubsetConfig, seed: int):
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.rule: DataRule | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.restored:
            trainer.log(
                "random_subset",
                mode=self.cfg.mode,
                fraction=self.cfg.fraction,
                note=f"each epoch trains on {self.cfg.fraction:.0%} of the training split "
                + (
                    "(one fixed, class-stratified random subset)"
                    if self.cfg.mode == "fixed"
                    else "(a fresh random share per epoch, RS2 without replacement)"
                ),
            )

    def epoch_subset(self, trainer: Trainer, epoch: int) -> np.ndarray:
        n = len(trainer.train_set)
        if self.rule is None:
            opts = dict(seed=self.seed, num_epochs=trainer.cfg.train.epochs, labels=trainer.labels_train)
            self.rule = make_rule(self.cfg.mode, n, fraction=self.cfg.fraction, **opts)
        return self.rule.epoch_plan(epoch, np.arange(n), RuleState.empty(n)).indices
