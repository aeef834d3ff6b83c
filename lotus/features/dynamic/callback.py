"""Dynamic data pruning in lotus training (``tickets.dynamic``, :class:`data_tickets.DynamicPruner` driven by the
data rule ``tickets.dynamic.rule``, a :mod:`data_tickets.rules` registry name; InfoBatch by default).

Every sample's score is its last seen training loss. Each epoch the rule plans the kept samples and their
loss weights from the scores; this callback knows nothing rule-specific. With InfoBatch the loop skips
``round(ratio * |B|)`` random samples of B, the samples whose score is below the mean, and multiplies the
loss of the kept samples of B by ``1 / (1 - ratio)``; the last ``anneal`` fraction of the epochs trains on
all data (at least the ``schedule:`` section's anneal, see :class:`lotus.features.schedule.phases.Schedule`).
``ratio`` is therefore the fraction of the *below-mean* samples skipped, not of the dataset (the skipped
dataset fraction is logged each epoch as ``dyn_pruned_fraction``). It composes with a ticket subset
(pruning acts inside the subset).

The losses of an epoch are recorded on the device (a sum and a count per dataset index, scattered in each
step: no host sync) and merged into the pruner's scores once, at the epoch end. Under torchrun (DDP,
FSDP2) the two vectors are summed over ranks first (one ``all_reduce`` each), which is the same as
gathering every step's ``(index, loss)`` pairs: each sample is seen once per epoch, on one rank, so its
score is its loss; a sample seen more than once (the padding below) gets the mean of its losses. Every
rank then holds the same scores and, with the same seed, computes the same plan (kept set, order,
weights); the plan's digest of every rank is in the epoch metrics (``dyn_rank_digests``) and ranks that
disagree stop the run. The Trainer shards the plan's order like ``DistributedSampler(drop_last=False)``:
padded to a multiple of the world size by repeating its first indices, then rank ``r`` takes positions
``r, r + W, ...``; so the global batch of a step is the same samples as one process with ``W`` times the
batch size would take whenever the kept count is a multiple of ``W``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from data_tickets import DynamicPruner
from lotus.callbacks import Callback, Trainer
from lotus.errors import LotusError
from lotus.features.dynamic.config import DynamicConfig
from lotus.parallel.rebuild import agree

__all__ = ["DynamicPruningCallback"]


class DynamicPruningCallback(Callback):
    """Owns the epoch sampler (a :class:`data_tickets.DynamicPruner` running ``cfg.rule`` over the epoch subset)
    and re-weights the kept samples' losses."""

    def __init__(self, cfg: DynamicConfig, seed: int, anneal: float, follow_plan: bool = False):
        self.cfg = cfg
        self.anneal = anneal  # the schedule's: at least schedule.anneal_epochs / train.epochs
        self.follow_plan = follow_plan  # schedule.mode: auto: the ratio of each epoch is trainer.plan's
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.pruner = None
        self._pending: dict | None = None
        self.pruned_total = 0
        self._annealing_logged = False
        self._loss_sum: torch.Tensor | None = None  # this epoch's losses per dataset index, on the device
        self._loss_count: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None  # the current plan's loss weights, on the device
        self._digests: list[str] | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        n = len(trainer.train_set)
        self.pruner = DynamicPruner(
            n,
            ratio=self.cfg.ratio,
            num_epochs=trainer.cfg.train.epochs,
            anneal=self.anneal,
            seed=self.seed,
            sync_scores=False,  # merged here
            rule=self.cfg.rule,
            rule_options={"labels": trainer.labels_train},
        )
        self._loss_sum = torch.zeros(n, dtype=torch.float32, device=trainer.device)
        self._loss_count = torch.zeros(n, dtype=torch.float32, device=trainer.device)
        if self._pending:
            try:
                self.pruner.load_state_dict(self._pending["pruner"])
            except (ValueError, KeyError) as e:
                raise LotusError(f"tickets.dynamic: cannot resume the pruner state ({e})") from None
            self.pruned_total = int(self._pending.get("pruned_total", 0))
            self._annealing_logged = bool(self._pending.get("annealing_logged", False))
        if not trainer.restored:  # logged once per run, not again on resume
            trainer.log(
                "dynamic_pruning",
                rule=self.cfg.rule,
                ratio=self.cfg.ratio,
                anneal=self.anneal,
                seed=self.seed,
                prune_epochs=self.pruner.prune_epochs,
                train_size=n,
            )

    def epoch_sampler(self, trainer: Trainer, epoch: int, subset: np.ndarray | None) -> DynamicPruner:
        p = self.pruner
        subset = None if subset is None else np.asarray(subset)
        if (subset is None) != (p.pool is None) or (
            subset is not None and not np.array_equal(np.unique(subset), p.pool)
        ):
            p.set_indices(subset)
        if self.follow_plan:
            p.set_ratio(trainer.plan.dynamic_ratio)
        p.set_epoch(epoch)
        self._weights = p.weights(np.arange(p.num_samples), device=trainer.device)
        if trainer.dist.world_size > 1:  # every rank must have planned the same epoch
            self._digests = agree((p.epoch_indices(), self._weights), f"tickets.dynamic (epoch {epoch + 1})")
        st = p.stats
        if st["annealing"] and not self._annealing_logged:
            self._annealing_logged = True
            trainer.log(
                "dynamic_anneal", message="full data from here on", epochs_left=trainer.cfg.train.epochs - epoch
            )
        return p

    def per_sample_loss(self, trainer: Trainer, loss: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Record the batch's losses (device scatter, skipping non-finite ones) and apply the plan's weights."""
        idx = index.to(loss.device, non_blocking=True).long()
        val = loss.detach().float()
        ok = torch.isfinite(val)
        self._loss_sum.index_put_((idx,), torch.where(ok, val, torch.zeros_like(val)), accumulate=True)
        self._loss_count.index_put_((idx,), ok.float(), accumulate=True)
        return loss * self._weights[idx].to(loss.dtype)

    def _merge_losses(self, trainer: Trainer) -> None:
        """The epoch's losses (summed over ranks) into the pruner's scores; one host copy per epoch."""
        if trainer.dist.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(self._loss_sum)
            dist.all_reduce(self._loss_count)
        count = self._loss_count.cpu().numpy().astype(np.float64)
        if count.any():
            self.pruner.update(np.flatnonzero(count > 0), self._loss_sum.cpu().numpy()[count > 0] / count[count > 0])
        self._loss_sum.zero_()
        self._loss_count.zero_()

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        self._merge_losses(trainer)
        st = self.pruner.stats
        self.pruned_total += st["pruned"]
        metrics.update(
            dyn_kept=st["kept"],
            dyn_pruned=st["pruned"],
            dyn_below_mean=st.get("below_mean", 0),
            dyn_pruned_fraction=round(st["pruned"] / max(st["pool"], 1), 6),
            dyn_weight=st.get("weight", 1.0),
            dyn_annealing=st["annealing"],
        )
        if self._digests is not None:
            metrics["dyn_rank_digests"] = self._digests

    def on_fit_end(self, trainer: Trainer, summary: dict) -> None:
        total = self.pruner.pool.size if self.pruner.pool is not None else self.pruner.num_samples
        epochs = max(trainer.epoch, 1)
        summary["dynamic_pruning"] = {
            "rule": self.cfg.rule,
            "ratio": self.cfg.ratio,
            "anneal": self.anneal,
            "pruned_total": int(self.pruned_total),
            "saved_fraction": round(self.pruned_total / (total * epochs), 6),
        }
        if self.cfg.export_ticket and trainer.write and trainer.dist.is_main:
            path = os.path.join(trainer.run_dir, "dynamic_ticket.npz")
            ticket = self.pruner.to_ticket(
                dataset=trainer.train_set,
                labels=trainer.labels_train,
                extra={"run_dir": os.path.abspath(trainer.run_dir), "config": trainer.cfg.name},
            )
            ticket.save(path)
            summary["dynamic_pruning"]["ticket"] = os.path.abspath(path)
            trainer.log(
                "dynamic_ticket",
                file=os.path.abspath(path),
                count=ticket.count,
                fraction=round(float(ticket.fraction), 6),
            )

    def state_dict(self) -> dict:
        if self.pruner is None:
            return dict(self._pending or {})
        return {
            "pruner": self.pruner.state_dict(),
            "pruned_total": int(self.pruned_total),
            "annealing_logged": self._annealing_logged,
        }

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state) if state else None
