"""Model construction: any timm model by name, plus Lotus' small registered ViTs."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer
from torch.nn.parallel import DistributedDataParallel

from lotus.errors import ConfigError, LotusError
from lotus.models import vit as _vit  # noqa: F401  (registers lotus_vit_* with timm)
from lotus.models.hub import hub_reachable, offline_pretrained_overlay
from lotus.models.op_block import op_model_kwargs
from lotus.weights import load_weights

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
    kw: dict[str, Any] = {
        "num_classes": model_cfg.num_classes or num_classes,
        "in_chans": model_cfg.in_chans or in_chans,
    }
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
    pass ``model.checkpoint`` (a local safetensors/state-dict file) instead. ``model.block: op`` rebuilds a
    timm ``VisionTransformer`` with OP blocks; other families are refused naming ``model.block``.
    """
    _check_name(model_cfg.name)
    kw = model_kwargs(model_cfg, num_classes, in_chans, img_size)
    if model_cfg.block == "op":
        with torch.device("meta"):  # shapes only: no memory, no init cost
            probe = _build(model_cfg, kw, pretrained=False)
        depth = _check_op_family(probe, model_cfg.name)
        try:
            kw.update(op_model_kwargs(model_cfg.op, depth))
        except ValueError as e:  # messages name the model.op key
            raise ConfigError(str(e)) from None
    model = _build(model_cfg, kw, pretrained=model_cfg.pretrained)
    if model_cfg.checkpoint:
        load_weights(model, model_cfg.checkpoint, key="model.checkpoint")
    return model


def _build(model_cfg: Any, kw: dict, pretrained: bool) -> nn.Module:
    """``timm.create_model`` with its failures as one-line errors naming the config key."""
    if pretrained and not hub_reachable():  # fail (or use the cache) now, not after minutes of retries
        kw = {**kw, "pretrained_cfg_overlay": offline_pretrained_overlay(model_cfg.name)}
    try:
        return timm.create_model(model_cfg.name, pretrained=pretrained, **kw)
    except TypeError as e:
        raise LotusError(f"model.kwargs: {model_cfg.name} does not accept these arguments ({e})") from None
    except (OSError, ConnectionError, RuntimeError, ValueError) as e:
        if pretrained:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LotusError(
                f"model.pretrained: cannot download pretrained weights for {model_cfg.name} ({first}); "
                "pass model.checkpoint (a local .safetensors or state-dict file) instead"
            ) from None
        raise LotusError(f"model: cannot build {model_cfg.name}: {str(e).splitlines()[0] if str(e) else e}") from None


def _check_op_family(model: nn.Module, name: str) -> int:
    """The depth of ``model`` if ``model.block: op`` can rebuild it (a timm VisionTransformer made of timm's
    ``Block``), else a ConfigError naming ``model.block`` and the model's family."""
    what = "model.block: op supports timm VisionTransformer models (vit_*, deit_*, lotus_vit_*)"
    if not isinstance(model, VisionTransformer):
        cls = type(model).__name__
        raise ConfigError(f"{what}; {name} is {'an' if cls[:1].upper() in 'AEIOU' else 'a'} {cls}")
    other = sorted({type(b).__name__ for b in model.blocks if type(b) is not Block})
    if other:
        raise ConfigError(f"{what} built from timm's Block; {name} uses {', '.join(other)}")
    return len(model.blocks)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare timm model inside DDP/compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model
