"""Batched train-time augmentation on tensors (``data.augment``): random affine, flip, erasing."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Augmenter"]


class Augmenter:
    """Batched train-time augmentation on tensors: random affine (translate/rotate/scale), flip, erasing.

    Uses its own ``torch.Generator`` so runs are reproducible and resumable.
    """

    def __init__(self, cfg: Any, seed: int):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(seed + 7919)

    @property
    def active(self) -> bool:
        c = self.cfg
        return bool(c.random_crop or c.hflip or c.random_erasing or c.rotate or c.scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, g, b = self.cfg, self.gen, x.shape[0]
        if c.random_crop or c.rotate or c.scale:
            ang = (torch.rand(b, generator=g) * 2 - 1) * math.radians(c.rotate)
            scl = 1 + (torch.rand(b, generator=g) * 2 - 1) * c.scale
            shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (2 * c.random_crop / x.shape[-1])
            cos, sin = torch.cos(ang) / scl, torch.sin(ang) / scl
            theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
            grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False)
        if c.hflip:
            flip = torch.rand(b, generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
        if c.random_erasing:
            h, w = x.shape[-2:]
            on = torch.rand(b, generator=g) < c.random_erasing
            eh = (torch.rand(b, generator=g) * 0.3 + 0.1) * h
            ew = (torch.rand(b, generator=g) * 0.3 + 0.1) * w
            cy, cx = torch.rand(b, generator=g) * h, torch.rand(b, generator=g) * w
            ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
            box = ((ys - cy.view(-1, 1, 1)).abs() < eh.view(-1, 1, 1) / 2) & (
                (xs - cx.view(-1, 1, 1)).abs() < ew.view(-1, 1, 1) / 2
            )
            mask = (box & on.view(-1, 1, 1)).unsqueeze(1).to(x.device)
            x = x.masked_fill(mask, 0.0)
        return x
