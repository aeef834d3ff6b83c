"""Data tickets in lotus training: the ``tickets:`` config section, the subset callback and a proxy trainer.

``tickets.file`` names a ticket file written by ``lotus select`` (or :class:`data_tickets.TicketFile`);
training then runs on exactly its indices of the train split, after checking the file's dataset fingerprint
against the train set (size, labels hash, sampled pixels). ``tickets.dynamic`` (InfoBatch-style dynamic
pruning) and ``tickets.patches`` (patch tickets) live in :mod:`lotus.tickets_online`.

:func:`make_proxy` builds the short proxy trainings that scorers such as ``el2n`` and ``forgetting`` need on
the lotus training loop itself (same data pipeline, augmentation, optimiser and schedule as real runs).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from lotus.errors import ConfigError, LotusError
from lotus.tickets_online import DynamicConfig, PatchConfig

if TYPE_CHECKING:
    from lotus.config import Config
    from lotus.train import Trainer

__all__ = ["TicketsConfig", "TicketSubset", "ProxyEpochEnd", "callbacks", "make_proxy", "proxy_config", "load_ticket"]


@dataclass
class TicketsConfig:
    """``tickets:`` section. ``file``: a ticket ``.npz`` (from ``lotus select``); train on its subset only."""

    file: str | None = None
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)

    def check(self, prefix: str) -> None:
        if self.file is not None and not str(self.file).endswith(".npz"):
            raise ConfigError(f"{prefix}.file: expected a ticket .npz file (from lotus select), got {self.file!r}")


def load_ticket(path: str, key: str = "tickets.file"):
    """Load a ticket file, turning library errors into one-line :class:`LotusError` naming ``key``."""
    from data_tickets import TicketFile

    try:
        return TicketFile.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise LotusError(f"{key}: {e}") from None


def _indices_sha(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


class _TicketSubsetHooks:
    """Train on the indices of ``tickets.file`` (validated against the train split).

    Public as :class:`TicketSubset` (a :class:`lotus.train.Callback`; built on first use because
    ``lotus.train`` imports the config, which imports this module).
    """

    order = -100  # before dynamic pruning / patch tickets, which build on ``trainer.subset``

    def __init__(self, path: str):
        self.path = path
        self.indices: np.ndarray | None = None
        self._resumed_sha: str | None = None

    def on_fit_start(self, trainer: "Trainer") -> None:
        ticket = load_ticket(self.path)
        try:
            ticket.validate_against(trainer.train_set, labels=trainer.labels_train)
        except ValueError as e:
            raise LotusError(f"tickets.file: {e} (make a new one with lotus select on this config)") from None
        idx = np.sort(ticket.indices)
        sha = _indices_sha(idx)
        if self._resumed_sha is not None and sha != self._resumed_sha:
            raise LotusError(f"tickets.file: {self.path} changed since this run started (other indices); "
                             "restore the original file or start a new run")
        self.indices = idx
        trainer.subset = idx
        n = len(trainer.train_set)
        trainer.log("tickets", file=os.path.abspath(self.path), count=int(idx.size), train_size=n,
                    fraction=round(idx.size / n, 6), scorer=ticket.scorer, policy=ticket.policy, seed=ticket.seed)

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        trainer.subset = self.indices

    def state_dict(self) -> dict:
        return {"file": os.path.abspath(self.path),
                "indices_sha256": _indices_sha(self.indices) if self.indices is not None else ""}

    def load_state_dict(self, state: dict) -> None:
        self._resumed_sha = state.get("indices_sha256") or None


class _EpochEndHooks:
    """Calls a proxy's ``on_epoch_end(model, epoch)`` (epoch counted from 1) after every training epoch."""

    order = 1000

    def __init__(self, fn: Callable[[nn.Module, int], None] | None):
        self.fn = fn

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict) -> None:
        if self.fn is not None:
            from lotus.models import unwrap

            self.fn(unwrap(trainer.model), epoch + 1)


_LAZY = {"TicketSubset": _TicketSubsetHooks, "ProxyEpochEnd": _EpochEndHooks}


def __getattr__(name: str) -> Any:
    """Build the Callback subclasses on first use (lotus.train cannot be imported while config loads)."""
    if name in _LAZY:
        if name in globals():
            return globals()[name]
        from lotus.train import Callback

        impl = _LAZY[name]
        cls = type(name, (impl, Callback), {"__module__": __name__, "__doc__": impl.__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def callbacks(cfg: "Config") -> list:
    """Callbacks for ``cfg.tickets`` (the subset; dynamic/patch callbacks come from lotus.tickets_online)."""
    if cfg.tickets.file:
        return [__getattr__("TicketSubset")(cfg.tickets.file)]
    return []


def proxy_config(cfg: "Config", epochs: int, seed: int, model: str | None = None) -> "Config":
    """The config a proxy training runs: dense, full train split, ``epochs`` epochs, no run directory."""
    from lotus.config import config_from_dict, config_to_dict

    d = config_to_dict(cfg)
    for section in ("tickets", "pruning", "outliers", "lotus"):
        d.pop(section, None)  # back to defaults: no subset, no sparsity, no monitoring, no schedule
    d["train"].update(epochs=epochs, seed=seed, max_steps=None, eval_every=epochs,
                      warmup_epochs=min(float(d["train"]["warmup_epochs"]), epochs * 0.2))
    d["output"] = {"dir": None}
    if model is not None:
        d["model"].update(name=model, checkpoint=None, pretrained=False)
    d["name"] = f"{cfg.name}-proxy"
    return config_from_dict(d)


def make_proxy(cfg: "Config", epochs: int = 3, model: str | None = None, quiet: bool = True, cache: bool = False):
    """A :class:`data_tickets.proxy.Proxy` that trains ``epochs`` epochs with the lotus Trainer.

    Calling it with ``seed`` trains a fresh model (``train.seed = seed``) on the full train split of ``cfg``
    (ticket/pruning/outlier/schedule sections reset to defaults), calls ``on_epoch_end(model, epoch)`` after
    every epoch and returns the trained (bare) model. ``model`` swaps in another timm model name (a smaller
    proxy). Nothing is written to disk. ``cache=True`` keeps every trained model by seed and hands it out
    again for a later call with the same seed (training is deterministic), e.g. to score several ways.
    """
    if epochs < 1:
        raise LotusError(f"--proxy-epochs: expected int >= 1, got {epochs}")
    proxy_config(cfg, epochs, cfg.train.seed, model)  # validate now (clear errors before any training)
    trained: dict[int, nn.Module] = {}

    def proxy(seed: int, on_epoch_end: Callable[[nn.Module, int], None] | None = None) -> nn.Module:
        from lotus.models import unwrap
        from lotus.train import Trainer

        if cache and on_epoch_end is None and seed in trained:
            return trained[seed]
        pc = proxy_config(cfg, epochs, seed, model)
        trainer = Trainer(pc, callbacks=[__getattr__("ProxyEpochEnd")(on_epoch_end)], write=False, quiet=quiet)
        trainer.fit()
        out = unwrap(trainer.model).eval()
        if cache:
            trained[seed] = out
        return out

    proxy.config = {"trainer": "lotus.train.Trainer", "epochs": epochs, "model": model or cfg.model.name,
                    "lr": cfg.optim.lr, "optimizer": cfg.optim.name, "batch_size": cfg.data.batch_size,
                    "config": cfg.name}
    return proxy
