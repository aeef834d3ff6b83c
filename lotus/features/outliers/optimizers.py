"""Non-diagonal preconditioners (SOAP, Shampoo) for ``optim.name: soap | shampoo``.

He et al. (2024) show that non-diagonal preconditioning (Shampoo, SOAP) trains with far fewer outlier
features than AdamW at the same speed. Both come from ``pytorch-optimizer`` (PyPI ``pytorch-optimizer``,
package ``pytorch_optimizer``), chosen over ``heavyball`` because:

- it runs eagerly on any device: no ``torch.compile``/triton anywhere, nothing global to switch off
  (``heavyball`` is compile-first: its kernels go through ``torch.compile`` unless one mutates the module
  global ``heavyball.utils.compile_mode``, and eager it was ~2.5x slower per step than pytorch-optimizer's
  SOAP on a 4-layer ViT on CPU);
- it has both optimisers the feature needs: ``SOAP`` (Vyas et al. 2024, Adam in Shampoo's eigenbasis) and
  ``ScalableShampoo`` (Anil et al.'s distributed Shampoo with layer-wise grafting), whereas heavyball only has
  SOAP and KL-Shampoo variants;
- it is maintained (frequent releases), typed, and depends only on torch and numpy.

``build(name, param_groups, optim_cfg)`` maps Lotus' ``optim`` fields (lr, betas, eps, weight_decay,
nesterov) to the optimiser and passes ``optim.extra`` as constructor keywords, rejecting unknown keys (the
library would silently ignore a typo).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["OPTIMIZERS", "build", "optimizer_class"]

OPTIMIZERS = ("soap", "shampoo")

# Shampoo defaults tuned for Lotus-sized runs (thousands of steps, not millions): the library's
# preconditioning_compute_steps=1000 would leave short runs unpreconditioned. RMSProp grafting with an EMA
# momentum makes the step size behave like Adam's, so the same lr range works.
_SHAMPOO_DEFAULTS: dict[str, Any] = {
    "start_preconditioning_step": 25,
    "preconditioning_compute_steps": 10,
    "moving_average_for_momentum": True,
    "decoupled_weight_decay": True,
    "block_size": 256,
}
_GRAFTS = ("none", "sgd", "adagrad", "rmsprop", "sqrtn")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimiser class behind ``optim.name``."""
    try:
        import pytorch_optimizer
    except ImportError:
        raise ValueError(
            f"optim.name: {name!r} needs the pytorch-optimizer package (pip install pytorch-optimizer)"
        ) from None
    if name == "soap":
        return pytorch_optimizer.SOAP
    if name == "shampoo":
        return pytorch_optimizer.ScalableShampoo
    raise ValueError(f"optim.name: expected one of {', '.join(OPTIMIZERS)} here, got {name!r}")


def _check_extra(cls: type, name: str, extra: dict) -> None:
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params", "kwargs")]
    for key in extra:
        if key not in allowed:
            raise ValueError(f"optim.extra.{key}: not an option of {name} (allowed: {', '.join(allowed)})")


def build(
    name: str, param_groups: Iterable[dict] | Iterable[torch.nn.Parameter], optim_cfg: Any
) -> torch.optim.Optimizer:
    """Build SOAP or Shampoo over ``param_groups`` from the ``optim`` config section.

    Per-group keys (e.g. ``weight_decay: 0.0`` for norms, biases and OP gains) are kept; ``optim.extra``
    overrides or adds constructor keywords (e.g. ``precondition_frequency`` for SOAP).
    """
    cls = optimizer_class(name)
    extra = dict(getattr(optim_cfg, "extra", None) or {})
    _check_extra(cls, name, extra)
    betas = tuple(float(b) for b in optim_cfg.betas)
    if name == "soap":
        kwargs: dict[str, Any] = {
            "lr": optim_cfg.lr,
            "betas": betas,
            "eps": optim_cfg.eps,
            "weight_decay": optim_cfg.weight_decay,
        }
    else:
        from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

        kwargs = {
            "lr": optim_cfg.lr,
            "betas": betas,
            "diagonal_eps": optim_cfg.eps,
            "weight_decay": optim_cfg.weight_decay,
            "nesterov": bool(optim_cfg.nesterov),
            "graft_type": LayerWiseGrafting.RMSPROP,
            **_SHAMPOO_DEFAULTS,
        }
        graft = extra.get("graft_type")
        if isinstance(graft, str):
            if graft.lower() not in _GRAFTS:
                raise ValueError(f"optim.extra.graft_type: expected one of {', '.join(_GRAFTS)}, got {graft!r}")
            extra["graft_type"] = LayerWiseGrafting[graft.upper()]
    kwargs.update(extra)
    try:
        return cls(param_groups, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"optim: cannot build {name}: {str(e).splitlines()[0] if str(e) else e}") from None
