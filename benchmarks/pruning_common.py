"""Shared pieces of the pruning benchmarks: a digits-trained ViT (trained with lotus or loaded), accuracy,
a short masked fine-tune loop, and output writing."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUICK_OVERRIDES = ["model.name=lotus_vit_micro", "model.patch_size=4", "train.epochs=4", "train.warmup_epochs=0.5"]


def trained_model(
    config: str, overrides: list[str], checkpoint: str | None, out: str
) -> tuple[nn.Module, Any, Any, dict]:
    """(model, cfg, data bundle, info): train ``config`` with lotus into ``out/train`` or load ``checkpoint``."""
    from lotus.config import load_config
    from lotus.data import build_datasets
    from lotus.models import create_model, resolve_img_size
    from lotus.training import Trainer
    from lotus.weights import load_weights

    cfg = load_config(config, overrides)
    info: dict[str, Any] = {"config": config, "overrides": overrides}
    if checkpoint is None:
        run_dir = os.path.join(out, "train")
        if os.path.exists(os.path.join(run_dir, "best.safetensors")):
            checkpoint = os.path.join(run_dir, "best.safetensors")  # reuse an earlier run of this benchmark
        else:
            summary = Trainer(cfg, run_dir=run_dir, quiet=True).fit()
            info["train"] = {k: summary[k] for k in ("epochs", "wall_s", "best_val_acc", "final_val_acc")}
            checkpoint = os.path.join(run_dir, "best.safetensors")
    info["checkpoint"] = checkpoint
    bundle = build_datasets(cfg.data, resolve_img_size(cfg.model), cfg.model.in_chans)
    model = create_model(cfg.model, bundle.num_classes, bundle.in_chans, bundle.img_size)
    load_weights(model, checkpoint)
    return model.eval(), cfg, bundle, info


def accuracy(model: nn.Module, dataset: Any, batch_size: int = 512) -> float:
    from lotus.evaluation import evaluate

    return evaluate(model, dataset, batch_size=batch_size)["val_acc"]


def finetune(
    model: nn.Module,
    dataset: Any,
    epochs: float,
    lr: float,
    seed: int,
    fraction: float = 1.0,
    batch_size: int = 64,
    weight_decay: float = 0.05,
) -> None:
    """AdamW with cosine decay on ``fraction`` of ``dataset`` (seeded subset); masks stay enforced."""
    from lotus.data import batches
    from pruning.masks import enforce_masks_

    g = torch.Generator().manual_seed(seed)
    n = len(dataset)
    subset = torch.randperm(n, generator=g)[: max(batch_size, int(round(fraction * n)))].numpy()
    steps_per_epoch = int(np.ceil(len(subset) / batch_size))
    total = max(1, int(round(epochs * steps_per_epoch)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    model.train()
    step = 0
    while step < total:
        order = subset[torch.randperm(len(subset), generator=g).numpy()]
        for x, y, _ in batches(dataset, order, batch_size):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            enforce_masks_(model)
            step += 1
            if step >= total:
                break
    model.eval()


def add_folder_args(p: Any, name: str, seeds: list[int] | None = None) -> None:
    """The harness flags (benchmarks/_common.py) with ``--out`` a folder: these benchmarks also write the trained
    model and plots there; the results are ``<out>/<name>.{json,md}`` (default ``$OUT/<name>/`` or
    ``bench_out/<name>/``)."""
    from benchmarks._common import add_harness_args

    add_harness_args(p, name, seeds=seeds, quick="smoke run: micro ViT, 4 epochs")
    p.set_defaults(out=os.path.join(os.environ.get("OUT") or "bench_out", name, ""))


def folder(args: Any) -> str:
    """``--out`` as a folder (created)."""
    os.makedirs(args.out, exist_ok=True)
    return args.out
