"""Which feature sections work together with data parallelism: one cross-section check for the config.

Supported under ``parallel.mode`` ddp / fsdp / auto (and with any activation checkpointing / offload):

* ``tickets.file`` (a fixed subset): the Trainer stripes the subset across ranks like the full data.
* ``tickets.patches`` (patch tickets): token selection happens inside the model's forward on each rank.
* ``outliers`` monitoring: every rank runs the same probe forward (collective under FSDP2).
* ``tickets.dynamic`` (dynamic data pruning) with any data rule that declares ``distributed`` (all built-in
  ones): each epoch's losses are summed over ranks on the device, so every rank computes the same plan
  (:mod:`lotus.features.dynamic.callback`), and the Trainer shards its order like ``DistributedSampler``.
* ``pruning`` (masks, one-shot or gradual, and structured thinning): calibration is sharded and reduced,
  every rank makes the same decision, and the model is rebuilt and re-wrapped
  (:mod:`lotus.features.pruning.distributed`).
* ``schedule.mode: auto``: every rank probes the same batches (an FSDP2 model through a plain full copy),
  the measured signals are averaged over ranks before the rules see them, and the ranks compare digests of
  their decision lists after each round (:mod:`lotus.features.schedule.auto_probes`).

Not supported (a :class:`~lotus.errors.ConfigError` at load time, rather than a hang or a crash later):

* ``pruning.sparse_kernels`` with any data-parallel mode: the 2:4 ``SemiSparseLinear`` modules hold
  ``torch.sparse`` semi-structured weights that DDP buckets and FSDP2 shards cannot hold.
* ``optim.name`` soap / shampoo under FSDP2: their preconditioners need whole parameter matrices.
* ``ema`` under FSDP2: the EMA copy is not sharded.
* ``tickets.dynamic.rule`` naming a data rule with ``distributed = False`` (its plan is not a function of
  the merged state, so ranks could disagree).
"""

from __future__ import annotations

from typing import Any

from lotus.errors import ConfigError

__all__ = ["check_compat"]


def _get(obj: Any, path: str, default: Any = None) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return default
    return obj


def check_compat(cfg: Any) -> None:
    """Raise a one-line :class:`ConfigError` for feature combinations that do not work with
    ``cfg.parallel.mode`` (see the module docstring for the list)."""
    mode = _get(cfg, "parallel.mode", "none")
    if mode == "none":
        return
    sharded = mode in ("fsdp", "auto")
    where = f"parallel.mode {mode!r}"
    if _get(cfg, "pruning.enabled", False) and _get(cfg, "pruning.sparse_kernels", False):
        raise ConfigError(
            f"pruning.sparse_kernels: not supported with {where} (2:4 sparse weights cannot be "
            "sharded or bucketed); train with masked dense weights (sparse_kernels: false)"
        )
    optim = _get(cfg, "optim.name", "adamw")
    if sharded and optim in ("soap", "shampoo"):
        raise ConfigError(
            f"optim.name: {optim} is not supported with {where} (its preconditioners need whole "
            "parameter matrices, FSDP2 shards them); use parallel.mode ddp or optim.name adamw"
        )
    if _get(cfg, "tickets.dynamic.enabled", False):
        from data_tickets.rules import get_rule

        rule = _get(cfg, "tickets.dynamic.rule", "infobatch")
        if not get_rule(rule).distributed:
            raise ConfigError(
                f"tickets.dynamic.rule: the data rule {rule!r} does not support {where} (it declares "
                "distributed = False); use parallel.mode none or a rule whose plan every rank computes alike"
            )
    if sharded and _get(cfg, "ema.enabled", False):
        raise ConfigError(
            f"ema.enabled: not supported with {where} (the EMA copy would need the same FSDP2 "
            "sharding); use parallel.mode ddp or none"
        )
