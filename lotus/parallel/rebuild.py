"""Changing a data-parallel model mid-run: full weights on every rank, a plain copy, re-wrapping, agreement.

A pruning event under DDP or FSDP2 (:mod:`lotus.features.pruning.distributed`) works on a *plain* model:
:func:`full_state` gathers the full model and optimizer state on every rank (``DTensor.full_tensor`` through
``torch.distributed.checkpoint.state_dict``), :func:`plain_copy` loads it into a fresh module of the current
widths, the event changes that copy the same way on every rank, and :func:`swap_model` wraps it again
(``Trainer.wrap_model``: activation checkpointing, ``fully_shard`` or DDP per the plan, with the planner of
``parallel.mode: auto`` solving again for the new widths and logging a ``replan`` event) and rebuilds the
optimizer with the carried state. :func:`agree` checks that every rank made the same decision.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule

from lotus.callbacks import Trainer
from lotus.parallel.apply import get_plan
from lotus.parallel.full_state import set_full_state

__all__ = ["full_state", "plain_copy", "swap_model", "agree", "digest", "reduce_sum_fn", "shard_batches"]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts on *every* rank, keyed by plain parameter names
    (collective under FSDP2; the tensors stay on the device)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else {}
    return model_sd, optim_sd


def plain_copy(
    trainer: Trainer, model_sd: dict[str, torch.Tensor], prepare: Callable[[nn.Module, dict], None] | None = None
) -> nn.Module:
    """A fresh plain model on the trainer's device holding ``model_sd``; ``prepare(model, model_sd)`` first
    gives it the saved shapes (thinned widths, mask parametrizations). The global RNG is left untouched."""
    d = trainer.data
    model_cfg = dataclasses.replace(trainer.cfg.model, pretrained=False, checkpoint=None)  # weights come next
    from lotus.models import create_model

    with torch.random.fork_rng(devices=[]):
        model = create_model(model_cfg, d.num_classes, d.in_chans, d.img_size)
    if prepare is not None:
        prepare(model, model_sd)
    model.load_state_dict(model_sd)
    return model.to(trainer.device)


def _plan_summary(plan: Any) -> dict | None:
    if plan is None:
        return None
    return {
        "mode": plan.mode,
        "blocks": [c.memory + ("" if c.reshard_after_forward else "/keep") for c in plan.blocks],
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "predicted_step_time_s": plan.predicted_step_time_s,
    }


def swap_model(
    trainer: Trainer,
    plain: nn.Module,
    optim_sd: dict,
    transform: Callable[[dict], dict] | None = None,
    replan_reason: str | None = None,
) -> None:
    """Make ``plain`` the trainer's model: wrap it again, rebuild the optimizer with ``transform(optim_sd)``
    (full, name-keyed; e.g. sliced to thinned shapes). With ``replan_reason`` (its shapes changed) and
    ``parallel.mode: auto`` the planner solves again (with ``parallel.memory_budget``) and a ``replan``
    event records the old and new per-block plans and the reason; otherwise the current plan is kept."""
    par = trainer.cfg.parallel
    old = get_plan(trainer.model)
    replan = replan_reason is not None and par.mode == "auto" and par.memory_budget is not None
    wrapped = trainer.wrap_model(plain, replan=True) if replan else trainer.wrap_model(plain, plan=old)
    trainer.replace_model(plain, wrapped)
    for m in plain.modules():  # FSDP2 allocates its unsharded parameters at the first all-gather: do it
        if isinstance(m, FSDPModule):  # here, not inside the next evaluation's inference_mode
            m.unshard()
            m.reshard()
    state = transform(optim_sd) if transform is not None else optim_sd

    def load(_old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
        if state:
            set_full_state(trainer.model, new, None, state)

    trainer.rebuild_optimizer(load)
    if replan_reason is not None and par.mode == "auto":
        before, after = _plan_summary(old), _plan_summary(get_plan(trainer.model))
        changed = before is None or after is None or any(before[k] != after[k] for k in ("mode", "blocks"))
        trainer.log(
            "replan",
            reason=replan_reason,
            replanned=replan,
            changed=changed,
            before=before,
            after=after,
            note=None
            if replan
            else "parallel.plan fixes the plan; set parallel.memory_budget to re-plan for the new widths",
        )


def digest(payload: Any) -> str:
    """A short stable hash of tensors / arrays / plain containers (what each rank decided)."""
    h = hashlib.sha1()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if isinstance(x, np.ndarray):
            h.update(str((x.dtype.str, x.shape)).encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    feed(payload)
    return h.hexdigest()[:16]


def agree(payload: Any, what: str) -> list[str]:
    """Every rank's :func:`digest` of ``payload`` (one ``all_gather_object``); raises when ranks differ."""
    mine = digest(payload)
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [mine]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, mine)
    if len(set(out)) != 1:
        raise RuntimeError(f"{what}: ranks made different decisions (digests {out})")
    return list(out)


def reduce_sum_fn(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A sum over ranks (``all_reduce`` on ``device``, result back where the tensor was); None on one rank."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        buf = t.detach().to(device).clone()
        tdist.all_reduce(buf)
        return buf.to(t.device)

    return reduce


def shard_batches(batches: Iterable, rank: int, world_size: int) -> tuple[list, bool]:
    """This rank's whole calibration batches (``rank::world_size``) and True, or every batch and False when
    there are fewer batches than ranks (then each rank computes the same statistics, unreduced)."""
    batches = list(batches)
    if world_size <= 1 or len(batches) < world_size:
        return batches, False
    return batches[rank::world_size], True
