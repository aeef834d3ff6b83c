"""Per-sample training losses: hard-label cross-entropy, soft-target cross-entropy (mixup/cutmix targets)
and binary cross-entropy (DeiT-III / timm ``--bce-loss``).

timm's ``SoftTargetCrossEntropy`` and ``BinaryCrossEntropy`` return the batch mean; the loop needs one loss
per sample (dynamic data pruning scores and re-weights samples), so these are the same formulas without
the final mean: ``sum(-target * log_softmax(x))`` and timm's smoothed one-hot BCE averaged over classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["per_sample_loss"]


def _one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels.view(-1, 1), 1.0 - smoothing + off
    )


def per_sample_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    kind: str = "ce",
    label_smoothing: float = 0.0,
    bce_target_thresh: float | None = None,
) -> torch.Tensor:
    """Loss of every sample, shape ``(B,)``. ``targets``: class indices ``(B,)`` or soft targets ``(B, C)``
    (mixup/cutmix, which already hold the label smoothing)."""
    logits = logits.float()
    if kind == "bce":
        target = targets.float() if targets.ndim == 2 else _one_hot(targets, logits.shape[-1], label_smoothing)
        if bce_target_thresh is not None:
            target = target.gt(bce_target_thresh).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
    if targets.ndim == 2:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1)
    return F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
