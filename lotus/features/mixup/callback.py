"""Mixup / CutMix on training batches with ``timm.data.Mixup``; the loss then uses the soft targets.

With dynamic data pruning (``tickets.dynamic``) the score of an original sample is the loss of the mixed
sample at its position in the batch (its own image, mixed with its partner's, against the mixed target),
and that loss is what gets re-weighted: the InfoBatch rule is unchanged, it just sees mixed losses.
timm's Mixup needs an even batch; an odd last batch mixes all but its last sample, which keeps its
(smoothed) one-hot target. Mixup draws from numpy's global generator, which a resumed run restores.
"""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from lotus.callbacks import Callback, Trainer
from lotus.features.mixup.config import MixupConfig

__all__ = ["MixupCallback"]


class MixupCallback(Callback):
    """Owns the batch slot: mixed images and soft ``(B, num_classes)`` targets."""

    def __init__(self, cfg: MixupConfig, label_smoothing: float):
        self.cfg = cfg
        self.label_smoothing = label_smoothing
        self.mixup: Mixup | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        c = self.cfg
        self.mixup = Mixup(
            mixup_alpha=c.mixup_alpha,
            cutmix_alpha=c.cutmix_alpha,
            cutmix_minmax=c.cutmix_minmax,
            prob=c.prob,
            switch_prob=c.switch_prob,
            mode=c.mode,
            label_smoothing=self.label_smoothing,
            num_classes=trainer.data.num_classes,
        )

    def transform_batch(
        self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = images.clone()  # timm mixes in place; never touch a tensor the dataset may share
        n = len(images) - len(images) % 2
        if n < 2:
            return images, mixup_target(labels, self.mixup.num_classes, 1.0, self.label_smoothing), index
        mixed, soft = self.mixup(images[:n], labels[:n])
        if n < len(images):
            rest = mixup_target(labels[n:], self.mixup.num_classes, 1.0, self.label_smoothing)
            mixed, soft = torch.cat([mixed, images[n:]]), torch.cat([soft, rest])
        return mixed, soft, index
