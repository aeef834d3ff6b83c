"""Proxy trainings for offline scorers (``el2n``, ``forgetting``) on the Lotus training loop itself: the
same data pipeline, augmentation, optimiser and schedule as real runs, with no run directory. With a cache
folder (:func:`make_cached_proxy`) each seed trains once and every later scorer or ``lotus select`` replays it
(:mod:`data_tickets.proxy_cache`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

from data_tickets import __version__ as data_tickets_version
from data_tickets import dataset_fingerprint
from data_tickets.proxy_cache import cached_proxy
from lotus.callbacks import Callback
from lotus.config import Config, config_from_dict, config_to_dict
from lotus.data import DataBundle
from lotus.errors import LotusError
from lotus.models import create_model, resolve_img_size, unwrap
from lotus.training import Trainer

__all__ = ["ProxyEpochEnd", "proxy_config", "make_proxy", "proxy_cache_key", "make_cached_proxy"]

# settings that do not change what a proxy training computes (speed, logging, where files go)
_NOT_IN_KEY = {
    "data": ("root", "download", "num_workers", "eval_batch_size"),
    "train": ("seed", "threads", "log_every_n_steps", "finite_check_every", "device", "eval_every"),
}


class ProxyEpochEnd(Callback):
    """Calls a proxy's ``on_epoch_end(model, epoch)`` (epoch counted from 1) after every training epoch."""

    def __init__(self, fn: Callable[[nn.Module, int], None] | None):
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if self.fn is not None:
            self.fn(unwrap(trainer.model), epoch + 1)


def proxy_config(cfg: Config, epochs: int, seed: int, model: str | None = None) -> Config:
    """The config a proxy training runs: dense, full train split, ``epochs`` epochs, no run directory."""
    d = config_to_dict(cfg)
    for section in ("tickets", "pruning", "outliers", "schedule"):
        d.pop(section, None)  # back to defaults: no subset, no sparsity, no monitoring, no schedule
    d["train"].update(
        epochs=epochs,
        seed=seed,
        max_steps=None,
        eval_every=epochs,
        warmup_epochs=min(float(d["train"]["warmup_epochs"]), epochs * 0.2),
    )
    d["output"] = {"dir": None}
    if model is not None:
        d["model"].update(name=model, checkpoint=None, pretrained=False)
    d["name"] = f"{cfg.name}-proxy"
    return config_from_dict(d)


def make_proxy(cfg: Config, epochs: int = 3, model: str | None = None, quiet: bool = True, cache: bool = False):
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
        if cache and on_epoch_end is None and seed in trained:
            return trained[seed]
        trainer = Trainer(
            proxy_config(cfg, epochs, seed, model), callbacks=[ProxyEpochEnd(on_epoch_end)], write=False, quiet=quiet
        )
        trainer.fit()
        out = unwrap(trainer.model).eval()
        if cache:
            trained[seed] = out
        return out

    proxy.config = {
        "trainer": "lotus.training.Trainer",
        "epochs": epochs,
        "model": model or cfg.model.name,
        "lr": cfg.optim.lr,
        "optimizer": cfg.optim.name,
        "batch_size": cfg.data.batch_size,
        "config": cfg.name,
    }
    return proxy


def proxy_cache_key(cfg: Config, data: DataBundle, epochs: int, model: str | None, device: torch.device) -> dict:
    """What determines a proxy training (the seed is added per call): the train split's fingerprint, the
    proxy's model/data/optim/train settings, the device type and the library versions."""
    d = config_to_dict(proxy_config(cfg, epochs, 0, model))
    for section, keys in _NOT_IN_KEY.items():
        for k in keys:
            d[section].pop(k, None)
    return {
        "data": dataset_fingerprint(data.train, data.labels_train),
        "config": {k: d[k] for k in ("model", "data", "optim", "train", "parallel")},
        "device": torch.device(device).type,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "data_tickets": data_tickets_version},
    }


def make_cached_proxy(
    cfg: Config,
    data: DataBundle,
    folder: str,
    epochs: int = 3,
    model: str | None = None,
    quiet: bool = True,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = print,
) -> Any:
    """:func:`make_proxy` behind the disk cache in ``folder``: a seed already trained there (same data, model,
    optimiser and schedule) is replayed instead of trained (``log`` says "reusing proxy <fp>")."""
    proxy = make_proxy(cfg, epochs=epochs, model=model, quiet=quiet)
    pcfg = proxy_config(cfg, epochs, cfg.train.seed, model)

    def model_fn() -> nn.Module:
        return create_model(pcfg.model, data.num_classes, data.in_chans, resolve_img_size(pcfg.model))

    return cached_proxy(
        proxy, model_fn, folder, proxy_cache_key(cfg, data, epochs, model, device), device=device, log=log
    )
