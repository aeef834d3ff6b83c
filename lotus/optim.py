"""Optimiser and learning-rate schedule construction from the ``optim``/``train`` config sections."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers, param_groups_layer_decay

from lotus.errors import ConfigError
from lotus.features.outliers.optimizers import OPTIMIZERS, build

__all__ = ["param_groups", "build_optimizer", "optimizer_names", "check_optimizer_name", "CosineSchedule", "LrSchedule"]


def optimizer_names() -> list[str]:
    """Every ``optim.name``: timm's optimiser registry plus SOAP and Shampoo (pytorch-optimizer)."""
    return sorted(set(list_optimizers()) | set(OPTIMIZERS))


def check_optimizer_name(name: str, key: str = "optim.name") -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless ``name`` is a known optimiser (``lookahead_`` prefix ok)."""
    base = name.lower().removeprefix("lookahead_")
    names = optimizer_names()
    if base in names:
        return
    import difflib

    close = difflib.get_close_matches(base, names, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(
        f"{key}: expected one of timm's optimizers (timm.optim.list_optimizers(): "
        f"{', '.join(names[:6])}, ...) or soap | shampoo, got {name!r}{hint}"
    )


def _timm_optimizer(name: str, groups: list[dict], optim_cfg: Any) -> torch.optim.Optimizer:
    """Any other name through timm's ``create_optimizer_v2`` over Lotus' own parameter groups.

    lr, weight_decay, momentum, betas and eps come from the ``optim`` section (timm drops betas/eps for
    optimisers without them); ``optim.extra`` adds constructor keywords. The groups keep their own
    ``weight_decay`` (0 for biases, norms and gains) and ``lr_scale`` (layer decay)."""
    base = name.lower().removeprefix("lookahead_")
    info = get_optimizer_info(base)
    kwargs: dict[str, Any] = {"eps": optim_cfg.eps}
    if info.num_betas == 2:  # adan takes three betas: its own defaults unless optim.extra.betas
        kwargs["betas"] = tuple(float(b) for b in optim_cfg.betas)
    if info.has_momentum and "nesterov" in (info.defaults or {}) and optim_cfg.nesterov:
        kwargs["nesterov"] = True
    kwargs.update(optim_cfg.extra)
    if isinstance(info.opt_class, str):  # apex.* / bitsandbytes.*: CUDA kernels of another package
        import importlib.util

        package = info.opt_class.split(".")[0]
        if importlib.util.find_spec(package) is None or not torch.cuda.is_available():
            raise ConfigError(
                f"optim.name: {name} needs CUDA and the {package} package "
                f"({'not installed' if importlib.util.find_spec(package) is None else 'no CUDA device'})"
            )
    try:
        return create_optimizer_v2(
            groups,
            opt=name.lower(),
            lr=optim_cfg.lr,
            weight_decay=optim_cfg.weight_decay,
            momentum=optim_cfg.momentum,
            **kwargs,
        )
    except ImportError as e:  # bnb* (bitsandbytes), fused* (apex), ...
        raise ConfigError(f"optim.name: {name} needs a package that is not installed ({e})") from None


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
    """AdamW (fused) or SGD here; SOAP/Shampoo from ``lotus.features.outliers.optimizers``; every other name of
    timm's registry through ``timm.optim.create_optimizer_v2``, all over the same parameter groups.

    A bad ``optim.extra`` keyword or value raises a :class:`~lotus.errors.ConfigError` naming it.
    """
    if getattr(optim_cfg, "layer_decay", None):
        bare = getattr(model, "module", model)  # timm's grouping by block depth (group_matcher of the model)
        groups = param_groups_layer_decay(
            bare,
            optim_cfg.weight_decay,
            layer_decay=optim_cfg.layer_decay,
            no_weight_decay_list=set(getattr(bare, "no_weight_decay", lambda: set())()),
        )
    else:
        groups = param_groups(model, optim_cfg.weight_decay)
    name = optim_cfg.name
    try:
        if name == "adamw":
            # the fused kernel is several times faster than the for-each one on CPU and CUDA, same maths
            extra = {
                "fused": all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]),
                **optim_cfg.extra,
            }
            return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, **extra)
        if name == "sgd":
            return torch.optim.SGD(
                groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov, **optim_cfg.extra
            )
        if name in OPTIMIZERS:
            return build(name, groups, optim_cfg)
        check_optimizer_name(name)
        return _timm_optimizer(name, groups, optim_cfg)
    except TypeError as e:  # an optim.extra keyword the torch optimiser does not take
        if not optim_cfg.extra:
            raise
        raise ConfigError(
            f"optim.extra: {name} does not accept {', '.join(map(str, optim_cfg.extra))} ({str(e).splitlines()[0]})"
        ) from None
    except ValueError as e:  # messages name the key (optim.name, optim.extra.<key>) or say optim: cannot build
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(text if text.startswith("optim") else f"optim: cannot build {name}: {text}") from None


class CosineSchedule:
    """Linear warm-up then cosine decay, driven by fractional epochs (robust to subsets that change the
    number of steps per epoch). ``lr(t) = min_lr + (base - min_lr) * 0.5 * (1 + cos(pi * progress))``."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, min_lr: float, warmup: float, total: float):
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


