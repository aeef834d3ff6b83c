"""Dynamic data pruning and patch tickets inside lotus training (``tickets.dynamic`` / ``tickets.patches``).

``tickets.dynamic`` (InfoBatch-style, :class:`data_tickets.DynamicPruner`): every sample's score is its last
seen training loss. Each epoch the loop skips ``round(ratio * |B|)`` random samples of B, the samples whose
score is below the mean, and multiplies the loss of the kept samples of B by ``1 / (1 - ratio)``; the last
``anneal`` fraction of the epochs trains on all data. ``ratio`` is therefore the fraction of the
*below-mean* samples skipped, not of the dataset (the skipped dataset fraction is logged each epoch as
``dyn_pruned_fraction``). It composes with ``tickets.file`` (pruning acts inside the ticket's subset) and
with multi-rank runs (scores are merged across ranks every epoch).

``tickets.patches`` (patch tickets): the ViT trains on the ``keep_rate`` share of each image's patches
that a scorer ranks highest: the CLS attention (last block or rollout, mean over heads) of the model being
trained (``source: online``), or rankings stored in a ticket file (``source: file``, from
:meth:`data_tickets.PatchTicket.compute`); ``scorer: random`` is the baseline with the same keep rate.
Blocks really run on ``prefix + K`` tokens (timm's ``patch_drop`` slot holds a
:class:`data_tickets.patches.KeptPatchTokens`); evaluation always uses all patches. ``schedule`` sets the
keep rate by epoch (``[[epoch, keep_rate], ...]``, ``schedule_mode`` step or linear), e.g. full tokens for a
warm-up so the attention means something before it is used, and again at the end so the model adapts to
full-token inputs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from lotus.errors import ConfigError, LotusError

if TYPE_CHECKING:
    from lotus.config import Config
    from lotus.train import Trainer

__all__ = ["DynamicConfig", "PatchConfig", "DynamicPruningCallback", "PatchTicketsCallback", "callbacks",
           "make_patch_ticket_file"]

_MAX_STATE_RANK_BYTES = 256 * 2**20  # online patch rankings up to this size go into state.pt (exact resume)


@dataclass
class DynamicConfig:
    """``tickets.dynamic``: InfoBatch-style dynamic data pruning (see the module docstring for ``ratio``)."""

    enabled: bool = False
    ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "max_exclusive": True})
    anneal: float = field(default=0.125, metadata={"min": 0.0, "max": 1.0})
    seed: int | None = None  # default: train.seed
    export_ticket: bool = False  # write <run_dir>/dynamic_ticket.npz (final kept set + last losses) at the end


@dataclass
class PatchConfig:
    """``tickets.patches``: train on the most informative ``keep_rate`` share of each image's patches."""

    enabled: bool = False
    keep_rate: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "min_exclusive": True})
    schedule: list[list[float]] = field(default_factory=list)  # [[epoch, keep_rate], ...]; overrides keep_rate
    schedule_mode: Literal["step", "linear"] = "step"
    scorer: Literal["cls_attention", "random"] = "cls_attention"
    source: Literal["online", "file"] = "online"
    file: str | None = None  # ticket .npz with patch_indices (source: file)
    rollout: bool = False  # attention rollout over all blocks instead of the last block
    refresh_every: int = field(default=1, metadata={"min": 0})  # epochs between re-scoring; 0 = every batch
    seed: int | None = None  # random scorer seed; default train.seed

    def check(self, prefix: str) -> None:
        if self.schedule:
            from data_tickets.patches import KeepRateSchedule

            try:
                KeepRateSchedule(self.schedule, self.schedule_mode)
            except ValueError as e:
                raise ConfigError(f"{prefix}.{e}") from None
        if self.source == "file":
            if not self.file:
                raise ConfigError(f"{prefix}.file: required with {prefix}.source: file (a ticket .npz with patch tickets)")
            if not str(self.file).endswith(".npz"):
                raise ConfigError(f"{prefix}.file: expected a ticket .npz file, got {self.file!r}")
            if self.scorer == "random":
                raise ConfigError(f"{prefix}.scorer: 'random' draws fresh patches online every epoch; "
                                  f"use source: online (the file already fixes the patches)")
        elif self.file is not None:
            raise ConfigError(f"{prefix}.file: only used with {prefix}.source: file (got source {self.source!r})")

    def keep_rate_schedule(self):
        from data_tickets.patches import KeepRateSchedule

        return KeepRateSchedule(self.schedule or [(0.0, self.keep_rate)], self.schedule_mode)


