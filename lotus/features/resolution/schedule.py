"""When each epoch trains at which image side: a pure function of the epoch (resume needs no state)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["side_at", "lowest_side", "resize"]


def side_at(epoch: int, epochs: int, full: int, patch: int, start: float, full_at: float) -> int:
    """The training image side of ``epoch`` (0-based) in a run of ``epochs``: ``start * full`` at epoch 0,
    rising linearly to ``full`` at epoch ``round(full_at * epochs)``, rounded down to whole patches and at
    least two patches per side; ``full`` itself when it is not a multiple of ``patch``."""
    if full % patch or full // patch <= 2:
        return full
    lo = lowest_side(full, patch, start)
    end = round(full_at * epochs)
    if epoch >= end or lo >= full:
        return full
    t = epoch / end
    side = lo + t * (full - lo)
    return max(lo, min(full, int(math.floor(side / patch + 1e-9)) * patch))


def lowest_side(full: int, patch: int, start: float) -> int:
    """``start * full`` rounded down to whole patches, at least two patches per side."""
    return max(2 * patch, int(start * full) // patch * patch)


def resize(images: torch.Tensor, side: int, mode: str = "bilinear") -> torch.Tensor:
    """``images`` (N, C, H, W) resized to ``side`` x ``side`` (bilinear and bicubic antialiased, like
    torchvision's resize of a downscaled image); unchanged when already that size."""
    if images.shape[-1] == side and images.shape[-2] == side:
        return images
    aa = mode != "area"
    return F.interpolate(images, size=(side, side), mode=mode, antialias=aa, **({"align_corners": False} if aa else {}))
