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

import contextlib
import copy
import dataclasses
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

import pruning
from data_tickets import DynamicPruner, PatchTicket
from data_tickets.keep_rate import num_kept
from data_tickets.patches import patch_attention, random_patch_scores
from lotus.callbacks import Callback, Trainer
from lotus.data import batches
from lotus.errors import library_error
from lotus.features.patches.callback import PatchTicketsCallback
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
        p = cfg.tickets.patches
        self.random_patches = bool(p.enabled and p.scorer == "random")  # no ranking: start low, raise on signal

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
    def _probe_loss(self, trainer: "Trainer", model: torch.nn.Module, keep: int | None = None) -> float:
        """Mean loss on the probe batches; with ``keep``, on that many random patches per image (seeded: the
        same draw at every call)."""
        total, n = 0.0, 0
        for b, (x, y) in enumerate(self._probe_batches(trainer)):
            x, y = x.to(trainer.device), y.to(trainer.device)
            kept = contextlib.nullcontext()
            if keep is not None:
                scores = random_patch_scores(torch.arange(len(x)) + b * len(x), int(model.patch_embed.num_patches),
                                             seed=trainer.cfg.train.seed + 7919, epoch=keep)
                kept = model.patch_drop.keep(PatchTicket.keep_from_scores(scores, keep).to(x.device))
            with kept, trainer.autocast():
                logits = model(x)
            total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            n += len(y)
        return total / max(n, 1)

    def _decide(self, trainer: "Trainer", what: str, value: Any, signal: str, measured: float | None,
                threshold: float | None, reason: str, made: list, from_epoch: int | None = None) -> None:
        d = {"what": what, "from_epoch": trainer.epoch + 1 if from_epoch is None else from_epoch, "value": value,
             "signal": signal,
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

    def _keep_rate(self, trainer: "Trainer", epoch_samples: int, made: list) -> None:
        """cls_attention: lower the keep rate one step while the top patches hold ``attention_mass`` of the CLS
        attention (after a pays-check at the first lowering)."""
        floor = float(self.cfg.tickets.patches.keep_rate)
        rates = self.state.keep_rates
        current = rates[-1][1] if rates else 1.0
        if current <= floor or (rates and current >= 1.0):  # at the floor, or ruled out: did not pay
            return
        model = trainer.unwrapped_model
        n = int(model.patch_embed.num_patches)
        cand = round(max(current - self.a.keep_rate_step, floor), 6)
        k = num_kept(n, cand)
        if k >= num_kept(n, current):
            return
        ladder = [cand]  # every rate this descent could still reach, highest first
        while ladder[-1] > floor:
            ladder.append(round(max(ladder[-1] - self.a.keep_rate_step, floor), 6))
        t0, seen = time.perf_counter(), sum(len(x) for x, _ in self._probe_batches(trainer))
        masses = self._attention_masses(trainer, sorted({num_kept(n, r) for r in ladder}))
        rank_s = (time.perf_counter() - t0) / max(seen, 1)  # one sample's ranking
        mass = masses[k]
        if mass < self.a.attention_mass:
            return
        pays = ""
        if not rates and self.a.patches_must_pay:  # timed on the lowest rate the attention allows now
            lowest = min(kk for kk, m in masses.items() if m >= self.a.attention_mass)
            saved, cost = self._patch_times(trainer, lowest, rank_s, epoch_samples)
            times = f"training on {lowest} of {n} patches would save {saved:.3g} s per epoch and re-ranking " \
                    f"them costs {cost:.3g} s per epoch"
            if saved <= cost:
                self._decide(trainer, "keep_rate", 1.0, "patch_seconds_saved_per_epoch", saved, cost,
                             f"{times}: patch tickets stay off", made)
                return
            pays = f" ({times})"
        self._decide(trainer, "keep_rate", cand, "cls_attention_mass_kept", mass, self.a.attention_mass,
                     f"the top {k} of {n} patches hold {mass:.1%} of the CLS attention{pays}", made)

    def _start_random_patches(self, trainer: "Trainer") -> None:
        """scorer: random, before the first epoch: the floor rate from epoch 0 (random patches need no scores,
        and an untrained model has learned nothing they could take away), unless a timed step on the floor's
        patches saves nothing over all patches (``patches_must_pay``)."""
        floor = float(self.cfg.tickets.patches.keep_rate)
        n = int(trainer.unwrapped_model.patch_embed.num_patches)
        k, made = num_kept(n, floor), []
        if self.a.patches_must_pay:
            saved, _ = self._patch_times(trainer, k, 0.0, len(trainer.train_set))
            times = f"training on {k} of {n} random patches saves {saved:.3g} s per epoch (timed steps)"
            if saved <= 0.0:
                self._decide(trainer, "keep_rate", 1.0, "patch_seconds_saved_per_epoch", saved, 0.0,
                             f"{times}: patch tickets stay off", made, from_epoch=0)
                return
        else:
            times = "the time saved is not checked (lotus.auto.patches_must_pay: false)"
        self._decide(trainer, "keep_rate", floor, "random_patches_at_start", None, None,
                     f"{k} of {n} random patches from the start: {times}; the keep rate rises when the probe "
                     "says the model needs more", made, from_epoch=0)

    def _raise_random_keep_rate(self, trainer: "Trainer", epoch: int, metrics: dict, prev_loss: float | None,
                                made: list) -> None:
        """scorer: random: raise the keep rate (rungs ``keep_rate_step`` apart, up to all patches) when, once the
        probe batches are learned (loss < ``learned_loss`` x ln(classes)), the model gives back more than
        ``keep_tolerance`` of the loss it has learned on the current number of random patches (to the lowest
        rung within it), or when the epoch's train loss on them fell by less than ``keep_stall`` of the epoch
        before's (one rung: what the model can still learn from that many patches is learned; checked once the
        probe batches are learned or the epoch before was in the reduced phase, whichever comes first: on hard
        data the loss can stall on few patches long before it is learned). Never lowered again."""
        rates = self.state.keep_rates
        current = rates[-1][1] if rates else 1.0
        if current >= 1.0:
            return
        model = trainer.unwrapped_model
        n = int(model.patch_embed.num_patches)
        ladder = [current]
        while ladder[-1] < 1.0:
            ladder.append(round(min(ladder[-1] + self.a.keep_rate_step, 1.0), 6))
        k = num_kept(n, current)
        full, rise = self._random_keep_rises(trainer, [k], gate=self.a.learned_loss * math.log(trainer.data.num_classes))
        if not rise and self.state.phase(epoch - 1) != "reduce":
            return  # too early to tell: nothing learned on the probe batches, and the warm-up just ended
        if rise:
            metrics["auto_keep_rise"] = round(rise[k], 6)
        if rise and rise[k] > self.a.keep_tolerance:
            to = 1.0
            for r in ladder[1:-1]:  # probed one rung at a time, lowest first: the first within tolerance
                kk = num_kept(n, r)
                if self._random_keep_rises(trainer, [kk], full=full)[1][kk] <= self.a.keep_tolerance:
                    to = r
                    break
            self._decide(trainer, "keep_rate", to, "random_keep_loss_rise_of_learned", rise[k], self.a.keep_tolerance,
                         f"the loss on the probe batches with {k} of {n} random patches gives back {rise[k]:.1%} of "
                         f"the loss learned: {num_kept(n, to)} patches from now on", made)
            return
        # the loss of an epoch that started on fewer patches, or right after thinning, is no stall signal
        changed = self.state.thin is not None and self.state.thin["epoch"] == epoch or \
            any(e == epoch for e, _ in self.state.keep_rates[1:])
        loss = float(metrics["train_loss"])
        if prev_loss is None or changed:
            return
        gain = (prev_loss - loss) / prev_loss
        if self.a.keep_stall > 0 and gain < self.a.keep_stall:  # keep_stall 0: off
            to = ladder[1]
            self._decide(trainer, "keep_rate", to, "train_loss_improvement_on_kept_patches", gain, self.a.keep_stall,
                         f"the train loss on {k} of {n} random patches fell by {gain:.1%} this epoch: "
                         f"{num_kept(n, to)} patches from now on", made)

    @torch.no_grad()
    def _attention_masses(self, trainer: "Trainer", ks: list[int]) -> dict[int, float]:
        """Mean CLS attention (rollout if ``tickets.patches.rollout``) on each image's top ``k`` patches."""
        model = trainer.unwrapped_model
        masses: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
        for x, _ in self._probe_batches(trainer):
            with trainer.autocast():
                att = patch_attention(model, x.to(trainer.device), rollout=self.cfg.tickets.patches.rollout).float()
            att = att / att.sum(dim=1, keepdim=True).clamp_min(1e-12)
            top = att.sort(dim=1, descending=True).values.cumsum(dim=1)
            for k in masses:
                masses[k].append(top[:, k - 1])
        return {k: float(torch.cat(v).mean()) for k, v in masses.items()}

    def _random_keep_rises(self, trainer: "Trainer", ks: list[int], full: float | None = None,
                           gate: float = math.inf) -> tuple[float, dict[int, float]]:
        """The probe loss on all patches (``full``, when not given), and per ``k``: (probe loss on ``k`` random
        patches - that) / (ln(classes) - that): how much of what the model has learned it gives back when it
        sees only ``k`` random patches (the patches ``scorer: random`` trains on). No ``k`` is probed (an empty
        dict) while the loss on all patches is at least ``gate``."""
        model = trainer.unwrapped_model
        was = model.training
        model.eval()
        try:
            full = self._probe_loss(trainer, model) if full is None else full
            if full >= gate:
                return full, {}
            learned = max(math.log(trainer.data.num_classes) - full, 1e-3)
            return full, {k: (self._probe_loss(trainer, model, keep=k) - full) / learned for k in ks}
        finally:
            model.train(was)

    def _patch_times(self, trainer: "Trainer", k: int, rank_s: float, epoch_samples: int) -> tuple[float, float]:
        """``(seconds saved, seconds spent)`` per epoch by training on ``k`` patches: saved from timed
        training steps (forward + backward on a copy, all patches vs ``k``); spent from the timed ranking,
        for the samples a refresh re-ranks, per epoch, plus this probe."""
        pc = self.cfg.tickets.patches
        x, y = self._probe_batches(trainer)[0]
        full, kept = self._step_seconds(trainer, x.to(trainer.device), y.to(trainer.device), k)
        steps = math.ceil(max(epoch_samples, 1) / trainer.cfg.data.batch_size)
        saved = steps * max(full - kept, 0.0)
        if pc.scorer != "cls_attention" or pc.source != "online":
            return saved, 0.0  # nothing is re-ranked during training
        probe = rank_s * self.a.probe_batches * trainer.cfg.data.batch_size
        owner = next(cb for cb in trainer.callbacks if isinstance(cb, PatchTicketsCallback))
        ranked = len(owner.refresh_indices(trainer))
        if pc.refresh_every == 0:  # every training batch is ranked
            return saved, epoch_samples * rank_s + probe
        return saved, ranked * rank_s / pc.refresh_every + probe

    def _step_seconds(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor, k: int,
                      repeats: int = 3) -> tuple[float, float]:
        """Fastest of ``repeats`` forward + backward passes of a copy of the model, on all patches and on
        ``k`` of them (alternating, after one untimed pass each); the model and the RNG streams are untouched."""
        trial = copy.deepcopy(trainer.unwrapped_model)
        trial.train()
        kept = trial.patch_drop
        keep = torch.arange(k, device=x.device).expand(len(x), k)
        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        best = {None: math.inf, k: math.inf}
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            for r in range(repeats + 1):
                for which in (None, k):
                    sync()
                    t0 = time.perf_counter()
                    with kept.keep(None if which is None else keep), trainer.autocast():
                        loss = F.cross_entropy(trial(x).float(), y)
                    loss.backward()
                    sync()
                    if r:
                        best[which] = min(best[which], time.perf_counter() - t0)
                    trial.zero_grad(set_to_none=True)
        del trial
        return best[None], best[k]

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
    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        if self.random_patches and epoch == 0 and not self.state.keep_rates:  # a resumed run has its decisions
            self._start_random_patches(trainer)

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict) -> None:
        if epoch + 1 >= self.state.epochs:
            return
        t0, cpu0 = time.perf_counter(), time.process_time()
        made: list[str] = []
        prev_loss = self.prev_loss
        self._phases(trainer, epoch, metrics, made)
        if self.random_patches and self.state.phase(epoch + 1) != "anneal":
            self._raise_random_keep_rate(trainer, epoch, metrics, prev_loss, made)
        if self.state.phase(epoch + 1) == "reduce":
            if self.cfg.tickets.dynamic.enabled:
                self._dynamic(trainer, made)
            if self.cfg.tickets.patches.enabled and not self.random_patches:
                self._keep_rate(trainer, int(metrics.get("epoch_samples") or len(trainer.train_set)), made)
            if self.cfg.pruning.structured.enabled and self.state.thin is None and \
                    epoch + 1 >= math.ceil(self.a.thin_after * self.state.epochs - 1e-9):
                self._thin(trainer, epoch, made)
        dt = time.perf_counter() - t0
        self.seconds += dt
        trainer.count_as_training(dt, time.process_time() - cpu0)  # probes are schedule work: training time
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