# ---------------------------------------------------------------------------------------------------------
class _DynamicPruning:
    """Callback body: the trainer iterates a :class:`data_tickets.DynamicPruner` and re-weights losses."""

    order = -50  # after TicketSubset (-100), which sets trainer.subset; before patch tickets

    def __init__(self, cfg: DynamicConfig, seed: int):
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.pruner = None
        self._pending: dict | None = None
        self.pruned_total = 0
        self._annealing_logged = False

    def on_fit_start(self, trainer: "Trainer") -> None:
        from data_tickets import DynamicPruner

        n = len(trainer.train_set)
        self.pruner = DynamicPruner(n, ratio=self.cfg.ratio, num_epochs=trainer.cfg.train.epochs,
                                    anneal=self.cfg.anneal, seed=self.seed)
        if self._pending:
            try:
                self.pruner.load_state_dict(self._pending["pruner"])
            except (ValueError, KeyError) as e:
                raise LotusError(f"tickets.dynamic: cannot resume the pruner state ({e})") from None
            self.pruned_total = int(self._pending.get("pruned_total", 0))
            self._annealing_logged = bool(self._pending.get("annealing_logged", False))
        trainer.log("dynamic_pruning", ratio=self.cfg.ratio, anneal=self.cfg.anneal, seed=self.seed,
                    prune_epochs=self.pruner.prune_epochs, train_size=n)

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        p = self.pruner
        subset = None if trainer.subset is None else np.asarray(trainer.subset)
        if (subset is None) != (p.pool is None) or (subset is not None and not np.array_equal(np.unique(subset), p.pool)):
            p.set_indices(subset)
        p.set_epoch(epoch)
        trainer.sampler = p
        st = p.stats
        if st["annealing"] and not self._annealing_logged:
            self._annealing_logged = True
            trainer.log("dynamic_anneal", message="full data from here on", epochs_left=trainer.cfg.train.epochs - epoch)

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
            "ratio": self.cfg.ratio, "anneal": self.cfg.anneal, "pruned_total": int(self.pruned_total),
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


