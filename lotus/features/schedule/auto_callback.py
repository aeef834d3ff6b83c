"""The controller of ``schedule.mode: auto``: at each epoch end it calls the probes, hands what they measured
to the rules and records the decisions the rules return.

Rules (and the rule table): :mod:`lotus.features.schedule.auto_rules`; measurements:
:mod:`lotus.features.schedule.auto_probes`; the decision list and what it implies per epoch:
:class:`lotus.features.schedule.auto.AutoState`. Besides the probes, the signals are the epoch's mean train loss
and val accuracy (the epoch metrics, already reduced across ranks) and the dynamic pruner's last-seen losses
(weighed over what its data rule would drop).
Probe time counts as training time (``wall_s``). Each decision is logged as an ``auto_decision`` event with
its signal, measured value, threshold and reason; the decision list is this callback's checkpoint state.
Under torchrun every rank runs the same probes on the same reduced numbers; after each round the ranks
compare digests of their decision lists (``auto_rank_digests`` in the epoch metrics) and stop on a mismatch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from data_tickets.keep_rate import num_kept
from lotus.callbacks import Callback, Trainer
from lotus.errors import LotusError
from lotus.features.schedule import auto_patch_rules as patch_rules
from lotus.features.schedule import auto_probes as probes
from lotus.features.schedule import auto_rules as rules
from lotus.features.schedule import auto_side_rules as side_rules
from lotus.features.schedule.auto import AutoState

__all__ = ["AutoScheduleCallback"]


@dataclass(frozen=True)
class _Probed:
    """What the token-lever rules share at an epoch end: the epoch, its metrics, the epoch before's train loss,
    the decisions made so far this round, the probed model and its probe loss on all tokens at full size."""

    epoch: int
    metrics: dict
    prev_loss: float | None
    made: list[str]
    model: Any
    full: float


class AutoScheduleCallback(Callback):
    """Decides the phases, dynamic ratio, patch keep rate, training image side and thinning of an auto-scheduled
    run."""

    def __init__(self, cfg: Any, state: AutoState):
        self.cfg = cfg  # the run's lotus.config.Config
        self.a = cfg.schedule.auto
        self.state = state  # shared with the run's Schedule, which plans from it
        self.prev_loss: float | None = None
        self.plateau = rules.Plateau()
        self.seconds = 0.0
        self._probe: probes.Batches | None = None
        p = cfg.tickets.patches
        self.random_patches = bool(p.enabled and p.scorer == "random")  # no ranking: start low, raise on signal
        self.resolution = bool(cfg.resolution.enabled)  # the side: start low, raise on signal
        self._grid: side_rules.SideGrid | None = None

    # ------------------------------------------------------------------ helpers
    def probe_batches(self, trainer: Trainer) -> probes.Batches:
        """The run's probe batches (cached)."""
        if self._probe is None:
            self._probe = probes.probe_batches(trainer, self.a.probe_batches)
        return self._probe

    def grid(self, trainer: Trainer) -> side_rules.SideGrid:
        """The sides the resolution rule may choose (from ``resolution.start`` of the full side, whole patches)."""
        if self._grid is None:
            res = trainer.features["resolution"]  # its on_fit_start checked the model and read full side and patch
            self._grid = side_rules.SideGrid.of(res.full, res.patch, self.cfg.resolution.start)
        return self._grid

    @staticmethod
    def _steps(trainer: Trainer, epoch_samples: int) -> int:
        """Optimiser steps per rank in an epoch of ``epoch_samples`` samples."""
        return math.ceil(max(epoch_samples, 1) / (trainer.cfg.data.batch_size * trainer.dist.world_size))

    def _model(self, trainer: Trainer) -> Any:
        owner = trainer.features.get("pruning")
        return probes.probe_model(trainer, owner.widths if owner is not None else None)

    def _apply(self, trainer: Trainer, epoch: int, d: rules.Decision | None, made: list[str]) -> bool:
        """Record and log ``d`` (taken at the end of ``epoch``); False when there is none."""
        if d is None:
            return False
        rec = d.record(epoch)
        self.state.record(rec)
        trainer.log("auto_decision", **rec)
        made.append(d.what)
        return True

    def _agree(self, trainer: Trainer, epoch: int, metrics: dict | None) -> None:
        """Under torchrun: every rank's decision digest, checked equal (raises naming the ranks)."""
        if trainer.dist.world_size <= 1:
            return
        digests = probes.rank_digests(self.state.decisions)
        rules.check_agreement(digests, epoch)
        if metrics is not None:
            metrics["auto_rank_digests"] = digests

    def _pay(
        self, trainer: Trainer, model: Any, k: int, n: int, rank_s: float, epoch_samples: int
    ) -> patch_rules.PatchPay:
        """Seconds per epoch saved (timed steps on all vs ``k`` patches) and spent re-ranking, per rank."""
        pc, world = self.cfg.tickets.patches, trainer.dist.world_size
        x, y = self.probe_batches(trainer)[0]
        full, kept = probes.step_seconds(trainer, model, x.to(trainer.device), y.to(trainer.device), k)
        steps = self._steps(trainer, epoch_samples)
        online = pc.scorer == "cls_attention" and pc.source == "online"
        ranked = 0
        if online and pc.refresh_every != 0:
            owner = trainer.features["tickets.patches"]
            ranked = len(owner.refresh_indices(trainer))
        cost = patch_rules.rerank_seconds(
            rank_s,
            online,
            pc.refresh_every,
            ranked,
            math.ceil(epoch_samples / world),
            self.a.probe_batches * trainer.cfg.data.batch_size,
        )
        return patch_rules.PatchPay(k, n, patch_rules.seconds_saved(full, kept, steps), cost)

    # ------------------------------------------------------------------ signals
    def _phases(self, trainer: Trainer, epoch: int, metrics: dict, made: list[str]) -> None:
        loss = float(metrics["train_loss"])
        self._apply(trainer, epoch, rules.warmup_end(self.state, self.a, epoch, loss, self.prev_loss), made)
        self.prev_loss = loss
        self.plateau = rules.track_plateau(
            self.plateau, metrics.get("val_acc"), self.state.phase(epoch), self.a.plateau_delta
        )
        self._apply(trainer, epoch, rules.anneal_start(self.state, self.a, epoch, self.plateau), made)

    def _dynamic(self, trainer: Trainer, epoch: int, made: list[str]) -> None:
        """The sampler's data rule names what it would drop (``drop_candidates``); the rule weighs their losses."""
        losses = probes.seen_losses(trainer.sampler)
        if losses is not None:
            cap = float(self.cfg.tickets.dynamic.ratio)
            drop = trainer.sampler.rule.drop_candidates
            decision = rules.dynamic_ratio(self.state, self.a, losses, trainer.data.num_classes, cap, drop)
            self._apply(trainer, epoch, decision, made)

    def _keep_rate(self, trainer: Trainer, epoch: int, epoch_samples: int, made: list[str]) -> None:
        """scorer cls_attention: one step lower while the attention mass allows (pays-check at the first)."""
        model = self._model(trainer)
        n = int(model.patch_embed.num_patches)
        probe = patch_rules.attention_probe(self.state, self.a, float(self.cfg.tickets.patches.keep_rate), n)
        if probe is None:
            return
        masses, rank_s = probes.attention_masses(
            trainer, model, self.probe_batches(trainer), list(probe.ks), self.cfg.tickets.patches.rollout
        )
        lowest = patch_rules.attention_pay_k(self.state, self.a, probe, masses)
        pay = None if lowest is None else self._pay(trainer, model, lowest, n, rank_s, epoch_samples)
        self._apply(trainer, epoch, patch_rules.cls_attention_keep_rate(self.a, probe, masses, n, pay), made)

    def _start_random_patches(self, trainer: Trainer, made: list[str]) -> None:
        """scorer random, before the first epoch: the floor from epoch 0 unless timed steps save nothing."""
        floor = float(self.cfg.tickets.patches.keep_rate)
        model = self._model(trainer)
        n = int(model.patch_embed.num_patches)
        saved = None
        if self.a.patches_must_pay:
            saved = self._pay(trainer, model, num_kept(n, floor), n, 0.0, len(trainer.train_set)).saved
        self._apply(trainer, -1, patch_rules.random_patches_start(floor, n, saved), made)

    def _start_side(self, trainer: Trainer, made: list[str]) -> None:
        """resolution, before the first epoch: the lowest side from epoch 0 unless timed steps save nothing."""
        grid, saved = self.grid(trainer), None
        if self.a.patches_must_pay and grid.low < grid.full:
            x, y = self.probe_batches(trainer)[0]
            full, low = probes.step_seconds(
                trainer, self._model(trainer), x.to(trainer.device), y.to(trainer.device), None, side=grid.low
            )
            saved = patch_rules.seconds_saved(full, low, self._steps(trainer, len(trainer.train_set)))
        self._apply(trainer, -1, side_rules.side_start(grid, saved), made)

    def _raise_tokens(
        self, trainer: Trainer, epoch: int, metrics: dict, prev_loss: float | None, made: list[str]
    ) -> None:
        """The token levers (random patches, resolution): probe what each gives back at its current setting,
        give a train-loss stall to the one that gives back more (:func:`~.auto_side_rules.stall_lever`), and let
        each rule decide."""
        keep_on = self.random_patches and patch_rules.current_keep_rate(self.state) < 1.0
        grid = self.grid(trainer) if self.resolution else None
        side = None if grid is None else side_rules.current_side(self.state, grid)
        side_on = grid is not None and side is not None and side < grid.full
        if not (keep_on or side_on):
            return
        model, data = self._model(trainer), self.probe_batches(trainer)
        gate = patch_rules.random_keep_gate(self.a, trainer.data.num_classes)
        keep_rise = side_rise = None
        if keep_on:
            k = num_kept(int(model.patch_embed.num_patches), patch_rules.current_keep_rate(self.state))
            full, rises = probes.random_keep_rises(trainer, model, data, [k], gate=gate)
            keep_rise = rises.get(k)
        else:
            with probes.eval_mode(model):
                full = probes.probe_loss(trainer, model, data)
        if side_on:
            side_rise = probes.side_rises(trainer, model, data, [side], full, gate).get(side)
        lever = side_rules.stall_lever(side_rise, keep_rise, keep_on, not side_on)
        seen = _Probed(epoch, metrics, prev_loss, made, model, full)
        if keep_on:
            self._raise_random_keep_rate(trainer, seen, keep_rise, stall_taken=lever == "side")
        if side_on:
            self._raise_side(trainer, seen, side_rise, takes_stall=lever == "side")

    def _raise_side(self, trainer: Trainer, seen: _Probed, rise: float | None, takes_stall: bool) -> None:
        """resolution: probe the sides above the current one while they give back too much, then let
        :func:`~lotus.features.schedule.auto_side_rules.side_decision` decide."""
        epoch, metrics, model, full = seen.epoch, seen.metrics, seen.model, seen.full
        if not patch_rules.random_keep_ready(self.state, epoch, rise):
            return
        if rise is not None:
            metrics["auto_side_rise"] = round(rise, 6)
        grid, data = self.grid(trainer), self.probe_batches(trainer)
        rungs: list[tuple[int, float]] = []
        for s in side_rules.side_rungs(self.state, self.a, grid, rise):
            gap = probes.side_rises(trainer, model, data, [s], full).get(s)
            if gap is None:  # not finite: no verdict on this side
                continue
            rungs.append((s, gap))
            if not side_rules.side_off(gap, self.a):
                break
        loss = float(metrics["train_loss"])
        decision = side_rules.side_decision(
            self.state, self.a, epoch, grid, rise, rungs, loss, seen.prev_loss, takes_stall
        )
        self._apply(trainer, epoch, decision, seen.made)

    def _raise_random_keep_rate(self, trainer: Trainer, seen: _Probed, rise: float | None, stall_taken: bool) -> None:
        """scorer random: probe the rungs above the current rate's random patches (lowest first, while they give
        back too much) and let :func:`~lotus.features.schedule.auto_patch_rules.random_keep_rate` decide."""
        epoch, metrics, model, full = seen.epoch, seen.metrics, seen.model, seen.full
        data = self.probe_batches(trainer)
        n = int(model.patch_embed.num_patches)
        if not patch_rules.random_keep_ready(self.state, epoch, rise):
            return  # too early to tell: nothing learned on the probe batches, and the warm-up just ended
        if rise is not None:
            metrics["auto_keep_rise"] = round(rise, 6)
        rungs: list[tuple[float, float]] = []
        for r in patch_rules.random_keep_rungs(self.state, self.a, rise):
            kk = num_kept(n, r)
            rungs.append((r, probes.random_keep_rises(trainer, model, data, [kk], full=full)[1][kk]))
            if patch_rules.within_keep_tolerance(rungs[-1][1], self.a):
                break
        self._apply(
            trainer,
            epoch,
            patch_rules.random_keep_rate(
                self.state, self.a, epoch, n, rise, rungs, float(metrics["train_loss"]), seen.prev_loss, stall_taken
            ),
            seen.made,
        )

    def _thin(self, trainer: Trainer, epoch: int, made: list[str]) -> None:
        """Probe thinned copies, largest first, and thin to the first within tolerance."""
        s = self.cfg.pruning.structured
        cands = rules.thin_candidates(self.state, self.a, epoch, s.heads, s.mlp)
        if not cands:
            return
        owner = trainer.features["pruning"]
        calib = owner.calib_batches(trainer) if s.importance != "magnitude" else None
        model, data = self._model(trainer), self.probe_batches(trainer)
        with probes.eval_mode(model):
            dense = probes.probe_loss(trainer, model, data)
            for c in cands:
                loss = probes.thinned_loss(trainer, model, data, s, c.heads, c.mlp, calib)
                rise = rules.loss_rise_of_learned(loss, dense, trainer.data.num_classes)
                if self._apply(trainer, epoch, rules.thin_decision(self.a, c, rise), made):
                    return

    # ------------------------------------------------------------------ hooks
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if epoch == 0 and (self.random_patches or self.resolution):
            if self.random_patches and not self.state.keep_rates:  # a resumed run has its decisions
                self._start_random_patches(trainer, [])
            if self.resolution and not self.state.sides:
                self._start_side(trainer, [])
            self._agree(trainer, -1, None)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if epoch + 1 >= self.state.epochs:
            return
        t0, cpu0 = time.perf_counter(), time.process_time()
        made: list[str] = []
        prev_loss = self.prev_loss
        self._phases(trainer, epoch, metrics, made)
        if (self.random_patches or self.resolution) and self.state.phase(epoch + 1) != "anneal":
            self._raise_tokens(trainer, epoch, metrics, prev_loss, made)
        if self.state.phase(epoch + 1) == "reduce":
            if self.cfg.tickets.dynamic.enabled:
                self._dynamic(trainer, epoch, made)
            if self.cfg.tickets.patches.enabled and not self.random_patches:
                self._keep_rate(trainer, epoch, int(metrics.get("epoch_samples") or len(trainer.train_set)), made)
            if self.cfg.pruning.structured.enabled:
                self._thin(trainer, epoch, made)
        self._agree(trainer, epoch, metrics)
        dt = time.perf_counter() - t0
        self.seconds += dt
        trainer.count_as_training(dt, time.process_time() - cpu0)  # probes are schedule work: training time
        metrics["auto_next_phase"] = self.state.phase(epoch + 1)
        if made:
            metrics["auto_decisions"] = made

    def on_fit_end(self, trainer: Trainer, summary: dict) -> None:
        summary["auto_schedule"] = {
            "decisions": [dict(d) for d in self.state.decisions],
            "probe_seconds": round(self.seconds, 4),
        }

    def state_dict(self) -> dict:
        p = self.plateau
        return {
            "decisions": [dict(d) for d in self.state.decisions],
            "prev_loss": self.prev_loss,
            "best_acc": p.best_acc if math.isfinite(p.best_acc) else None,
            "since_best": p.since_best,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        decisions = list(state.get("decisions", []))
        if self.resolution and decisions and not any(d["what"] == "side" for d in decisions):
            raise LotusError(
                "resolution.enabled: this checkpoint was written before schedule.mode: auto decided the image side "
                "(its sides followed resolution.full_at); resume it with the Lotus version that wrote it, or train "
                "afresh"
            )
        self.state.load(decisions)
        self.prev_loss = state.get("prev_loss")
        best = state.get("best_acc")
        self.plateau = rules.Plateau(-math.inf if best is None else float(best), int(state.get("since_best", 0)))
        self.seconds = float(state.get("seconds", 0.0))
