"""Dynamic data pruning in lotus training (``tickets.dynamic``, InfoBatch-style, :class:`data_tickets.DynamicPruner`).

Every sample's score is its last seen training loss. Each epoch the loop skips ``round(ratio * |B|)`` random
samples of B, the samples whose score is below the mean, and multiplies the loss of the kept samples of B by
``1 / (1 - ratio)``; the last ``anneal`` fraction of the epochs trains on all data (at least the ``lotus:``
schedule's anneal, see :class:`lotus.features.schedule.plan.Schedule`). ``ratio`` is therefore the fraction
of the *below-mean* samples skipped, not of the dataset (the skipped dataset fraction is logged each epoch
as ``dyn_pruned_fraction``). It composes with a ticket subset (pruning acts inside the subset) and with
multi-rank runs (scores are merged across ranks every epoch).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from data_tickets import DynamicPruner
from lotus.callbacks import Callback, Trainer
from lotus.errors import LotusError
from lotus.features.dynamic.config import DynamicConfig

__all__ = ["DynamicPruningCallback"]


class DynamicPruningCallback(Callback):
    """Owns the epoch sampler (a :class:`data_tickets.DynamicPruner` over the epoch subset) and re-weights
    the kept samples' losses."""

    def __init__(self, cfg: DynamicConfig, seed: int, anneal: float, follow_plan: bool = False):
        self.cfg = cfg
        self.anneal = anneal  # the schedule's: at least lotus.anneal_epochs / train.epochs
        self.follow_plan = follow_plan  # lotus.schedule: auto: the ratio of each epoch is trainer.plan's
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.pruner = None
        self._pending: dict | None = None
        self.pruned_total = 0
        self._annealing_logged = False

    def on_fit_start(self, trainer: "Trainer") -> None:
        n = len(trainer.train_set)
        self.pruner = DynamicPruner(n, ratio=self.cfg.ratio, num_epochs=trainer.cfg.train.epochs,
                                    anneal=self.anneal, seed=self.seed)
        if self._pending:
            try:
                self.pruner.load_state_dict(self._pending["pruner"])
            except (ValueError, KeyError) as e:
                raise LotusError(f"tickets.dynamic: cannot resume the pruner state ({e})") from None
            self.pruned_total = int(self._pending.get("pruned_total", 0))
            self._annealing_logged = bool(self._pending.get("annealing_logged", False))
        if not trainer.restored:  # logged once per run, not again on resume
            trainer.log("dynamic_pruning", ratio=self.cfg.ratio, anneal=self.anneal, seed=self.seed,
                        prune_epochs=self.pruner.prune_epochs, train_size=n)

    def epoch_sampler(self, trainer: "Trainer", epoch: int, subset: np.ndarray | None) -> DynamicPruner:
        p = self.pruner
        subset = None if subset is None else np.asarray(subset)
        if (subset is None) != (p.pool is None) or (subset is not None and not np.array_equal(np.unique(subset), p.pool)):
            p.set_indices(subset)
        if self.follow_plan:
            p.set_ratio(trainer.plan.dynamic_ratio)
        p.set_epoch(epoch)
        st = p.stats
        if st["annealing"] and not self._annealing_logged:
            self._annealing_logged = True
            trainer.log("dynamic_anneal", message="full data from here on", epochs_left=trainer.cfg.train.epochs - epoch)
        return p

    def per_sample_loss(self, trainer: "Trainer", loss: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.pruner.reweight(loss, index)

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict) -> None:
        st = self.pruner.stats
        self.pruned_total += st["pruned"]
        metrics.update(dyn_kept=st["kept"], dyn_pruned=st["pruned"], dyn_below_mean=st["below_mean"],
                       dyn_pruned_fraction=round(st["pruned"] / max(st["pool"], 1), 6),
                       dyn_weight=st["weight"], dyn_annealing=st["annealing"])

    def on_fit_end(self, trainer: "Trainer", summary: dict) -> None:
        total = self.pruner.pool.size if self.pruner.pool is not None else self.pruner.num_samples
        epochs = max(trainer.epoch, 1)
        summary["dynamic_pruning"] = {
            "ratio": self.cfg.ratio, "anneal": self.anneal, "pruned_total": int(self.pruned_total),
            "saved_fraction": round(self.pruned_total / (total * epochs), 6),
        }
        if self.cfg.export_ticket and trainer.write and trainer.dist.is_main:
            path = os.path.join(trainer.run_dir, "dynamic_ticket.npz")
            ticket = self.pruner.to_ticket(dataset=trainer.train_set, labels=trainer.labels_train,
                                           extra={"run_dir": os.path.abspath(trainer.run_dir), "config": trainer.cfg.name})
            ticket.save(path)
            summary["dynamic_pruning"]["ticket"] = os.path.abspath(path)
            trainer.log("dynamic_ticket", file=os.path.abspath(path), count=ticket.count,
                        fraction=round(float(ticket.fraction), 6))

    def state_dict(self) -> dict:
        if self.pruner is None:
            return dict(self._pending or {})
        return {"pruner": self.pruner.state_dict(), "pruned_total": int(self.pruned_total),
                "annealing_logged": self._annealing_logged}

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state) if state else None
