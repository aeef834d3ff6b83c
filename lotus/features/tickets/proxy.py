"""Proxy trainings for offline scorers (``el2n``, ``forgetting``) on the Lotus training loop itself: the
same data pipeline, augmentation, optimiser and schedule as real runs, with no run directory."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lotus.callbacks import Callback
from lotus.config import Config, config_from_dict, config_to_dict
from lotus.errors import LotusError
from lotus.models import unwrap
from lotus.training import Trainer

__all__ = ["ProxyEpochEnd", "proxy_config", "make_proxy"]


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
    for section in ("tickets", "pruning", "outliers", "lotus"):
        d.pop(section, None)  # back to defaults: no subset, no sparsity, no monitoring, no schedule
    d["train"].update(epochs=epochs, seed=seed, max_steps=None, eval_every=epochs,
                      warmup_epochs=min(float(d["train"]["warmup_epochs"]), epochs * 0.2))
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
        trainer = Trainer(proxy_config(cfg, epochs, seed, model), callbacks=[ProxyEpochEnd(on_epoch_end)],
                          write=False, quiet=quiet)
        trainer.fit()
        out = unwrap(trainer.model).eval()
        if cache:
            trained[seed] = out
        return out

    proxy.config = {"trainer": "lotus.training.Trainer", "epochs": epochs, "model": model or cfg.model.name,
                    "lr": cfg.optim.lr, "optimizer": cfg.optim.name, "batch_size": cfg.data.batch_size,
                    "config": cfg.name}
    return proxy
