"""The checkpoint manager: what a run writes at each epoch end and how a resumed run reads it back.

Files in the run directory (every write atomic, see :mod:`lotus.safe_io`):

* ``state.pt``: model and optimiser (full, rank-agnostic state dicts), lr-schedule position, the
  :class:`~lotus.training.state.TrainState` counters, every RNG, the epoch subset, each callback's state
  (keyed by class name) and the events so far; loaded with ``weights_only=True``.
* ``best.safetensors`` / ``last.safetensors``: plain weights with the full model section (name, resolved
  sizes, kwargs, block, widths) in the metadata, so a thinned model loads anywhere (``lotus export``,
  ``lotus.weights.load_weights`` / ``pruning.apply_widths``) and commands take ``--checkpoint`` alone.
* ``checkpoint-<epoch>.safetensors`` + ``checkpoints.json``: the ``output.keep_checkpoints`` best epochs
  (:mod:`lotus.training.checkpoint_history`).

On resume, callbacks get their saved state first, then ``on_load_checkpoint`` (where pruning rebuilds
thinned widths and masks), then the model weights load.

The manager reads nothing of the trainer: the trainer hands it a :class:`TrainingStates` (what is saved and
restored, like torchtitan's ``CheckpointManager(states={...})``) and the settings each call needs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lotus.errors import LotusError
from lotus.models import unwrap
from lotus.parallel.apply import get_plan
from lotus.parallel.full_state import fold_parametrized_state, get_full_state, is_sharded, set_full_state
from lotus.parallel.plan_file import Plan, plan_from_dict
from lotus.parallel.strategies import transformer_blocks
from lotus.training.checkpoint_history import CheckpointHistory
from lotus.training.state import capture_rng, restore_rng
from lotus.weights import export_state_dict, load_state, save_state, save_weights

__all__ = ["CheckpointManager", "TrainingStates", "callback_keys", "full_model_state", "REQUIRED_KEYS"]

# what an exact resume cannot do without (other keys, e.g. "stepper" or newer counters, have defaults)
REQUIRED_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "epoch",
    "step",
    "rng_torch",
    "rng_numpy",
    "rng_python",
    "rng_augment",
)


def callback_keys(callbacks: list) -> list[tuple[str, Any]]:
    """Stable keys for callback state: class name plus a counter among callbacks of that class."""
    seen: dict[str, int] = {}
    out = []
    for cb in callbacks:
        name = type(cb).__name__
        seen[name] = seen.get(name, 0) + 1
        out.append((f"{name}:{seen[name]}", cb))
    return out


@dataclass
class TrainingStates:
    """What one checkpoint saves and a resume restores, handed over by the trainer at each call."""

    model: nn.Module  # as trained (wrapped under DDP/FSDP2)
    optimizer: Any  # torch.optim.Optimizer, or None before it is built
    scheduler: Any  # lotus.optim.LrSchedule
    counters: Any  # lotus.training.state.TrainState: epoch, step, best_acc, time
    stepper: Any  # gradient accumulation state
    rng: torch.Generator  # the batch augmenter's generator (torch/numpy/python RNGs are global)
    callbacks: list  # their state_dict / load_state_dict, keyed by callback_keys
    events: list[dict]  # the run's events so far (restored in place)
    subset: Any = None  # the epoch's train indices (None = all)
    log_bytes: int | None = None  # metrics.jsonl length at this checkpoint


class CheckpointManager:
    """Saves and restores one run's checkpoints (files on rank 0; the gather is collective under FSDP2)."""

    def __init__(self, run_dir: str, write: bool, keep: int = 0):
        self.run_dir, self.write = run_dir, write
        self.history = CheckpointHistory(run_dir, keep)

    @property
    def state_path(self) -> str:
        return os.path.join(self.run_dir, "state.pt")

    # ------------------------------------------------------------------ read
    def load(self) -> dict:
        """The saved training state of this run directory (a one-line error if missing, corrupt, or written
        before a key an exact resume needs existed; newer optional keys resume with their defaults)."""
        state = load_state(self.state_path)
        missing = [k for k in REQUIRED_KEYS if k not in state]
        if missing:
            run = self.run_dir
            raise LotusError(
                f"resume: {self.state_path} was written by an older Lotus and lacks {', '.join(map(repr, missing))}, "
                f"so the run cannot continue exactly; start it over with lotus train --config {run}/config.yaml "
                f"--out {run} --force, or start a new run from its weights with --set model.checkpoint="
                f"{run}/last.safetensors"
            )
        return state

    def restore_model(
        self, model: nn.Module, callbacks: list, state: dict, on_load_checkpoint: Callable[[Any], None]
    ) -> None:
        """Callback state, then shapes (``on_load_checkpoint(callback)``: the trainer calls the hook), then the
        weights, into the unwrapped ``model``."""
        self._restore_callbacks(callbacks, state)
        for cb in callbacks:
            on_load_checkpoint(cb)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LotusError(
                f"resume: the saved model does not fit this config (changed model settings?): {first}"
            ) from None

    def saved_plan(self, model: nn.Module, par: Any, world_size: int, batch_size: int, state: dict) -> Plan | None:
        """``parallel.mode: auto`` (``par``: the parallel section): the per-block plan the run was saved under,
        when it still applies (same world size, batch size and memory budget, the saved widths' block count).
        Solving again would time the blocks afresh and could choose another plan; a resumed run keeps its own."""
        saved = state.get("parallel_plan")
        if par.mode != "auto" or not saved:
            return None
        plan = plan_from_dict(saved, self.state_path, len(transformer_blocks(model)))
        same = (
            plan.world_size == world_size
            and plan.batch_size == batch_size
            and (par.memory_budget is None or plan.budget_bytes == par.budget_bytes)
        )
        return plan if same else None

    def restore_training(self, states: TrainingStates, state: dict, is_main: bool) -> TrainingStates:
        """Optimiser, lr position, counters, RNG and events into ``states`` (after the optimiser is built); the
        returned copy carries the saved subset and metrics.jsonl length for the trainer to take over."""
        set_full_state(states.model, states.optimizer, None, state["optimizer"])
        states.scheduler.load_state_dict(state["scheduler"])
        states.counters.load_state_dict(state)
        states.stepper.load_state_dict(state.get("stepper") or {})
        restore_rng(state, states.rng)
        states.events[:] = list(state.get("events", []))
        if self.write and is_main:
            self.history.restore(state.get("checkpoint_history"))
        subset = None if state.get("subset") is None else state["subset"].numpy()
        return dataclasses.replace(states, subset=subset, log_bytes=state.get("log_bytes"))

    @staticmethod
    def _restore_callbacks(callbacks: list, state: dict) -> None:
        saved = dict(state.get("callbacks", {}))
        for key, cb in callback_keys(callbacks):
            if key in saved:
                cb.load_state_dict(saved.pop(key))
        dropped = [k for k, v in saved.items() if v]
        if dropped:
            raise LotusError(
                f"resume: the run was saved with feature state ({', '.join(dropped)}) that this config "
                "does not use; resume with the run's own config (no --set that switches features off)"
            )

    # ----------------------------------------------------------------- write
    @staticmethod
    def state_of(states: TrainingStates, plan_mode: str) -> dict:
        """Everything a resume needs (collective under FSDP2: every rank calls it)."""
        model_sd, optim_sd = get_full_state(states.model, states.optimizer)
        plan = get_plan(states.model) if plan_mode == "auto" else None
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": states.scheduler.state_dict(),
            **states.counters.state_dict(),
            **capture_rng(states.rng),
            "subset": None if states.subset is None else torch.as_tensor(np.asarray(states.subset)),
            "callbacks": {key: cb.state_dict() for key, cb in callback_keys(states.callbacks)},
            "events": list(states.events),
            "log_bytes": states.log_bytes,
            "stepper": states.stepper.state_dict(),
            "parallel_plan": None if plan is None else plan.to_dict(),
        }

    def save(self, states: TrainingStates, metrics: dict, cfg: Any, data_meta: dict, is_main: bool) -> None:
        """End of an epoch: ``best``/``last`` weights (as ``cfg.output`` says; ``data_meta``: mean/std, classes
        and eval preprocessing for their metadata) and ``state.pt``."""
        if not self.write:
            return
        state = self.state_of(states, cfg.parallel.mode)
        if not is_main:
            return
        state["last_metrics"] = dict(metrics)  # a run killed after its last checkpoint is finalised from it
        bare = unwrap(states.model)
        # FSDP2: write the gathered weights, masks folded into them as export_state_dict does for plain models
        full = fold_parametrized_state(state["model"]) if is_sharded(bare) else None
        out = cfg.output
        acc = metrics.get("val_acc")
        st = states.counters
        meta = {"epoch": st.epoch, "step": st.step, "val_acc": acc, "model": cfg.model.name, "data": data_meta}
        if acc is not None and acc > st.best_acc:
            st.best_acc = state["best_acc"] = acc
            if out.save_best:
                save_weights(
                    bare,
                    os.path.join(self.run_dir, "best.safetensors"),
                    meta,
                    state_dict=full,
                    model_cfg=cfg.model,
                )
        if out.save_last:
            save_weights(
                bare, os.path.join(self.run_dir, "last.safetensors"), meta, state_dict=full, model_cfg=cfg.model
            )
        state["checkpoint_history"] = self.history.update(
            st.epoch,
            st.step,
            acc,
            lambda path: save_weights(bare, path, meta, state_dict=full, model_cfg=cfg.model),
        )
        save_state(self.state_path, state)
        self.history.commit()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain weights of ``model`` (gathered under FSDP2; collective there)."""
    return (
        fold_parametrized_state(get_full_state(model)[0])
        if is_sharded(unwrap(model))
        else export_state_dict(unwrap(model))
    )