class LrSchedule(CosineSchedule):
    """The run's lr schedule (``optim.sched``) on the fractional-epoch clock: ``train.warmup_epochs`` of the
    linear warm-up above, then

    * ``cosine``: :class:`CosineSchedule` to ``train.min_lr`` at ``train.epochs - optim.cooldown_epochs`` (the
      same values as timm's ``CosineLRScheduler`` up to float rounding; with no cooldown, those of earlier runs);
    * ``poly`` / ``tanh``: timm's scheduler over the same span (starting after the warm-up), ``step`` /
      ``multistep``: timm's, at absolute epochs (``decay_epochs`` / ``decay_milestones``), all built by
      ``timm.scheduler.create_scheduler_v2`` on a one-group proxy optimiser and read with ``_get_lr(t)`` at
      fractional ``t``;
    * ``plateau``: ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (mode max on ``val_acc``, factor
      ``decay_rate``, ``patience_epochs``; timm's PlateauLRScheduler wraps it but is deprecated and does not
      save its counters), stepped by :meth:`observe` after each evaluation past the warm-up; its full state is
      in :meth:`state_dict`, so a resumed run decays at the same epochs.

    Each group gets ``lr * lr_scale`` (layer decay), as timm's ``Scheduler.update_groups`` does.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim_cfg: Any, train_cfg: Any):
        self.kind = getattr(optim_cfg, "sched", "cosine")
        cooldown = getattr(optim_cfg, "cooldown_epochs", 0.0) if self.kind in ("cosine", "poly", "tanh") else 0.0
        super().__init__(
            optimizer, optim_cfg.lr, train_cfg.min_lr, train_cfg.warmup_epochs, train_cfg.epochs - cooldown
        )
        self._timm = self._plateau = None
        proxy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim_cfg.lr)  # lr holder, never stepped
        if self.kind in ("step", "multistep", "poly", "tanh"):
            from timm.scheduler import create_scheduler_v2

            self._timm, _ = create_scheduler_v2(
                proxy,
                sched=self.kind,
                num_epochs=max(self.total - self.warmup, 1e-12),
                decay_epochs=optim_cfg.decay_epochs,
                decay_milestones=list(optim_cfg.decay_milestones),
                decay_rate=optim_cfg.decay_rate,
                min_lr=self.min_lr,
                warmup_epochs=0,
                step_on_epochs=True,
            )
        elif self.kind == "plateau":
            proxy.param_groups[0]["lr"] = 1.0  # the scale on base_lr
            self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                proxy,
                mode="max",
                factor=optim_cfg.decay_rate,
                patience=optim_cfg.patience_epochs,
                min_lr=self.min_lr / self.base_lr,
            )

    def lr_at(self, t: float) -> float:
        if self.kind == "cosine" or (self.warmup > 0 and t < self.warmup):
            return super().lr_at(t)
        if self._plateau is not None:
            return self.base_lr * self._plateau.optimizer.param_groups[0]["lr"]
        shift = self.warmup if self.kind in ("poly", "tanh") else 0.0  # decay spans start after the warm-up
        return self.base_lr * self._timm._get_lr(t - shift)[0] / self._timm.base_values[0]

    def observe(self, metrics: dict) -> None:
        """After an evaluation: ``plateau`` steps on ``val_acc`` (once the warm-up is over); others ignore it."""
        if self._plateau is not None and metrics.get("val_acc") is not None and self.position >= self.warmup:
            self._plateau.step(float(metrics["val_acc"]))

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._plateau is not None:
            state["plateau"] = self._plateau.state_dict()
            state["plateau_scale"] = float(self._plateau.optimizer.param_groups[0]["lr"])
        return state

    def load_state_dict(self, state: dict) -> None:
        if self._plateau is not None and "plateau" in state:
            self._plateau.load_state_dict(dict(state["plateau"]))
            self._plateau.optimizer.param_groups[0]["lr"] = float(state["plateau_scale"])
        super().load_state_dict(state)


def count_params(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)
