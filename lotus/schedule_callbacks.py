"""Training callbacks of the ``lotus:`` schedule (see :mod:`lotus.schedule`)."""
from __future__ import annotations

import time

import numpy as np
import torch

from lotus.config import Config
from lotus.schedule import phase_of, reselect_epochs
from lotus.train import Callback, Trainer

__all__ = ["ReselectCallback", "PhaseLogger"]


class ReselectCallback(Callback):
    """Scores the training set with the current model and restricts training to the selected subset."""

    order = -75  # after an offline ticket subset (-100), before dynamic pruning (-50) which uses trainer.subset

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.epochs = set(reselect_epochs(cfg))
        self.indices: np.ndarray | None = None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        phase = phase_of(epoch, self.cfg)
        if phase != "reduce":
            if phase == "anneal" and self.indices is not None:
                self.indices = None
                trainer.log("anneal_full_data", message="full training set from here on")
            trainer.subset = None
            return
        if epoch in self.epochs or self.indices is None:
            self._select(trainer, epoch)
        trainer.subset = self.indices

    def _select(self, trainer: Trainer, epoch: int) -> None:
        from data_tickets import score, select

        r = self.cfg.lotus.reselect
        t0 = time.perf_counter()
        policy_keys = {"beta", "strata"}
        scores = score(trainer.model, trainer.train_set, scorer=r.scorer, batch_size=self.cfg.data.eval_batch_size,
                       device=trainer.device, progress=False, seed=self.cfg.train.seed + epoch,
                       **{k: v for k, v in r.options.items() if k not in policy_keys})
        idx = select(scores, policy=r.policy, fraction=r.fraction, labels=trainer.labels_train,
                     class_balanced=r.class_balanced, seed=self.cfg.train.seed + epoch,
                     **{k: v for k, v in r.options.items() if k in policy_keys})
        self.indices = np.asarray(idx, dtype=np.int64)
        trainer.log("reselect", scorer=r.scorer, policy=r.policy, kept=int(len(idx)),
                    fraction=round(len(idx) / len(trainer.train_set), 4), seconds=round(time.perf_counter() - t0, 3))

    def state_dict(self) -> dict:
        return {} if self.indices is None else {"indices": torch.as_tensor(self.indices)}

    def load_state_dict(self, state: dict) -> None:
        self.indices = state["indices"].numpy() if "indices" in state else None



class PhaseLogger(Callback):
    """Logs the phase boundaries so reports mark them on the time axis."""

    order = 100

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.last: str | None = None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        phase = phase_of(epoch, self.cfg)
        if phase != self.last:
            if self.last is not None or epoch > 0:
                trainer.log(f"phase_{phase}", epoch_start=epoch)
            self.last = phase

    def state_dict(self) -> dict:
        return {"last": self.last or ""}

    def load_state_dict(self, state: dict) -> None:
        self.last = state.get("last") or None
