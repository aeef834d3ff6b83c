"""On-the-fly sample tickets of the ``schedule:`` section: score the train split with the current model and
train on the selected subset during the reduced phase (see :mod:`lotus.features.schedule.phases`)."""

from __future__ import annotations

import time

import numpy as np
import torch

from data_tickets import score, select
from lotus.callbacks import Callback, Trainer
from lotus.features.schedule.config import ReselectConfig

__all__ = ["ReselectCallback"]

_POLICY_KEYS = {"beta", "strata"}


class ReselectCallback(Callback):
    """Owns the epoch subset while ``schedule.reselect`` is on: a fresh ticket at the plan's ``reselect``
    epochs, kept until the anneal (``plan.full_data``), where training returns to all data."""

    def __init__(self, cfg: ReselectConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.indices: np.ndarray | None = None

    def epoch_subset(self, trainer: Trainer, epoch: int) -> np.ndarray | None:
        plan = trainer.plan
        if plan.full_data:
            if plan.phase == "anneal" and self.indices is not None:
                self.indices = None
                trainer.log("anneal_full_data", message="full training set from here on")
            return None
        if plan.reselect or self.indices is None:
            self._select(trainer, epoch)
        return self.indices

    def _select(self, trainer: Trainer, epoch: int) -> None:
        r = self.cfg
        t0 = time.perf_counter()
        scores = score(
            trainer.model,
            trainer.train_set,
            scorer=r.scorer,
            batch_size=trainer.cfg.data.eval_batch_size,
            device=trainer.device,
            progress=False,
            seed=self.seed + epoch,
            **{k: v for k, v in r.options.items() if k not in _POLICY_KEYS},
        )
        idx = select(
            scores,
            policy=r.policy,
            fraction=r.fraction,
            labels=trainer.labels_train,
            class_balanced=r.class_balanced,
            seed=self.seed + epoch,
            **{k: v for k, v in r.options.items() if k in _POLICY_KEYS},
        )
        self.indices = np.asarray(idx, dtype=np.int64)
        trainer.log(
            "reselect",
            scorer=r.scorer,
            policy=r.policy,
            kept=int(len(idx)),
            fraction=round(len(idx) / len(trainer.train_set), 4),
            seconds=round(time.perf_counter() - t0, 3),
        )

    def state_dict(self) -> dict:
        return {} if self.indices is None else {"indices": torch.as_tensor(self.indices)}

    def load_state_dict(self, state: dict) -> None:
        self.indices = state["indices"].numpy() if "indices" in state else None