# ---------------------------------------------------------------------------------------------------------
class _PatchTickets:
    """Callback body: wraps ``trainer.forward`` so the model sees only each image's kept patch tokens."""

    order = -40  # after dynamic pruning (so only this epoch's kept samples need scoring)

    def __init__(self, cfg: PatchConfig, seed: int):
        from data_tickets import PatchTicket

        self.cfg = cfg
        self.schedule = cfg.keep_rate_schedule()
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.ticket = PatchTicket(keep_rate=self.schedule.min_rate, scorer=cfg.scorer, rollout=cfg.rollout,
                                  seed=self.seed)
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
    def on_fit_start(self, trainer: "Trainer") -> None:
        from data_tickets.patches import apply_patch_tickets

        from lotus.models import unwrap

        model = unwrap(trainer.model)
        try:
            self.kept_module = apply_patch_tickets(model)
        except ValueError as e:
            raise LotusError(f"tickets.patches: {e}") from None
        self.num_patches = int(model.patch_embed.num_patches)
        if getattr(model, "dynamic_img_size", False):
            raise LotusError("tickets.patches: models built with dynamic_img_size are not supported in training "
                             "(patch rankings need a fixed grid)")
        if self.cfg.scorer == "cls_attention" and self.cfg.source == "online" and getattr(model, "cls_token", None) is None:
            raise LotusError(f"tickets.patches.scorer: cls_attention needs a model with a class token "
                             f"({trainer.cfg.model.name} has none); use scorer: random or a ticket file")
        n = len(trainer.train_set)
        if self.cfg.source == "file":
            self._load_file(trainer)
        elif self._pending and "rank" in self._pending:
            self.rank = self._pending["rank"].numpy()
            self.scored = self._pending["scored"].numpy().astype(bool)
            self.rank_epoch = int(self._pending.get("rank_epoch", -1))
            if self.rank.shape[0] != n:
                raise LotusError(f"tickets.patches: saved patch rankings are for {self.rank.shape[0]} samples, "
                                 f"the train split has {n}")
        if self._pending:
            self.refresh_seconds = float(self._pending.get("refresh_seconds", 0.0))
        prev = trainer.forward

        def forward(model: torch.nn.Module, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            keep = self.keep_indices(trainer, images, index)
            if keep is None:
                return prev(model, images, index)
            with self.kept_module.keep(keep):
                return prev(model, images, index)

        trainer.forward = forward
        trainer.log("patch_tickets", source=self.cfg.source, scorer=self.cfg.scorer, rollout=self.cfg.rollout,
                    keep_rate=self.cfg.keep_rate if not self.cfg.schedule else None,
                    schedule=[list(p) for p in self.schedule.points], num_patches=self.num_patches,
                    refresh_every=self.cfg.refresh_every if self.cfg.source == "online" else None,
                    file=os.path.abspath(self.cfg.file) if self.cfg.file else None)

    def _load_file(self, trainer: "Trainer") -> None:
        from data_tickets import PatchTicket

        from lotus.tickets import load_ticket

        ticket = load_ticket(self.cfg.file, key="tickets.patches.file")
        try:
            ticket.validate_against(trainer.train_set, labels=trainer.labels_train)
            rank = PatchTicket.rank_from_ticket(ticket, self.num_patches, keep_rate=self.schedule.min_rate)
        except ValueError as e:
            raise LotusError(f"tickets.patches.file: {e}") from None
        if rank.shape[0] != len(trainer.train_set):
            raise LotusError(f"tickets.patches.file: {self.cfg.file} has patch tickets for {rank.shape[0]} samples, "
                             f"the train split has {len(trainer.train_set)}")
        self.rank = rank
        self.scored = np.ones(rank.shape[0], dtype=bool)

    # ---------------------------------------------------------------- per epoch
    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        from data_tickets.patches import num_kept

        self.epoch = epoch
        rate = float(self.schedule(epoch))
        if rate != self.keep_rate or epoch == 0 or self.k == 0:
            trainer.log("keep_rate", keep_rate=round(rate, 6), kept_patches=num_kept(self.num_patches, rate),
                        num_patches=self.num_patches)
        self.keep_rate = rate
        self.k = num_kept(self.num_patches, rate)
        if self.k >= self.num_patches:
            return
        if self.cfg.source == "online" and self.cfg.scorer == "cls_attention" and self.cfg.refresh_every > 0:
            stale = self.rank is None or self.rank_epoch < 0 or epoch - self.rank_epoch >= self.cfg.refresh_every
            if stale:
                self._refresh(trainer, epoch)

    @torch.no_grad()
    def _refresh(self, trainer: "Trainer", epoch: int) -> None:
        """Rank the patches of this epoch's samples with the current model (un-augmented images)."""
        from lotus.data import batches
        from lotus.models import unwrap

        n = len(trainer.train_set)
        sampler = trainer.sampler
        if self.cfg.refresh_every == 1 and hasattr(sampler, "kept_indices"):
            idx = np.asarray(sampler.kept_indices())  # dynamic pruning: only what this epoch trains on
        elif trainer.subset is not None:
            idx = np.unique(np.asarray(trainer.subset))
        else:
            idx = np.arange(n)
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

    def keep_indices(self, trainer: "Trainer", images: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """Kept patch indices ``(B, K)`` for a training batch, or ``None`` for all patches."""
        from data_tickets.patches import _keep_from_rank, random_patch_scores, rank_patches

        from lotus.models import unwrap

        if self.k == 0 or self.k >= self.num_patches:
            return None
        if self.cfg.scorer == "random" and self.cfg.source == "online":
            scores = random_patch_scores(index, self.num_patches, seed=self.seed, epoch=self.epoch)
            return _keep_from_rank(rank_patches(scores), self.k).to(images.device)
        if self.cfg.source == "online" and self.cfg.refresh_every == 0:
            with trainer.autocast():
                rank = self.ticket.rank(unwrap(trainer.model), images)
            return _keep_from_rank(rank, self.k)
        rows = index.cpu().numpy()
        rank = torch.from_numpy(self.rank[rows].astype(np.int64))
        missing = ~self.scored[rows]
        if missing.any():  # a sample the last refresh did not cover (e.g. pruned then): rank it now
            sel = torch.from_numpy(np.flatnonzero(missing))
            with trainer.autocast():
                fresh = self.ticket.rank(unwrap(trainer.model), images[sel.to(images.device)]).cpu()
            rank[sel] = fresh[:, : rank.shape[1]]
        return _keep_from_rank(rank, self.k).to(images.device)

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict) -> None:
        metrics.update(patch_keep_rate=round(self.keep_rate, 6), patch_kept=min(self.k, self.num_patches))

    def on_fit_end(self, trainer: "Trainer", summary: dict) -> None:
        summary["patch_tickets"] = {"source": self.cfg.source, "scorer": self.cfg.scorer,
                                    "schedule": [list(p) for p in self.schedule.points],
                                    "num_patches": self.num_patches, "refresh_seconds": round(self.refresh_seconds, 4)}

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


# ---------------------------------------------------------------------------------------------------------
def make_patch_ticket_file(cfg: "Config", out: str, checkpoint: str | None = None, rollout: bool = False,
                           keep_rate: float = 1.0, batch_size: int | None = None, progress: bool = True):
    """Rank the patches of every train-split image of ``cfg`` with a scorer ViT and save a ticket file.

    The scorer is ``cfg.model`` with the weights of ``checkpoint`` (e.g. ``runs/x/best.safetensors``; without
    one the untrained model is used, which is rarely what you want). ``keep_rate`` < 1 stores only the best
    ``keep_rate`` share of each image's patches (smaller file; training may then use at most that rate).
    The file holds every train index, the rankings (``patch_indices``) and the train split's fingerprint;
    train on it with ``tickets.patches: {enabled: true, source: file, file: OUT}``. Returns the TicketFile.
    """
    from data_tickets import PatchTicket
    from data_tickets.patches import num_kept

    from lotus.checkpoint import load_weights
    from lotus.data import build_datasets
    from lotus.models import create_model
    from lotus.train import resolve_img_size

    if not str(out).endswith(".npz"):
        raise LotusError(f"--out: expected a .npz ticket file name, got {out!r}")
    bundle = build_datasets(cfg.data, resolve_img_size(cfg), cfg.model.in_chans)
    model = create_model(cfg.model, bundle.num_classes, bundle.in_chans, bundle.img_size)
    if checkpoint:
        load_weights(model, checkpoint)
    if getattr(model, "cls_token", None) is None:
        raise LotusError(f"model.name: patch tickets rank patches by CLS attention; {cfg.model.name} has no class token")
    n = int(model.patch_embed.num_patches)
    ticket = PatchTicket(keep_rate=keep_rate, rollout=rollout, seed=cfg.train.seed)
    rank = ticket.compute(model, bundle.train, batch_size=batch_size or cfg.data.eval_batch_size,
                          store=num_kept(n, keep_rate), progress=progress)
    tf = ticket.to_ticket(rank, num_patches=n, dataset=bundle.train, labels=bundle.labels_train,
                          extra={"config": cfg.name, "model": cfg.model.name,
                                 "checkpoint": os.path.abspath(checkpoint) if checkpoint else None})
    tf.proxy = {"model": cfg.model.name, "checkpoint": os.path.abspath(checkpoint) if checkpoint else None}
    tf.save(out)
    return tf


_LAZY = {"DynamicPruningCallback": _DynamicPruning, "PatchTicketsCallback": _PatchTickets}


def __getattr__(name: str) -> Any:
    """``DynamicPruningCallback``/``PatchTicketsCallback``: the bodies above mixed with ``lotus.train.Callback``.

    Built on first use because ``lotus.train`` imports ``lotus.config``, which imports this module.
    """
    if name in _LAZY:
        from lotus.train import Callback

        cls = type(name, (_LAZY[name], Callback), {"__module__": __name__, "__doc__": _LAZY[name].__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def callbacks(cfg: "Config") -> list:
    """The training callbacks ``cfg.tickets.dynamic`` and ``cfg.tickets.patches`` ask for."""
    out = []
    t = cfg.tickets
    if t.dynamic.enabled:
        out.append(__getattr__("DynamicPruningCallback")(t.dynamic, cfg.train.seed))
    if t.patches.enabled:
        out.append(__getattr__("PatchTicketsCallback")(t.patches, cfg.train.seed))
    return out
