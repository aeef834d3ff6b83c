"""The controller of ``lotus.schedule: auto``: measures signals at each epoch end and records decisions.

Signals (see :mod:`lotus.features.schedule.auto` for the decision table): the epoch's mean train loss and
val accuracy (from the epoch metrics), the last-seen per-sample losses of the dynamic pruner, the CLS
attention of the model (:func:`data_tickets.patches.patch_attention`) and the loss of thinned copies of the
model (:func:`pruning.prune_structured` on a copy; the live model is thinned by the pruning feature at the
decided epoch). Probes run on ``lotus.auto.probe_batches`` fixed, un-augmented train batches; their time
counts as training time (``wall_s``). Each decision is logged as an ``auto_decision`` event with its signal,
measured value, threshold and reason; the decision list is this callback's checkpoint state.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

import pruning
from data_tickets import DynamicPruner
from data_tickets.keep_rate import num_kept
from data_tickets.patches import patch_attention
from lotus.callbacks import Callback, Trainer
from lotus.data import batches
from lotus.errors import library_error
from lotus.features.pruning.callback import PruningCallback
from lotus.features.schedule.auto import AutoState, dynamic_ratio_signal

__all__ = ["AutoScheduleCallback"]


class AutoScheduleCallback(Callback):
    """Decides the phases, dynamic ratio, patch keep rate and thinning of an auto-scheduled run."""

    def __init__(self, cfg: Any, state: AutoState):
        self.cfg = cfg  # the run's lotus.config.Config
        self.a = cfg.lotus.auto
        self.state = state  # shared with the run's Schedule, which plans from it
        self.prev_loss: float | None = None
        self.best_acc = -math.inf
        self.since_best = 0
        self.seconds = 0.0
        self._probe: list | None = None

    # ------------------------------------------------------------------ helpers
    def _probe_batches(self, trainer: "Trainer") -> list:
        """``probe_batches`` fixed training batches (seeded, no augmentation), cached for the run."""
        if self._probe is None:
            bs = trainer.cfg.data.batch_size
            g = torch.Generator().manual_seed(trainer.cfg.train.seed + 104729)
            idx = torch.randperm(len(trainer.train_set), generator=g)[: self.a.probe_batches * bs].numpy()
            self._probe = [(x, y) for x, y, _ in batches(trainer.train_set, idx, bs, trainer.cfg.data.num_workers)]
        return self._probe

    @torch.no_grad()
    def _probe_loss(self, trainer: "Trainer", model: torch.nn.Module) -> float:
        total, n = 0.0, 0
        for x, y in self._probe_batches(trainer):
            x, y = x.to(trainer.device), y.to(trainer.device)
            with trainer.autocast():
                logits = model(x)
            total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            n += len(y)
        return total / max(n, 1)

    def _decide(self, trainer: "Trainer", what: str, value: Any, signal: str, measured: float | None,
                threshold: float | None, reason: str, made: list) -> None:
        d = {"what": what, "from_epoch": trainer.epoch + 1, "value": value, "signal": signal,
             "measured": None if measured is None else round(float(measured), 6),
             "threshold": None if threshold is None else round(float(threshold), 6), "reason": reason}
        self.state.record(d)
        trainer.log("auto_decision", **d)
        made.append(what)

    # ------------------------------------------------------------------ signals
    def _phases(self, trainer: "Trainer", epoch: int, metrics: dict, made: list) -> None:
        a, st = self.a, self.state
        nxt = epoch + 1
        loss = float(metrics["train_loss"])
        if st.phase(epoch) == "warmup" and st.reduce_start is None:
            # epoch over epoch: the first epoch's mean includes the untrained start, so it is never a signal
            gain = (self.prev_loss - loss) / self.prev_loss if self.prev_loss else None
            if gain is not None and gain < a.warmup_improvement:
                self._decide(trainer, "reduce", nxt, "train_loss_improvement", gain, a.warmup_improvement,
                             f"the train loss fell by {gain:.1%} this epoch, less than the threshold: no fast "
                             "initial descent left to protect", made)
            elif nxt >= st.latest_reduce:
                self._decide(trainer, "reduce", nxt, "warmup_budget", epoch + 1, st.latest_reduce,
                             "lotus.auto.max_warmup of the budget spent", made)
        self.prev_loss = loss
        acc = metrics.get("val_acc")
        if acc is not None:
            if acc > self.best_acc + a.plateau_delta:
                self.best_acc, self.since_best = float(acc), 0
            elif st.phase(epoch) == "reduce":
                self.since_best += 1
        if st.phase(epoch) == "reduce" and st.anneal_start is None:
            if self.since_best >= a.plateau_patience:
                self._decide(trainer, "anneal", nxt, "epochs_without_val_gain", self.since_best, a.plateau_patience,
                             f"val accuracy plateaued at {self.best_acc:.4f}", made)
            elif nxt >= st.latest_anneal:
                self._decide(trainer, "anneal", nxt, "anneal_budget", epoch + 1, st.latest_anneal,
                             "lotus.auto.anneal_share of the budget reserved for the anneal", made)

    def _dynamic(self, trainer: "Trainer", made: list) -> None:
        p = trainer.sampler
        if not isinstance(p, DynamicPruner):
            return
        pool = p.pool if p.pool is not None else slice(None)
        scores = p.scores[pool][p.seen[pool]].astype("float64")
        if scores.size < 2:
            return
        cap = float(self.cfg.tickets.dynamic.ratio)
        ratio, share, learned = dynamic_ratio_signal(scores, trainer.data.num_classes, cap, self.a.ratio_step,
                                                     self.a.learned_loss)
        measured = min(share, learned)
        current = self.state.ratios[-1][1] if self.state.ratios else 0.0
        if ratio != current:
            self._decide(trainer, "dynamic_ratio", ratio, "below_mean_loss_share_learned", measured, cap,
                         f"below-mean samples carry {share:.0%} less loss than the mean and {learned:.0%} of them "
                         "are learned (capped at tickets.dynamic.ratio)", made)

    def _keep_rate(self, trainer: "Trainer", made: list) -> None:
        floor = float(self.cfg.tickets.patches.keep_rate)
        current = self.state.keep_rates[-1][1] if self.state.keep_rates else 1.0
        if current <= floor:
            return
        model = trainer.unwrapped_model
        n = int(model.patch_embed.num_patches)
        cand = round(max(current - self.a.keep_rate_step, floor), 6)
        k = num_kept(n, cand)
        if k >= num_kept(n, current):
            return
        masses = []
        for x, _ in self._probe_batches(trainer):
            with trainer.autocast():
                att = patch_attention(model, x.to(trainer.device), rollout=self.cfg.tickets.patches.rollout).float()
            att = att / att.sum(dim=1, keepdim=True).clamp_min(1e-12)
            masses.append(att.topk(k, dim=1).values.sum(dim=1))
        mass = float(torch.cat(masses).mean())
        if mass >= self.a.attention_mass:
            self._decide(trainer, "keep_rate", cand, "cls_attention_mass_kept", mass, self.a.attention_mass,
                         f"the top {k} of {n} patches hold enough of the CLS attention", made)

    def _thin(self, trainer: "Trainer", epoch: int, made: list) -> None:
        """Thin once the largest candidate gives back at most ``thin_tolerance`` of what the model has learned
        (probe loss rise / (ln(classes) - probe loss)); at ``thin_by`` of the budget, the largest that does."""
        s = self.cfg.pruning.structured
        model = trainer.unwrapped_model
        owner = next(cb for cb in trainer.callbacks if isinstance(cb, PruningCallback))
        calib = owner.calib_batches(trainer) if s.importance != "magnitude" else None
        last_chance = epoch + 1 >= min(self.state.latest_anneal - 1,
                                       int(math.ceil(self.a.thin_by * self.state.epochs - 1e-9)))
        shares = sorted(set(self.a.thin_candidates), reverse=True)
        was = model.training
        model.eval()
        try:
            dense = self._probe_loss(trainer, model)
            learned = max(math.log(trainer.data.num_classes) - dense, 1e-3)
            for share in shares if last_chance else shares[:1]:
                heads, mlp = round(s.heads * share, 6), round(s.mlp * share, 6)
                trial = copy.deepcopy(model)
                try:
                    pruning.prune_structured(trial, dataclasses.replace(s.library(), heads=heads, mlp=mlp),
                                             calib_loader=calib)
                except ValueError as e:
                    raise library_error(e, {}, "pruning.structured") from None
                trial.eval()
                rise = (self._probe_loss(trainer, trial) - dense) / learned
                del trial
                if rise <= self.a.thin_tolerance:
                    self._decide(trainer, "thin", {"heads": heads, "mlp": mlp}, "probe_loss_rise_of_learned", rise,
                                 self.a.thin_tolerance, f"thinning to {share:g} of pruning.structured gives back "
                                 f"{max(rise, 0.0):.1%} of the loss learned so far (probe batches)", made)
                    return
        finally:
            model.train(was)

    # ------------------------------------------------------------------ hooks
    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict) -> None:
        if epoch + 1 >= self.state.epochs:
            return
        t0 = time.perf_counter()
        made: list[str] = []
        self._phases(trainer, epoch, metrics, made)
        if self.state.phase(epoch + 1) == "reduce":
            if self.cfg.tickets.dynamic.enabled:
                self._dynamic(trainer, made)
            if self.cfg.tickets.patches.enabled:
                self._keep_rate(trainer, made)
            if self.cfg.pruning.structured.enabled and self.state.thin is None:
                self._thin(trainer, epoch, made)
        dt = time.perf_counter() - t0
        self.seconds += dt
        trainer.wall = trainer.wall + dt  # probes are schedule work: they count as training time
        metrics["wall_s"] = round(trainer.wall, 4)
        metrics["auto_next_phase"] = self.state.phase(epoch + 1)
        if made:
            metrics["auto_decisions"] = made

    def on_fit_end(self, trainer: "Trainer", summary: dict) -> None:
        summary["auto_schedule"] = {"decisions": [dict(d) for d in self.state.decisions],
                                    "probe_seconds": round(self.seconds, 4)}

    def state_dict(self) -> dict:
        return {"decisions": [dict(d) for d in self.state.decisions], "prev_loss": self.prev_loss,
                "best_acc": self.best_acc if math.isfinite(self.best_acc) else None, "since_best": self.since_best,
                "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.state.load(list(state.get("decisions", [])))
        self.prev_loss = state.get("prev_loss")
        best = state.get("best_acc")
        self.best_acc = -math.inf if best is None else float(best)
        self.since_best = int(state.get("since_best", 0))
        self.seconds = float(state.get("seconds", 0.0))
