"""Progressive resolution in lotus training (``resolution``): each training batch is resized to the epoch's
side (:func:`lotus.features.resolution.schedule.side_at`) before the forward, so the ViT sees
``(side / patch)^2`` tokens; timm's ``dynamic_img_size`` interpolates the position embedding to that grid.
Evaluation and the exported model run at the full side (the auto schedule's probes also try smaller ones). It
composes with random patch tickets (they drop a share of whatever grid the batch has), dynamic data pruning and
thinning; the side is a pure function of the epoch (``schedule.mode: fixed``) or of the auto schedule's
decisions, which a resumed run replays (:mod:`lotus.features.schedule.auto_side_rules`), so a resumed run is
bit-identical."""

from __future__ import annotations

import torch

from lotus.callbacks import Callback, Trainer
from lotus.errors import LotusError
from lotus.features.resolution.config import ResolutionConfig
from lotus.features.resolution.schedule import resize, side_at
from lotus.features.schedule.auto import AutoState
from lotus.models import unwrap

__all__ = ["ResolutionCallback"]


class ResolutionCallback(Callback):
    """Writes the ``batch`` slot: resizes training images to the epoch's side."""

    def __init__(self, cfg: ResolutionConfig, auto: AutoState | None = None):
        self.cfg = cfg
        self.auto = auto  # schedule.mode: auto decides the side
        self.full = 0
        self.patch = 0
        self.side = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        model = unwrap(trainer.model)
        if not getattr(model, "dynamic_img_size", False):
            raise LotusError(
                "resolution.enabled: the model must accept smaller images; set "
                "model.kwargs.dynamic_img_size: true (a timm ViT interpolates its position embedding)"
            )
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if patch is None:
            raise LotusError(f"resolution.enabled: {type(model).__name__} has no patch_embed.patch_size")
        self.patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.full = int(trainer.data.img_size)
        if self.full % self.patch:
            raise LotusError(
                f"resolution.enabled: model.img_size {self.full} is not a multiple of the patch size {self.patch}"
            )

    def side_of(self, trainer: Trainer, epoch: int) -> int:
        """The training side of ``epoch``: the auto schedule's decision, or :func:`side_at`."""
        if self.auto is not None:
            side = self.auto.side(epoch)
            return self.full if side is None else int(side)
        return side_at(epoch, trainer.cfg.train.epochs, self.full, self.patch, self.cfg.start, self.cfg.full_at)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        side = self.side_of(trainer, epoch)
        prev = None if epoch == 0 else self.side_of(trainer, epoch - 1)
        if side != prev:  # a function of the epoch: logged again on resume only where it changes
            tokens = (side // self.patch) ** 2
            trainer.log(
                "resolution",
                side=side,
                tokens=tokens,
                full_side=self.full,
                note=f"from epoch {epoch + 1} training images are {side} px ({tokens} tokens"
                f"{'' if side < self.full else ', full size'}); the train loss changes with the input",
            )
        self.side = side

    def transform_batch(
        self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.side >= self.full:
            return images, labels, index
        return resize(images, self.side, self.cfg.mode), labels, index

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        metrics.update(img_side=self.side, tokens=(self.side // self.patch) ** 2)
