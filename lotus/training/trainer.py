"""The Lotus trainer: config in, run directory out.

It wires together parts that each own one concern: the :class:`~lotus.training.state.TrainState`
(counters, RNG), the :class:`~lotus.training.run_log.RunLog` (metrics.jsonl, console, progress), the
:class:`~lotus.training.checkpointer.CheckpointManager` (save, resume), :func:`~lotus.training.step.train_step`
(the optimisation step) and the run's :class:`~lotus.features.schedule.phases.Schedule` (what each epoch
does). Features plug in as :class:`~lotus.callbacks.Callback` objects from :mod:`lotus.features.registry`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lotus.callbacks import Callback, Forward, default_forward
from lotus.config import Config, config_to_dict, load_config, save_config
from lotus.data import Augmenter, DataBundle, build_datasets, describe
from lotus.data_meta import run_data_metadata
from lotus.errors import LotusError
from lotus.evaluation import evaluate
from lotus.features.registry import build_callbacks, published
from lotus.features.schedule.phases import EpochPlan, Schedule
from lotus.models import create_model, resolve_img_size, unwrap
from lotus.optim import LrSchedule, build_optimizer
from lotus.parallel.apply import parallelize
from lotus.parallel.runtime import DistInfo, init_distributed
from lotus.run_report import write_report
from lotus.safe_io import atomic_write_text
from lotus.training.checkpointer import CheckpointManager, TrainingStates, full_model_state
from lotus.training.epoch import train_epoch
from lotus.training.run_dir import RunDir
from lotus.training.run_log import RunLog
from lotus.training.runtime import maybe_compile, setup_runtime
from lotus.training.state import TrainState
from lotus.training.step import Stepper
from lotus.training.threads import ThreadTuner

__all__ = ["Trainer", "train"]


def _init_distributed(cfg: Config) -> DistInfo:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    return init_distributed(device=cfg.train.device, backend=cfg.parallel.backend)


class _Counter:
    """A :class:`TrainState` field exposed as a trainer attribute (``trainer.step`` etc.)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.state, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.state, self.name, value)


