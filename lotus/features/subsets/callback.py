"""Random subsets in lotus training (``tickets.random``): owns the ``subset`` slot with a pure function of
the epoch (:mod:`data_tickets.random_subsets`), so resume needs no state."""

from __future__ import annotations

import numpy as np

from data_tickets.random_subsets import fixed_subset, rs2_subset
from lotus.callbacks import Callback, Trainer
from lotus.features.subsets.config import RandomSubsetConfig

__all__ = ["RandomSubsetCallback"]


class RandomSubsetCallback(Callback):
    """The epoch's train indices: a fixed random subset or RS2's draw."""

    def __init__(self, cfg: RandomSubsetConfig, seed: int):
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.fixed: np.ndarray | None = None

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
        if self.cfg.mode == "rs2":
            return rs2_subset(n, self.cfg.fraction, epoch, self.seed)
        if self.fixed is None:
            self.fixed = fixed_subset(n, self.cfg.fraction, self.seed, trainer.labels_train)
        return self.fixed
