"""Optimiser and learning-rate schedule construction from the ``optim``/``train`` config sections."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay

from lotus.errors import ConfigError
from lotus.features.outliers.optimizers import build

__all__ = ["param_groups", "build_optimizer", "CosineSchedule"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and never-decayed biases/norms/gains/tokens (ndim <= 1 or listed by
    the model's ``no_weight_decay()``, as timm's create_optimizer does)."""
    bare = getattr(model, "module", model)  # inside DistributedDataParallel
    skip = set(getattr(bare, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        base = name.replace(".parametrizations.", ".").replace(".original", "")
        if p.ndim <= 1 or base in skip or any(base.endswith(s) for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(optim_cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD here; SOAP/Shampoo come from ``lotus.features.outliers.optimizers``.

    A bad ``optim.extra`` keyword or value raises a :class:`~lotus.errors.ConfigError` naming it.
    """
    if getattr(optim_cfg, "layer_decay", None):
        bare = getattr(model, "module", model)  # timm's grouping by block depth (group_matcher of the model)
        groups = param_groups_layer_decay(bare, optim_cfg.weight_decay, layer_decay=optim_cfg.layer_decay,
                                          no_weight_decay_list=set(getattr(bare, "no_weight_decay", lambda: set())()))
    else:
        groups = param_groups(model, optim_cfg.weight_decay)
    name = optim_cfg.name
    try:
        if name == "adamw":
            # the fused kernel is several times faster than the for-each one on CPU and CUDA, same maths
            extra = {"fused": all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]),
                     **optim_cfg.extra}
            return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                     **extra)
        if name == "sgd":
            return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                                   nesterov=optim_cfg.nesterov, **optim_cfg.extra)
        return build(name, groups, optim_cfg)
    except TypeError as e:  # an optim.extra keyword the torch optimiser does not take
        if not optim_cfg.extra:
            raise
        raise ConfigError(f"optim.extra: {name} does not accept {', '.join(map(str, optim_cfg.extra))} "
                          f"({str(e).splitlines()[0]})") from None
    except ValueError as e:  # messages name the key (optim.name, optim.extra.<key>) or say optim: cannot build
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(text if text.startswith("optim") else f"optim: cannot build {name}: {text}") from None


class CosineSchedule:
    """Linear warm-up then cosine decay, driven by fractional epochs (robust to subsets that change the
    number of steps per epoch). ``lr(t) = min_lr + (base - min_lr) * 0.5 * (1 + cos(pi * progress))``."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, min_lr: float, warmup: float,
                 total: float):
        self.optimizer, self.base_lr, self.min_lr = optimizer, base_lr, min_lr
        self.warmup, self.total = warmup, total
        self.position = 0.0

    def lr_at(self, t: float) -> float:
        if self.warmup > 0 and t < self.warmup:
            return self.base_lr * max(t, 1e-3 * self.warmup) / self.warmup
        span = max(self.total - self.warmup, 1e-12)
        progress = min(max((t - self.warmup) / span, 0.0), 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def set_position(self, t: float) -> float:
        self.position = t
        lr = self.lr_at(t)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.set_position(float(state["position"]))


def count_params(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)