class Trainer:
    """Runs one training job described by a :class:`~lotus.config.Config`.

    Args:
        cfg: the validated config.
        callbacks: extra callbacks, run after the features' own (in the order given).
        run_dir: output folder (default ``output.dir`` or ``runs/<name>-<time>``).
        resume: continue the run in ``run_dir`` from its ``state.pt``.
        quiet: no progress bar and no printed epoch lines.
        write: write the run directory (off for proxy trainings).
    """

    epoch = _Counter()
    step = _Counter()
    samples_seen = _Counter()
    train_flops = _Counter()
    wall = _Counter()
    cpu = _Counter()
    best_acc = _Counter()

    def __init__(
        self,
        cfg: Config,
        callbacks: list[Callback] | None = None,
        run_dir: str | None = None,
        resume: bool = False,
        quiet: bool = False,
        write: bool = True,
        force: bool = False,
        overrides: list[str] | None = None,
    ):
        self.cfg = cfg
        self.resume = resume
        self.force = force
        self.overrides = list(overrides or [])  # the --set of this invocation (recorded in config_history.jsonl)
        self.quiet = quiet
        self.write = write
        self.dist = _init_distributed(cfg)
        self.run_dir = run_dir or cfg.output.dir or os.path.join("runs", f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.schedule = Schedule(cfg)
        self.callbacks: list[Callback] = build_callbacks(cfg, self.schedule) + list(callbacks or [])
        self.features = published(self.callbacks)
        self.state = TrainState()
        self.run_log = RunLog(
            self.run_dir,
            write=write and self.dist.is_main,
            show=not quiet and self.dist.is_main,
            tensorboard=cfg.output.tensorboard,
            wandb=None
            if cfg.output.wandb == "off"
            else {
                "mode": cfg.output.wandb,
                "project": cfg.output.wandb_project,
                "name": cfg.name,
                "config": config_to_dict(cfg),
            },
        )
        self.checkpoints = CheckpointManager(self.run_dir, write, keep=cfg.output.keep_checkpoints)
        self.dir = RunDir(self.run_dir)
        self.resumed_log_bytes: int | None = None
        self.restored = False
        self.forward: Forward = default_forward
        self.plan: EpochPlan = self.schedule.plan(0)
        self.subset: np.ndarray | None = None
        self.sampler: Any = None
        self.steps_per_epoch = 0
        self._segment_start: float | None = None

    @property
    def events(self) -> list[dict]:
        return self.run_log.events

    # ----------------------------------------------------------------- setup
    def _setup_runtime(self) -> None:
        rt = setup_runtime(self.cfg.train, self.dist)
        self.device, self.autocast = rt.device, rt.autocast
        self.stepper = Stepper(self.cfg.train, self.device, fp16=rt.fp16)

    def _setup_data(self) -> None:
        c = self.cfg
        self.data: DataBundle = build_datasets(
            c.data, resolve_img_size(c.model), c.model.in_chans, c.model, c.train.seed
        )
        self.train_set, self.val_set = self.data.train, self.data.val
        self.loop_set = self.data.train_aug or self.train_set  # timm's random transform, else the batch-sliced set
        self.labels_train = self.data.labels_train
        self.augment = Augmenter(self.cfg.data.augment, self.cfg.train.seed)

    def _setup_model(self, state: dict | None) -> None:
        d = self.data
        self.model = create_model(self.cfg.model, d.num_classes, d.in_chans, d.img_size).to(self.device)
        self.unwrapped_model = self.model
        plan = None
        if state is not None:
            self.checkpoints.restore_model(
                self.model, self.callbacks, state, lambda cb: cb.on_load_checkpoint(self, state)
            )
            plan = self.checkpoints.saved_plan(
                self.model, self.cfg.parallel, self.dist.world_size, self.cfg.data.batch_size, state
            )
        self.model = self.wrap_model(self.model, plan=plan)  # plan=None: resolved from the config

    def wrap_model(self, model: nn.Module, **plan: Any) -> nn.Module:
        """A plain model on the device, wrapped for training: AC / FSDP2 / DDP per the plan, then compile
        (at set-up, and again after a pruning event rebuilt the model: ``plan``/``replan`` of parallelize)."""
        if self.dist.world_size > 1 or self.cfg.parallel.mode != "none":
            model = parallelize(
                model,
                self.cfg.parallel,
                self.dist,
                batch_size=self.cfg.data.batch_size,
                build_optimizer=lambda m: build_optimizer(self.cfg.optim, m),
                autocast_dtype=None if self.autocast is contextlib.nullcontext else torch.bfloat16,
                **plan,
            )
        return maybe_compile(model, self.cfg.train, self.device)

    def rebuild_optimizer(
        self, state_transform: Callable[[torch.optim.Optimizer, torch.optim.Optimizer], None] | None = None
    ) -> None:
        """Build a new optimiser over the current parameters (e.g. after structured thinning), keeping
        the position in the lr schedule; ``state_transform(old, new)`` may carry optimiser state over."""
        old = getattr(self, "optimizer", None)
        self.optimizer = build_optimizer(self.cfg.optim, self.model)
        if old is not None and state_transform is not None:
            state_transform(old, self.optimizer)
        state = self.scheduler.state_dict() if hasattr(self, "scheduler") else {"position": 0.0}
        self.scheduler = LrSchedule(self.optimizer, self.cfg.optim, self.cfg.train)
        self.scheduler.load_state_dict(state)  # the position (and plateau counters) carry over

    def states(self) -> TrainingStates:
        """What a checkpoint holds, handed to the checkpoint manager (it reads nothing else of the trainer)."""
        return TrainingStates(
            self.model,
            getattr(self, "optimizer", None),
            self.scheduler,
            self.state,
            self.stepper,
            self.augment.gen,
            self.callbacks,
            self.run_log.events,
            self.subset,
            self.run_log.size(),
        )

    def replace_model(self, plain: nn.Module, wrapped: nn.Module) -> None:
        """Train ``wrapped`` (``plain`` wrapped by :meth:`wrap_model`) from now on: the one place the model
        is swapped after set-up (structured thinning under data parallelism rebuilds it)."""
        self.model, self.unwrapped_model = wrapped, plain

    def model_thinned(self, report: dict) -> None:
        """Fire ``on_model_thinned`` on every callback (e.g. the EMA copy is thinned the same way)."""
        for cb in self.callbacks:
            cb.on_model_thinned(self, report)

    # ---------------------------------------------------------------- services
    def log(self, event: str, **fields: Any) -> None:
        """Record an event (what, when, how long, result) in metrics.jsonl and the run summary."""
        self.run_log.event(
            {
                "type": "event",
                "event": event,
                "epoch": self.epoch,
                "step": self.step,
                "wall_s": round(self._wall_now(), 4),
                **fields,
            }
        )

    def count_as_training(self, wall_s: float, cpu_s: float) -> None:
        """Add work done outside the epoch's training segment (e.g. a schedule's probes at an epoch end) to
        the run's training time: wall and process CPU seconds."""
        self.wall = self.wall + wall_s
        self.cpu = self.cpu + cpu_s

    def _wall_now(self) -> float:
        start = self._segment_start
        return self.wall + (time.perf_counter() - start if start is not None else 0.0)

    def evaluate(self, model: nn.Module | None = None, dataset: Any = None) -> dict:
        """Top-1 accuracy and mean loss on the validation set (sharded and summed across ranks)."""
        out = evaluate(
            model or self.model,
            dataset or self.val_set,
            batch_size=self.cfg.data.eval_batch_size,
            device=self.device,
            autocast=self.autocast,
            num_workers=self.cfg.data.num_workers,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        return {"val_loss": out["val_loss"], "val_acc": out["val_acc"], "val_acc5": out["val_acc5"]}

    # ------------------------------------------------------------ epoch order
    def _start_epoch(self, epoch: int) -> None:
        """Ask the schedule for this epoch's plan, then the owners of the subset and sampler slots."""
        self.plan = self.schedule.plan(epoch)
        if self.schedule.enabled and epoch > 0 and self.plan.phase != self.schedule.phase(epoch - 1):
            self.log(f"phase_{self.plan.phase}", epoch_start=epoch)
        answers = [s for s in (cb.epoch_subset(self, epoch) for cb in self.callbacks) if s is not None]
        if len(answers) > 1:
            raise RuntimeError("two callbacks set the epoch subset; only one feature may own it")
        self.subset = answers[0] if answers else None
        samplers = [s for s in (cb.epoch_sampler(self, epoch, self.subset) for cb in self.callbacks) if s is not None]
        if len(samplers) > 1:
            raise RuntimeError("two callbacks set the epoch sampler; only one feature may own it")
        self.sampler = samplers[0] if samplers else None
        for cb in self.callbacks:
            cb.on_epoch_start(self, epoch)

    # ------------------------------------------------------------------ fit
    def fit(self) -> dict:
        """Train for ``train.epochs`` (or until ``train.max_steps``); returns the summary dict.

        The process that writes the run directory holds its lock for the whole run."""
        owner = self.run_log.write
        if owner:
            self.dir.lock()
        try:
            return self._fit(self.dir.prepare(self.resume, self.force) if owner else [])
        finally:
            self.dir.unlock()

    def _fit(self, notes: list[str]) -> dict:
        cfg = self.cfg
        restart = self.resume and not self.dir.has_state and self.dir.has_run  # half-made: start over
        state = self.checkpoints.load() if self.resume and not restart else None
        self._setup_runtime()
        self._setup_data()
        self._setup_model(state)
        self.rebuild_optimizer()
        if state is not None:
            restored = self.checkpoints.restore_training(self.states(), state, self.dist.is_main)
            self.subset, self.resumed_log_bytes = restored.subset, restored.log_bytes
            capped = cfg.train.max_steps is not None and self.step >= cfg.train.max_steps
            finished = self.epoch >= cfg.train.epochs or capped
            if finished and os.path.exists(self.dir.file("summary.json")):
                raise LotusError(
                    f"resume: {self.run_dir} already finished ({self.epoch} epochs, {self.step} steps); "
                    "pass --set train.epochs=N (or train.max_steps) with a larger value to continue"
                )
        resumed_at = self.step
        self.restored = state is not None  # features log their start-of-run events only when False
        config_pending = self.resume  # a resumed run's --set reaches config.yaml with its first checkpoint
        if self.run_log.write and not config_pending:  # before the log: a log always has its config
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        self.run_log.open(truncate_to=self.resumed_log_bytes)
        for note in notes:
            self.log("run_dir", note=note)
        src, side = self.data.source_size, self.data.img_size
        if state is None and src is not None and tuple(src) != (side, side):
            self.log("data_resized", note=f"{src[0]}x{src[1]} px images are resized to {side}x{side} (model.img_size)")
        for cb in self.callbacks:
            cb.on_fit_start(self)
        for cb in self.callbacks:
            self.forward = cb.wrap_forward(self, self.forward)
        self.thread_tuner = (  # threads: auto tunes on the run's first real steps (epoch.observe_threads)
            ThreadTuner()
            if cfg.train.threads == "auto" and self.device.type == "cpu" and self.dist.world_size == 1
            else None
        )
        steps_cap = cfg.train.max_steps
        last_metrics: dict = dict(state.get("last_metrics") or {}) if state is not None else {}  # killed
        # after the last checkpoint: the loop below has nothing left and the run is finalised
        try:
            for epoch in range(self.epoch, cfg.train.epochs):
                if steps_cap is not None and self.step >= steps_cap:
                    break
                self.epoch = epoch
                self._segment_start, cpu0 = time.perf_counter(), time.process_time()
                self._start_epoch(epoch)
                last_metrics = train_epoch(self, epoch, steps_cap)
                self.wall = self._wall_now()
                self.cpu = self.cpu + (time.process_time() - cpu0)
                self._segment_start = None
                stopping = steps_cap is not None and self.step >= steps_cap
                if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs or stopping:
                    last_metrics.update(self.evaluate())
                    self.scheduler.observe(last_metrics)  # optim.sched plateau: decay on val_acc
                last_metrics["wall_s"] = round(self.wall, 4)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch, last_metrics)
                last_metrics.update(wall_s=round(self.wall, 4), cpu_s=round(self.cpu, 4))  # with probe time
                self.epoch = epoch + 1
                self.run_log.record(last_metrics)
                self.run_log.print(RunLog.epoch_line(last_metrics, cfg.train.epochs))
                self.checkpoints.save(self.states(), last_metrics, cfg, run_data_metadata(self), self.dist.is_main)
                if config_pending and self.run_log.write:
                    self.dir.record_config(cfg, resumed_at, self.overrides)
                    config_pending = False
            summary = self._summary(last_metrics)
            if self.data.test is not None:  # reported once, at the end: the test split never chooses anything
                test = self.evaluate(dataset=self.data.test)
                summary.update(test_acc=test["val_acc"], test_loss=test["val_loss"])
                self.run_log.print(
                    f"test: acc {test['val_acc']:.4f} loss {test['val_loss']:.4f} ({len(self.data.test)} images)"
                )
            for cb in self.callbacks:
                cb.on_fit_end(self, summary)  # may still log events
            summary["events"] = self.events
        finally:
            self.run_log.close()
        if self.run_log.write:
            atomic_write_text(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2))
            if cfg.output.report:
                write_report(self.run_dir)
        return summary

    def _summary(self, last: dict) -> dict:
        bare = unwrap(self.model)
        sd = full_model_state(self.model)  # collective under FSDP2
        nonzero = int(sum(int((v != 0).sum()) for v in sd.values() if v.is_floating_point()))
        return {
            "name": self.cfg.name,
            "run_dir": os.path.abspath(self.run_dir),
            "model": self.cfg.model.name,
            "epochs": self.epoch,
            "steps": self.step,
            "samples_seen": self.samples_seen,
            "wall_s": round(self.wall, 3),
            "cpu_s": round(self.cpu, 3),
            "train_flops": self.train_flops,
            "data": describe(self.cfg.data, self.data),
            "final_val_acc": last.get("val_acc"),
            "final_val_loss": last.get("val_loss"),
            "best_val_acc": self.best_acc if self.best_acc >= 0 else None,
            "params": sum(p.numel() for p in bare.parameters()),
            "nonzero_params": nonzero,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "events": self.events,
        }


def train(cfg: Config | str, overrides: list[str] | None = None, **kwargs: Any) -> dict:
    """Train from a :class:`Config` or a YAML path; returns the run summary."""
    if not isinstance(cfg, Config):
        cfg = load_config(cfg, overrides)
    return Trainer(cfg, **kwargs).fit()
