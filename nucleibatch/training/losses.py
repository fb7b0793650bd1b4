"""Loss of the three-channel (body, contour, contact) segmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHANNEL_WEIGHTS = (1.0, 0.5, 1.0)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per channel, averaged over the batch: ``(N, K, H, W)`` -> ``(K,)``."""
    probs = torch.sigmoid(logits)
    dims = (0, 2, 3)
    intersection = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return 1.0 - (2 * intersection + eps) / (total + eps)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, weights=CHANNEL_WEIGHTS) -> torch.Tensor:
    """Weighted sum over channels of BCE + soft Dice. ``logits``, ``target``: ``(N, 3, H, W)`` float."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(dim=(0, 2, 3))
    dice = soft_dice_loss(logits.float(), target)
    w = torch.as_tensor(weights, dtype=bce.dtype, device=bce.device)
    return ((bce + dice) * w).sum() / w.sum()
