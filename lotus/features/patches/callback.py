"""Patch tickets in lotus training (``tickets.patches``).

The ViT trains on the ``keep_rate`` share of each image's patches that a scorer ranks highest: the CLS
attention (last block or rollout, mean over heads) of the model being trained (``source: online``), or
rankings stored in a ticket file (``source: file``, from :meth:`data_tickets.PatchTicket.compute`);
``scorer: random`` is the baseline with the same keep rate. Blocks really run on ``prefix + K`` tokens
(timm's ``patch_drop`` slot holds a kept-token module); evaluation always uses all patches. The keep rate per
epoch comes from the run's :class:`lotus.features.schedule.phases.Schedule` (``schedule`` points, or the
``schedule:`` phases: full tokens during warm-up so the attention means something before it is used, and again
at the end so the model adapts to full-token inputs).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from data_tickets import KeepRateSchedule, PatchTicket, apply_patch_tickets
from data_tickets.attention import capture_attention
from data_tickets.keep_rate import num_kept
from data_tickets.kept_tokens import patch_count
from data_tickets.patches import random_patch_scores
from lotus.callbacks import Callback, Forward, Trainer
from lotus.data import batches
from lotus.errors import LotusError
from lotus.features.patches.config import PatchConfig
from lotus.features.tickets.callback import load_ticket
from lotus.models import unwrap

__all__ = ["PatchTicketsCallback"]

_MAX_STATE_RANK_BYTES = 256 * 2**20  # online patch rankings up to this size go into state.pt (exact resume)


class PatchTicketsCallback(Callback):
    """Owns the training forward: wraps it so the model sees only each image's kept patch tokens."""

    def __init__(self, cfg: PatchConfig, seed: int, keep_rates: KeepRateSchedule):
        self.cfg = cfg
        self.schedule = keep_rates  # from the run's Schedule
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.ticket = PatchTicket(
            keep_rate=self.schedule.min_rate, scorer=cfg.scorer, rollout=cfg.rollout, seed=self.seed
        )
        self.rank: np.ndarray | None = None  # (train size, stored patches) ranking, best first
        self.scored: np.ndarray | None = None  # rows of `rank` that hold a ranking
        self.rank_epoch = -1
        self.keep_rate = 1.0
        self.k = 0
        self.epoch = 0
        self.num_patches = 0
        self.kept_module = None
        self.refresh_seconds = 0.0
        self._pending: dict | None = None

    # ---------------------------------------------------------------- set-up
    def on_fit_start(self, trainer: Trainer) -> None:
        model = unwrap(trainer.model)
        try:
            self.kept_module = apply_patch_tickets(model)
        except ValueError as e:
            raise LotusError(f"tickets.patches: {e}") from None
        self.num_patches = int(model.patch_embed.num_patches)
        if getattr(model, "dynamic_img_size", False) and not (
            self.cfg.scorer == "random" and self.cfg.source == "online"
        ):
            raise LotusError(
                "tickets.patches: models built with dynamic_img_size train only with scorer: random "
                "(patch rankings need a fixed grid)"
            )
        if (
            self.cfg.scorer == "cls_attention"
            and self.cfg.source == "online"
            and getattr(model, "cls_token", None) is None
        ):
            raise LotusError(
                f"tickets.patches.scorer: cls_attention needs a model with a class token "
                f"({trainer.cfg.model.name} has none); use scorer: random or a ticket file"
            )
        if self.cfg.scorer == "cls_attention" and self.cfg.source == "online":
            try:  # the scorer reads each block's fused qkv: check now, not at the first refresh
                with capture_attention(model, [-1]):
                    pass
            except ValueError as e:
                raise LotusError(f"tickets.patches.scorer: {e}; use scorer: random") from None
        n = len(trainer.train_set)
        if self.cfg.source == "file":
            self._load_file(trainer)
        elif self._pending and "rank" in self._pending:
            self.rank = self._pending["rank"].numpy()
            self.scored = self._pending["scored"].numpy().astype(bool)
            self.rank_epoch = int(self._pending.get("rank_epoch", -1))
            if self.rank.shape[0] != n:
                raise LotusError(
                    f"tickets.patches: saved patch rankings are for {self.rank.shape[0]} samples, "
                    f"the train split has {n}"
                )
        if self._pending:
            self.refresh_seconds = float(self._pending.get("refresh_seconds", 0.0))
        if not trainer.restored:  # logged once per run, not again on resume
            trainer.log(
                "patch_tickets",
                source=self.cfg.source,
                scorer=self.cfg.scorer,
                rollout=self.cfg.rollout,
                keep_rate=self.cfg.keep_rate if not self.cfg.schedule else None,
                schedule=[list(p) for p in self.schedule.points],
                num_patches=self.num_patches,
                refresh_every=self.cfg.refresh_every if self.cfg.source == "online" else None,
                file=os.path.abspath(self.cfg.file) if self.cfg.file else None,
            )

    def on_model_thinned(self, trainer: Trainer, report: dict) -> None:
        # under DDP / FSDP2 thinning swaps in a rebuilt model: give it the kept-token slot again (in place: no-op)
        self.kept_module = apply_patch_tickets(unwrap(trainer.model))

    def wrap_forward(self, trainer: Trainer, forward: Forward) -> Forward:
        def kept_forward(model: torch.nn.Module, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            keep = self.keep_indices(trainer, images, index)
            if keep is None:
                return forward(model, images, index)
            with self.kept_module.keep(keep):
                return forward(model, images, index)

        return kept_forward

    def _load_file(self, trainer: Trainer) -> None:
        ticket = load_ticket(self.cfg.file, key="tickets.patches.file")
        try:
            ticket.validate_against(trainer.train_set, labels=trainer.labels_train)
            rank = PatchTicket.rank_from_ticket(ticket, self.num_patches, keep_rate=self.schedule.min_rate)
        except ValueError as e:
            raise LotusError(f"tickets.patches.file: {e}") from None
        if rank.shape[0] != len(trainer.train_set):
            raise LotusError(
                f"tickets.patches.file: {self.cfg.file} has patch tickets for {rank.shape[0]} samples, "
                f"the train split has {len(trainer.train_set)}"
            )
        self.rank = rank
        self.scored = np.ones(rank.shape[0], dtype=bool)

    # ---------------------------------------------------------------- per epoch
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.epoch = epoch
        rate = float(self.schedule(epoch))
        if epoch == 0 or rate != float(self.schedule(epoch - 1)):  # a function of the epoch: no repeat on resume
            trainer.log(
                "keep_rate",
                keep_rate=round(rate, 6),
                kept_patches=num_kept(self.num_patches, rate),
                num_patches=self.num_patches,
            )
        self.keep_rate = rate
        self.k = num_kept(self.num_patches, rate)
        if self.k >= self.num_patches:
            return
        if self.cfg.source == "online" and self.cfg.scorer == "cls_attention" and self.cfg.refresh_every > 0:
            stale = self.rank is None or self.rank_epoch < 0 or epoch - self.rank_epoch >= self.cfg.refresh_every
            if stale:
                self._refresh(trainer, epoch)

    def refresh_indices(self, trainer: Trainer) -> np.ndarray:
        """The train-set indices a refresh ranks now: this epoch's kept samples under dynamic pruning with a
        refresh every epoch, else the selected subset, else the whole train split."""
        sampler = trainer.sampler
        if self.cfg.refresh_every == 1 and hasattr(sampler, "kept_indices"):
            return np.asarray(sampler.kept_indices())  # dynamic pruning: only what this epoch trains on
        if trainer.subset is not None:
            return np.unique(np.asarray(trainer.subset))
        return np.arange(len(trainer.train_set))

    @torch.no_grad()
    def _refresh(self, trainer: Trainer, epoch: int) -> None:
        """Rank the patches of this epoch's samples with the current model (un-augmented images)."""
        n = len(trainer.train_set)
        idx = self.refresh_indices(trainer)
        if self.rank is None or self.rank.shape != (n, self.num_patches):
            dtype = np.int16 if self.num_patches <= np.iinfo(np.int16).max else np.int32
            self.rank = np.zeros((n, self.num_patches), dtype=dtype)
        self.scored = np.zeros(n, dtype=bool)
        model = unwrap(trainer.model)
        t0 = time.perf_counter()
        bs = trainer.cfg.data.eval_batch_size
        for x, _, i in batches(trainer.train_set, idx, bs, trainer.cfg.data.num_workers):
            x = x.to(trainer.device, non_blocking=True)
            with trainer.autocast():
                r = self.ticket.rank(model, x, index=i, epoch=epoch)
            rows = i.numpy()
            self.rank[rows] = r.cpu().numpy().astype(self.rank.dtype)
            self.scored[rows] = True
        dt = time.perf_counter() - t0
        self.refresh_seconds += dt
        self.rank_epoch = epoch
        trainer.log("patch_refresh", samples=int(idx.size), seconds=round(dt, 4), keep_rate=round(self.keep_rate, 6))

    def keep_indices(self, trainer: Trainer, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """Kept patch indices ``(B, K)`` for a training batch, or ``None`` for all patches."""
        if self.k == 0 or self.k >= self.num_patches:
            return None
        if self.cfg.scorer == "random" and self.cfg.source == "online":  # the batch's own grid (resolution)
            n = patch_count(unwrap(trainer.model), images)
            k = self.k if n == self.num_patches else num_kept(n, self.keep_rate)
            if k >= n:
                return None
            scores = random_patch_scores(index, n, seed=self.seed, epoch=self.epoch)
            return PatchTicket.keep_from_scores(scores, k).to(images.device)
        if self.cfg.source == "online" and self.cfg.refresh_every == 0:
            with trainer.autocast():
                rank = self.ticket.rank(unwrap(trainer.model), images)
            return PatchTicket.keep_from_rank(rank, self.k)
        rows = index.cpu().numpy()
        rank = torch.from_numpy(self.rank[rows].astype(np.int64))
        missing = ~self.scored[rows]
        if missing.any():  # a sample the last refresh did not cover (e.g. pruned then): rank it now
            sel = torch.from_numpy(np.flatnonzero(missing))
            with trainer.autocast():
                fresh = self.ticket.rank(unwrap(trainer.model), images[sel.to(images.device)]).cpu()
            rank[sel] = fresh[:, : rank.shape[1]]
        return PatchTicket.keep_from_rank(rank, self.k).to(images.device)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        metrics.update(patch_keep_rate=round(self.keep_rate, 6), patch_kept=min(self.k, self.num_patches))

    def on_fit_end(self, trainer: Trainer, summary: dict) -> None:
        summary["patch_tickets"] = {
            "source": self.cfg.source,
            "scorer": self.cfg.scorer,
            "schedule": [list(p) for p in self.schedule.points],
            "num_patches": self.num_patches,
            "refresh_seconds": round(self.refresh_seconds, 4),
        }

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"rank_epoch": int(self.rank_epoch), "refresh_seconds": float(self.refresh_seconds)}
        if self.cfg.source == "online" and self.rank is not None and self.rank.nbytes <= _MAX_STATE_RANK_BYTES:
            state["rank"] = torch.from_numpy(self.rank.copy())
            state["scored"] = torch.from_numpy(self.scored.copy())
        elif self.cfg.source == "online":
            state["rank_epoch"] = -1  # too large to store: re-score on resume
        return state

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state) if state else None
