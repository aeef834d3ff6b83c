"""Soft-label knowledge distillation on the training batch (``distill:``).

At ``on_fit_start`` the teacher is rebuilt from the model section its file records (``lotus.weights_meta``:
name, sizes, block, thinned widths), loaded, frozen and put in eval mode on the trainer's device. Each
training batch then gets the targets ``alpha * softmax(teacher(images)) + (1 - alpha) * labels``, where
``labels`` are the one-hot labels (with ``train.label_smoothing``) or, when an earlier batch feature already
made soft targets (mixup / CutMix runs first, so the teacher sees the mixed images), those soft targets.
The trainer's soft-target cross-entropy ``sum(-target * log_softmax(student))`` on these targets is
``alpha * KL(teacher || student) + (1 - alpha) * CE(labels, student)`` up to a constant: Hinton-style
distillation at temperature 1 (no ``T^2`` rescaling; a hotter temperature is not offered).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lotus.callbacks import Callback, Trainer
from lotus.config import ModelConfig
from lotus.errors import LotusError
from lotus.features.distill.config import DistillConfig
from lotus.models import create_model
from lotus.weights import load_weights
from lotus.weights_meta import model_config_from_checkpoint, read_model_metadata

__all__ = ["DistillCallback", "build_teacher"]

_KEY = "distill.teacher"


def build_teacher(path: str, num_classes: int, in_chans: int, img_size: int | None) -> nn.Module:
    """The model recorded in ``path``, with its weights; a one-line error naming ``distill.teacher`` when the
    file records no model or predicts another number of classes than ``num_classes``."""
    section = read_model_metadata(path, _KEY)
    if not section or not isinstance(section.get("name"), str):
        raise LotusError(
            f"{_KEY}: {path} records no model (not written by Lotus, or by an older version); "
            "pass a .safetensors file written by lotus train or lotus prune"
        )
    recorded = section.get("num_classes")
    if isinstance(recorded, int) and recorded != num_classes:
        raise LotusError(
            f"{_KEY}: {path} predicts {recorded} classes, the data has {num_classes}; "
            "the teacher must be trained on the same classes"
        )
    mcfg = model_config_from_checkpoint(ModelConfig(name=section["name"]), path, {}, _KEY)
    mcfg.checkpoint, mcfg.pretrained = None, False
    teacher = create_model(mcfg, num_classes, in_chans, img_size)
    load_weights(teacher, path, key=_KEY)
    return teacher


class DistillCallback(Callback):
    """Owns the batch slot after mixup: targets mixed with the frozen teacher's softmax."""

    def __init__(self, cfg: DistillConfig, label_smoothing: float = 0.0):
        self.cfg = cfg
        self.label_smoothing = label_smoothing
        self.teacher: nn.Module | None = None
        self.autocast: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        d = trainer.data
        teacher = build_teacher(self.cfg.teacher, d.num_classes, d.in_chans, d.img_size)
        self.set_teacher(teacher.to(trainer.device), trainer.autocast)

    def set_teacher(self, teacher: nn.Module, autocast: Any = None) -> None:
        """Use ``teacher`` (frozen, eval mode) under ``autocast()`` (a context factory; None: full precision)."""
        self.teacher = teacher.eval().requires_grad_(False)
        self.autocast = autocast

    @torch.no_grad()
    def soft_targets(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``alpha * softmax(teacher(images)) + (1 - alpha) * labels`` as ``(B, num_classes)`` rows summing to 1."""
        if self.autocast is None:
            logits = self.teacher(images)
        else:
            with self.autocast():
                logits = self.teacher(images)
        if isinstance(logits, (tuple, list)):  # distilled timm models: (class head, distillation head)
            logits = logits[0]
        probs = logits.float().softmax(-1)
        if labels.ndim == 2:
            hard = labels.float()
        else:
            c, s = probs.shape[-1], self.label_smoothing
            hard = torch.full_like(probs, s / c).scatter_(1, labels.view(-1, 1), 1.0 - s + s / c)
        a = self.cfg.alpha
        return a * probs + (1.0 - a) * hard

    def transform_batch(
        self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return images, self.soft_targets(images, labels), index

    def on_fit_end(self, trainer: Trainer, summary: dict) -> None:
        summary["distill"] = {"teacher": self.cfg.teacher, "alpha": self.cfg.alpha, "temperature": 1.0}
