"""The inputs of ``lotus prune``: the model (timm name or training config, plus checkpoint), its data, and
the measurements taken before and after pruning (accuracy, params, FLOPs)."""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any

import timm
import torch
from torch import nn

from lotus.config import ModelConfig, load_config
from lotus.data import batches, build_datasets
from lotus.errors import LotusError
from lotus.evaluation import evaluate
from lotus.models import create_model, resolve_img_size
from lotus.weights import load_weights, read_state_dict
from lotus.weights_meta import model_config_from_checkpoint, read_model_metadata
from pruning import model_stats

__all__ = ["load_data_config", "checkpoint_shapes", "build", "input_size", "calib", "accuracy", "stats"]


def load_data_config(args: argparse.Namespace) -> Any:
    path = args.calib or args.config
    return load_config(path, args.set) if path else None


def checkpoint_shapes(path: str | None, name: str) -> tuple[int | None, int | None]:
    """(num_classes, in_chans) read from a checkpoint's classifier and first conv, when present."""
    if not path:
        return None, None

    sd = read_state_dict(path, "--checkpoint")
    pcfg = timm.models.get_pretrained_cfg(name)
    classifier = getattr(pcfg, "classifier", None) or "head"
    first = getattr(pcfg, "first_conv", None) or "patch_embed.proj"
    classes = sd.get(f"{classifier}.weight")
    conv = sd.get(f"{first}.weight")
    return (
        int(classes.shape[0]) if classes is not None and classes.dim() == 2 else None,
        int(conv.shape[1]) if conv is not None and conv.dim() == 4 else None,
    )


def _model_config(args: argparse.Namespace, data_cfg: Any) -> ModelConfig:
    """The model section: --config's (or --model's), with a --checkpoint's recorded section as defaults."""
    if args.config:
        mcfg, given = copy.deepcopy(data_cfg.model), dict(data_cfg.source.get("model") or {})
    elif args.model:
        if not timm.is_model(args.model):
            import difflib

            close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
            raise LotusError(f"--model: unknown timm model {args.model!r}{hint}")
        mcfg, given = ModelConfig(name=args.model), {"name": args.model}
    else:
        mcfg, given = ModelConfig(), {}
    # --checkpoint wins; else a --config's own model.checkpoint (unless --pretrained)
    ckpt = args.checkpoint or (mcfg.checkpoint if args.config and not args.pretrained else None)
    if ckpt and not os.path.isfile(ckpt):
        raise LotusError(f"model.checkpoint: file not found: {ckpt}")
    args.checkpoint = ckpt
    if ckpt:
        if not args.model and not args.config and not read_model_metadata(ckpt, "--checkpoint"):
            raise LotusError(
                f"--checkpoint: {ckpt} records no model (not written by Lotus, or by an older "
                "version); pass --model NAME or --config FILE"
            )
        mcfg = model_config_from_checkpoint(mcfg, ckpt, given, "--checkpoint")
    mcfg.checkpoint = None
    mcfg.pretrained = bool(args.pretrained)
    if args.img_size:
        mcfg.img_size = args.img_size
    if args.num_classes:
        mcfg.num_classes = args.num_classes
    return mcfg


def build(args: argparse.Namespace, data_cfg: Any) -> tuple[nn.Module, Any, Any]:
    """(model, model_cfg, data bundle or None)."""
    mcfg = _model_config(args, data_cfg)
    ck_classes, ck_chans = checkpoint_shapes(args.checkpoint, mcfg.name)
    if mcfg.num_classes is None and ck_classes is not None:
        mcfg.num_classes = ck_classes
    if mcfg.in_chans is None and ck_chans is not None:
        mcfg.in_chans = ck_chans
    shell = copy.copy(data_cfg) if data_cfg is not None else None
    bundle = None
    if data_cfg is not None:
        shell.model = mcfg
        img = resolve_img_size(mcfg)
        chans = mcfg.in_chans or (3 if not args.config else None)
        bundle = build_datasets(data_cfg.data, img, chans, model_cfg=mcfg)
        num_classes, in_chans, img_size = bundle.num_classes, bundle.in_chans, bundle.img_size
    else:
        pcfg = timm.models.get_pretrained_cfg(mcfg.name)
        num_classes = getattr(pcfg, "num_classes", None) or 1000
        in_chans = mcfg.in_chans or 3
        img_size = mcfg.img_size
    if args.pretrained and mcfg.num_classes is None:
        pcfg = timm.models.get_pretrained_cfg(mcfg.name)
        mcfg.num_classes = getattr(pcfg, "num_classes", None) or num_classes
    try:
        model = create_model(mcfg, num_classes, in_chans, img_size)
    except LotusError as e:
        if args.pretrained and "pretrained" in str(e):
            raise LotusError(
                f"--pretrained: cannot download weights for {mcfg.name}; "
                "pass --checkpoint FILE (a local .safetensors or state dict) instead"
            ) from None
        raise
    if args.checkpoint:
        load_weights(model, args.checkpoint, key="--checkpoint")
    return model, mcfg, bundle


def input_size(model: nn.Module, bundle: Any) -> tuple[int, int, int]:
    if bundle is not None:
        x, _, _ = bundle.val[0]
        return tuple(x.shape)  # type: ignore[return-value]
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
    if size is None:
        size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[1:])
    return (chans, *size)


def calib(bundle: Any, n_batches: int, batch_size: int) -> list | None:
    if bundle is None:
        return None

    n = len(bundle.train)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n_batches * batch_size].numpy()
    return [(x, y) for x, y, _ in batches(bundle.train, idx, batch_size)]


def accuracy(
    model: nn.Module, bundle: Any, device: torch.device, dtype: torch.dtype, limit: int | None, batch_size: int = 256
) -> float:
    def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = m(x.to(dtype=dtype))
        return out[0] if isinstance(out, tuple) else out

    return evaluate(
        model,
        bundle.val,
        batch_size=batch_size,
        device=device,
        limit=limit,
        forward=forward,
        progress=sys.stderr.isatty(),
    )["val_acc"]


def stats(model: nn.Module, example: torch.Tensor) -> dict:
    return model_stats(model, example, latency=False)
