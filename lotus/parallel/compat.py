"""Which feature sections work together with data parallelism: one cross-section check for the config.

Supported under ``parallel.mode`` ddp / fsdp / auto (and with any activation checkpointing / offload):

* ``tickets.file`` (a fixed subset): the Trainer stripes the subset across ranks like the full data.
* ``tickets.patches`` (patch tickets): token selection happens inside the model's forward on each rank.
* ``outliers`` monitoring: every rank runs the same probe forward (collective under FSDP2).

Not supported (a :class:`~lotus.errors.ConfigError` at load time, rather than a hang or a crash later):

* ``tickets.dynamic`` with any data-parallel mode: per-sample losses are local to each rank, so the
  ranks would prune different samples and disagree on the epoch's batch count (collectives deadlock).
* ``pruning`` (masks or structured thinning) with any data-parallel mode: under FSDP2 masks and
  importance scores need whole weight matrices while ranks hold dim-0 shards; thinning changes parameter
  shapes mid-run, which DDP buckets and FSDP2 shards cannot follow; Wanda calibration activations and
  2:4 sparse kernels are per rank / cannot be all-reduced. (``lotus.prune`` refuses the same
  combination when it builds its callback; this check reports it when the config is loaded.)
* ``optim.name`` soap / shampoo under FSDP2: their preconditioners need whole parameter matrices.
* ``ema`` under FSDP2: the EMA copy is not sharded.
* ``lotus.schedule: auto`` with any data-parallel mode: its probes run on the unsharded model and its
  decisions read rank-local signals, so ranks could decide differently.
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
    if _get(cfg, "lotus.schedule", "fixed") == "auto":
        raise ConfigError(f"lotus.schedule: auto is not supported with {where} (its probes and signals are per "
                          "rank); use lotus.schedule: fixed, or set parallel.mode none")
    if _get(cfg, "tickets.dynamic.enabled", False):
        raise ConfigError(
            f"tickets.dynamic: not supported with {where} (per-sample losses stay on each rank, so ranks would prune "
            "different samples); export a ticket with lotus select and use tickets.file, or set parallel.mode none"
        )
    pruning = getattr(cfg, "pruning", None)
    if pruning is not None and bool(getattr(pruning, "enabled", False)):
        why = ("FSDP2 holds weight shards, masks and scores need whole matrices" if sharded else
               "masks, thinning and calibration are not synchronised across DDP ranks")
        raise ConfigError(f"pruning: not supported with {where} ({why}); prune in one process "
                          "(parallel.mode none), or prune first with lotus prune and train the result")
    optim = _get(cfg, "optim.name", "adamw")
    if sharded and optim in ("soap", "shampoo"):
        raise ConfigError(f"optim.name: {optim} is not supported with {where} (its preconditioners need whole "
                          "parameter matrices, FSDP2 shards them); use parallel.mode ddp or optim.name adamw")
    if sharded and _get(cfg, "ema.enabled", False):
        raise ConfigError(f"ema.enabled: not supported with {where} (the EMA copy would need the same FSDP2 "
                          "sharding); use parallel.mode ddp or none")
