"""Shared by ``lotus outliers`` and ``lotus quantcheck``: a config's model with a checkpoint, and its data."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lotus.config import load_config
from lotus.data import batches, build_datasets
from lotus.errors import LotusError
from lotus.models import create_model, resolve_img_size
from lotus.weights import load_weights
from lotus.weights_meta import model_config_from_checkpoint

__all__ = ["LoadedModel", "load_model_and_data", "resolve_device", "calibration_batches", "EvalBatches"]


@dataclass
class LoadedModel:
    cfg: Any  # lotus.config.Config
    model: nn.Module
    data: Any  # lotus.data.DataBundle
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise LotusError("--device: cuda requested but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model_and_data(
    config: str, checkpoint: str, overrides: list[str] | None = None, device: str = "auto"
) -> LoadedModel:
    """Build the config's model and datasets, then load ``checkpoint`` (safetensors or state dict).

    The model section the checkpoint records (Lotus files) supplies every model key the config does not set."""
    if not checkpoint:
        raise LotusError("--checkpoint: required (a .safetensors or state-dict file from a run)")
    if not os.path.isfile(checkpoint):
        raise LotusError(f"--checkpoint: file not found: {checkpoint}")
    cfg = load_config(config, overrides or [])
    cfg.model = model_config_from_checkpoint(cfg.model, checkpoint, cfg.source.get("model"), "--checkpoint")
    data = build_datasets(cfg.data, resolve_img_size(cfg.model), cfg.model.in_chans, model_cfg=cfg.model)
    model_cfg = dataclasses.replace(cfg.model, checkpoint=None, pretrained=False)
    model = create_model(model_cfg, data.num_classes, data.in_chans, data.img_size)
    load_weights(model, checkpoint, key="--checkpoint")
    dev = resolve_device(device)
    return LoadedModel(cfg, model.to(dev).eval(), data, dev)


def calibration_batches(dataset: Any, cfg: Any, n_batches: int):
    """``n_batches`` un-augmented training batches (seeded order) for activation-range calibration."""
    bs = cfg.data.batch_size
    g = torch.Generator().manual_seed(int(cfg.train.seed) + 17)
    idx = torch.randperm(len(dataset), generator=g)[: n_batches * bs].numpy()
    for x, _, _ in batches(dataset, idx, bs):
        yield x


class EvalBatches:
    """Re-iterable ``(images, labels, index)`` batches over a whole dataset, in order."""

    def __init__(self, dataset: Any, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __iter__(self):
        return batches(self.dataset, np.arange(len(self.dataset)), self.batch_size)
