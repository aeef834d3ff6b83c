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
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from lotus.callbacks import Trainer
from lotus.data_meta import run_data_metadata
from lotus.errors import LotusError
from lotus.models import unwrap
from lotus.parallel.apply import get_plan
from lotus.parallel.full_state import fold_parametrized_state, get_full_state, is_sharded, set_full_state
from lotus.parallel.plan_file import Plan, plan_from_dict
from lotus.parallel.strategies import transformer_blocks
from lotus.training.checkpoint_history import CheckpointHistory
from lotus.training.state import capture_rng, restore_rng
from lotus.weights import export_state_dict, load_state, save_state, save_weights

__all__ = ["CheckpointManager", "callback_keys", "full_model_state", "REQUIRED_KEYS"]

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

    def restore_model(self, trainer: Trainer, state: dict) -> None:
        """Callback state, then shapes (``on_load_checkpoint``), then weights, into the unwrapped model."""
        self._restore_callbacks(trainer, state)
        for cb in trainer.callbacks:
            cb.on_load_checkpoint(trainer, state)
        try:
            trainer.model.load_state_dict(state["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LotusError(
                f"resume: the saved model does not fit this config (changed model settings?): {first}"
            ) from None

    @staticmethod
    def saved_plan(trainer: Trainer, state: dict) -> Plan | None:
        """``parallel.mode: auto``: the per-block plan the run was saved under, when it still applies (same
        world size, batch size and memory budget, the saved widths' block count). Solving again would time
        the blocks afresh and could choose another plan; a resumed run keeps its own."""
        par, saved = trainer.cfg.parallel, state.get("parallel_plan")
        if par.mode != "auto" or not saved:
            return None
        plan = plan_from_dict(saved, f"{trainer.run_dir}/state.pt", len(transformer_blocks(trainer.model)))
        same = (
            plan.world_size == trainer.dist.world_size
            and plan.batch_size == trainer.cfg.data.batch_size
            and (par.memory_budget is None or plan.budget_bytes == par.budget_bytes)
        )
        return plan if same else None

    def restore_training(self, trainer: Trainer, state: dict) -> None:
        """Optimiser, lr position, counters, RNG, subset and events (after the optimiser is built)."""
        set_full_state(trainer.model, trainer.optimizer, None, state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.state.load_state_dict(state)
        trainer.stepper.load_state_dict(state.get("stepper") or {})
        restore_rng(state, trainer.augment.gen)
        trainer.subset = None if state.get("subset") is None else state["subset"].numpy()
        trainer.run_log.events[:] = list(state.get("events", []))
        trainer.resumed_log_bytes = state.get("log_bytes")
        if self.write and trainer.dist.is_main:
            self.history.restore(state.get("checkpoint_history"))

    @staticmethod
    def _restore_callbacks(trainer: Trainer, state: dict) -> None:
        saved = dict(state.get("callbacks", {}))
        for key, cb in callback_keys(trainer.callbacks):
            if key in saved:
                cb.load_state_dict(saved.pop(key))
        dropped = [k for k, v in saved.items() if v]
        if dropped:
            raise LotusError(
                f"resume: the run was saved with feature state ({', '.join(dropped)}) that this config "
                "does not use; resume with the run's own config (no --set that switches features off)"
            )

    # ----------------------------------------------------------------- write
    def state_of(self, trainer: Trainer) -> dict:
        """Everything a resume needs (collective under FSDP2: every rank calls it)."""
        model_sd, optim_sd = get_full_state(trainer.model, trainer.optimizer)
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": trainer.scheduler.state_dict(),
            **trainer.state.state_dict(),
            **capture_rng(trainer.augment.gen),
            "subset": None if trainer.subset is None else torch.as_tensor(np.asarray(trainer.subset)),
            "callbacks": {key: cb.state_dict() for key, cb in callback_keys(trainer.callbacks)},
            "events": list(trainer.run_log.events),
            "log_bytes": trainer.run_log.size(),
            "stepper": trainer.stepper.state_dict(),
            "parallel_plan": _plan_dict(trainer),
        }

    def save(self, trainer: Trainer, metrics: dict) -> None:
        """End of an epoch: ``best``/``last`` weights (as configured) and ``state.pt``."""
        if not self.write:
            return
        state = self.state_of(trainer)
        if not trainer.dist.is_main:
            return
        state["last_metrics"] = dict(metrics)  # a run killed after its last checkpoint is finalised from it
        bare = unwrap(trainer.model)
        # FSDP2: write the gathered weights, masks folded into them as export_state_dict does for plain models
        full = fold_parametrized_state(state["model"]) if is_sharded(bare) else None
        out = trainer.cfg.output
        acc = metrics.get("val_acc")
        st = trainer.state
        meta = {
            "epoch": st.epoch,
            "step": st.step,
            "val_acc": acc,
            "model": trainer.cfg.model.name,
            "data": run_data_metadata(trainer),
        }  # mean/std, classes, eval preprocessing
        if acc is not None and acc > st.best_acc:
            st.best_acc = state["best_acc"] = acc
            if out.save_best:
                save_weights(
                    bare,
                    os.path.join(self.run_dir, "best.safetensors"),
                    meta,
                    state_dict=full,
                    model_cfg=trainer.cfg.model,
                )
        if out.save_last:
            save_weights(
                bare, os.path.join(self.run_dir, "last.safetensors"), meta, state_dict=full, model_cfg=trainer.cfg.model
            )
        state["checkpoint_history"] = self.history.update(
            st.epoch,
            st.step,
            acc,
            lambda path: save_weights(bare, path, meta, state_dict=full, model_cfg=trainer.cfg.model),
        )
        save_state(self.state_path, state)
        self.history.commit()


def _plan_dict(trainer: Trainer) -> dict | None:
    plan = get_plan(trainer.model) if trainer.cfg.parallel.mode == "auto" else None
    return None if plan is None else plan.to_dict()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain weights of ``model`` (gathered under FSDP2; collective there)."""
    return (
        fold_parametrized_state(get_full_state(model)[0])
        if is_sharded(unwrap(model))
        else export_state_dict(unwrap(model))
    )
