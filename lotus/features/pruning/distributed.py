"""Pruning events in a data-parallel run (``parallel.mode`` ddp / fsdp / auto under torchrun).

Every rank must reach the same decision, and the model must be rebuilt when its shapes or its parameter
layout change:

* **Calibration** (Taylor / activation importance, Wanda): the run's ``pruning.calib_batches`` batches are
  split whole across ranks (``rank::world_size``; every rank takes all of them when there are fewer batches
  than ranks) and the statistics are summed with ``all_reduce`` before they become scores, so every rank
  gets the scores a single process would compute on all the batches.
* **Structured thinning** (DDP and FSDP2): the full weights and optimizer state are gathered on every rank
  (:func:`lotus.parallel.rebuild.full_state`), a plain copy is thinned with the reduced scores, the kept
  heads/neurons are checked to agree across ranks (digests in the ``prune_structured`` event), then the
  copy is wrapped again (``fully_shard`` / DDP, re-planned under ``parallel.mode: auto``) and the optimizer
  is rebuilt with its state sliced to the kept rows/columns.
* **Masks** (one-shot and gradual): each prune (a rise of the target) gathers a plain copy, masks it the
  same way on every rank (digests in the ``prune`` event) and wraps it again, with the optimizer state
  renamed to the parametrized weights (``<layer>.parametrizations.weight.original``): registering a
  parametrization in place would detach the weight from DDP's gradient hooks and from FSDP2's shards.
  Between prunes, the stored weights are re-zeroed under the masks (:func:`enforce_masks_sharded`: on
  FSDP2 shards with the matching shard of each replicated mask).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

import pruning
from lotus.callbacks import Trainer
from lotus.errors import LotusError
from lotus.parallel.full_state import is_sharded
from lotus.parallel.rebuild import agree, full_state, plain_copy, reduce_sum_fn, shard_batches, swap_model
from pruning.masks import get_mask, make_filter, masked_modules, set_mask
from pruning.optimizer_state import slice_optimizer_state

__all__ = [
    "is_parallel",
    "calibration",
    "restore_shapes",
    "thin_parallel",
    "prune_masks_parallel",
    "enforce_masks_sharded",
    "mask_sparsity",
    "MASK_SUFFIX",
]

MASK_SUFFIX = ".parametrizations.weight.0.mask"


def is_parallel(trainer: Trainer) -> bool:
    """True when the run is data parallel (several ranks) or its model is FSDP2-sharded."""
    return trainer.dist.world_size > 1 or is_sharded(trainer.unwrapped_model)


def calibration(trainer: Trainer, batches: list) -> tuple[list, Callable | None]:
    """This rank's calibration batches and the ``reduce_sum`` that completes their statistics (or None)."""
    mine, sharded = shard_batches(batches, trainer.dist.rank, trainer.dist.world_size)
    return mine, (reduce_sum_fn(trainer.device) if sharded else None)


def restore_shapes(model: nn.Module, model_state: dict, widths: dict | None) -> None:
    """Give a fresh model the saved shapes: thinned ``widths``, then a mask on every layer whose state has
    one (``<layer>.parametrizations.weight.0.mask``)."""
    if widths:
        pruning.apply_widths(model, widths)
    modules = dict(model.named_modules())
    for key, mask in model_state.items():
        if key.endswith(MASK_SUFFIX):
            fqn = key[: -len(MASK_SUFFIX)]
            if fqn not in modules:
                raise LotusError(
                    f"resume: masked layer {fqn} of the saved run is not in this model "
                    "(changed model or pruning settings?)"
                )
            set_mask(modules[fqn], mask)


def _flat_names(optim_sd: dict) -> list:
    return [p for g in optim_sd.get("param_groups", []) for p in g["params"]]


def thin_parallel(trainer: Trainer, config: pruning.StructuredConfig, calib: list | None, widths: dict | None) -> dict:
    """Structured thinning of a DDP / FSDP2 model (see the module docstring); returns the library's report
    with ``rank_digests`` (one digest of the kept heads/neurons per rank) added."""
    model_sd, optim_sd = full_state(trainer.model, trainer.optimizer)
    plain = plain_copy(trainer, model_sd, lambda m, sd: restore_shapes(m, sd, widths))
    del model_sd
    mine, reduce = calibration(trainer, calib) if calib is not None else (None, None)
    report = pruning.prune_structured(plain, config, calib_loader=mine, reduce_sum=reduce)
    report["rank_digests"] = agree(report["kept"], "pruning.structured")
    kept = report["kept_indices"]
    why = f"structured thinning: params {report['params_before']} -> {report['params_after']}"
    swap_model(
        trainer,
        plain,
        optim_sd,
        lambda sd: slice_optimizer_state(sd, kept, _flat_names(sd)) if sd else sd,
        replan_reason=why,
    )
    return report


def prune_masks_parallel(
    trainer: Trainer, pruner: pruning.GradualPruner, progress: float, widths: dict | None, filter_args: tuple
) -> dict | None:
    """One :meth:`GradualPruner.step` of a DDP / FSDP2 model: a plain copy is masked (when the target rose)
    and wrapped again; otherwise the weights are re-zeroed under the masks. Returns the prune report or None."""
    if pruner.target(progress) <= pruner.current + 1e-12:
        enforce_masks_sharded(trainer.unwrapped_model)
        return None
    model_sd, optim_sd = full_state(trainer.model, trainer.optimizer)
    plain = plain_copy(trainer, model_sd, lambda m, sd: restore_shapes(m, sd, widths))
    before = set(masked_modules(plain))
    pruner.model, pruner.filter_fn = plain, make_filter(plain, *filter_args)
    report = pruner.step(progress)
    new = [f for f in masked_modules(plain) if f not in before]
    report["rank_digests"] = agree({f: get_mask(m) for f, m in masked_modules(plain).items()}, "pruning masks")
    rename = {f"{f}.weight": f"{f}.parametrizations.weight.original" for f in new}

    def renamed(sd: dict) -> dict:
        if not sd:
            return sd
        state = {rename.get(k, k): v for k, v in sd["state"].items()}
        groups = [dict(g, params=[rename.get(p, p) for p in g["params"]]) for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    swap_model(trainer, plain, optim_sd, renamed)  # same shapes: the plan is kept
    return report


@torch.no_grad()
def enforce_masks_sharded(model: nn.Module) -> None:
    """:func:`pruning.masks.enforce_masks_` for FSDP2: each rank zeroes its dim-0 shard of every masked
    weight with the same shard of the (replicated) mask; plain weights as usual."""
    for m in masked_modules(model).values():
        raw = m.parametrizations.weight.original
        mask = get_mask(m)
        if isinstance(raw, DTensor):
            local = distribute_tensor(mask.to(raw.dtype), raw.device_mesh, raw.placements, src_data_rank=None)
            raw.to_local().mul_(local.to_local())
        else:
            raw.mul_(mask.to(raw.dtype))


def mask_sparsity(model: nn.Module) -> dict:
    """Sparsity of the masked layers counted from the masks (under FSDP2 the weights are shards)."""
    masks = [get_mask(m) for m in masked_modules(model).values()]
    total = sum(int(x.numel()) for x in masks)
    kept = sum(int(x.sum()) for x in masks)
    return {"params": total, "nonzeros": kept, "sparsity": 1.0 - kept / total if total else 0.0}
