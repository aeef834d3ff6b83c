"""Model construction: any timm model by name, plus Lotus' small registered ViTs."""
from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from lotus.checkpoint import load_weights
from lotus.errors import LotusError
from lotus.models import vit as _vit  # noqa: F401  (registers lotus_vit_* with timm)
from lotus.models.op_block import op_model_kwargs

__all__ = ["create_model", "model_kwargs", "resolve_img_size", "unwrap"]


def resolve_img_size(model_cfg: Any) -> int:
    """Model input size: ``model.img_size`` or the timm model's own default (224 if it has none)."""
    if model_cfg.img_size:
        return model_cfg.img_size
    if timm.is_model(model_cfg.name):
        pcfg = timm.models.get_pretrained_cfg(model_cfg.name)
        size = getattr(pcfg, "input_size", None) if pcfg is not None else None
        if size:
            return int(size[-1])
    return 224


def model_kwargs(model_cfg: Any, num_classes: int, in_chans: int, img_size: int | None) -> dict:
    """The kwargs passed to ``timm.create_model`` for this config (explicit config values win)."""
    kw: dict[str, Any] = {"num_classes": model_cfg.num_classes or num_classes,
                          "in_chans": model_cfg.in_chans or in_chans}
    size = model_cfg.img_size or img_size
    if size is not None:
        kw["img_size"] = size
    if model_cfg.patch_size is not None:
        kw["patch_size"] = model_cfg.patch_size
    if model_cfg.drop_path_rate:
        kw["drop_path_rate"] = model_cfg.drop_path_rate
    kw.update(model_cfg.kwargs)
    return kw


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
    raise LotusError(f"model.name: unknown timm model {name!r}{hint}")


def create_model(model_cfg: Any, num_classes: int, in_chans: int, img_size: int | None = None) -> nn.Module:
    """Build ``model_cfg.name`` with timm, then load ``model_cfg.checkpoint`` if given.

    ``model.pretrained: true`` uses timm's normal download; offline that fails with a message saying to
    pass ``model.checkpoint`` (a local safetensors/state-dict file) instead.
    """
    _check_name(model_cfg.name)
    kw = model_kwargs(model_cfg, num_classes, in_chans, img_size)
    if model_cfg.block == "op":
        depth = kw.get("depth") or _default_depth(model_cfg.name)
        kw.update(op_model_kwargs(model_cfg.op, depth))
    try:
        model = timm.create_model(model_cfg.name, pretrained=model_cfg.pretrained, **kw)
    except TypeError as e:
        raise LotusError(f"model.kwargs: {model_cfg.name} does not accept these arguments ({e})") from None
    except (OSError, ConnectionError, RuntimeError, ValueError) as e:
        if model_cfg.pretrained:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LotusError(
                f"model.pretrained: cannot download pretrained weights for {model_cfg.name} ({first}); "
                "pass model.checkpoint (a local .safetensors or state-dict file) instead"
            ) from None
        raise LotusError(f"model: cannot build {model_cfg.name}: {str(e).splitlines()[0] if str(e) else e}") from None
    if model_cfg.checkpoint:
        load_weights(model, model_cfg.checkpoint, key="model.checkpoint")
    return model


def _default_depth(name: str) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = timm.create_model(name, pretrained=False, num_classes=2)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LotusError(f"model.block: op needs a ViT with .blocks; {name} has none")
    return len(blocks)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare timm model inside DDP/compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model
