"""Balanced positive/negative sampling of anchors or proposals for the losses (Faster R-CNN, 3.1.3)."""
from __future__ import annotations

from typing import Tuple

import torch


class BalancedSampler:
    """Pick up to ``batch_size_per_image`` labelled items per image, at most a ``positive_fraction``
    of them positive, the rest negative, uniformly at random; negatives fill what positives leave.

    Args:
        batch_size_per_image: items per image (256 for the RPN, 512 for the box head).
        positive_fraction: upper bound of the positive share (0.5 RPN, 0.25 box head).
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: torch.Tensor, image_index: torch.Tensor, num_images: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample over a whole batch at once (no loop over images).

        Args:
            labels: ``(N,)`` per item: ``>= 1`` positive, ``0`` negative, ``< 0`` ignored.
            image_index: ``(N,)`` long, the image each item belongs to (``0..num_images-1``).
            num_images: batch size.

        Returns:
            ``(pos_idx, neg_idx)``: long indices into ``labels`` of the sampled positives and
            negatives.
        """
        # positives and negatives drawn in one pass (fewer kernel launches and host syncs than one
        # pass per kind): group 2 * image + kind, a random order within each group, the first
        # quota of each group kept
        cand = torch.nonzero(labels >= 0).squeeze(1)
        if cand.numel() == 0:
            return cand, cand
        group = image_index[cand] * 2 + (labels[cand] == 0).long()  # kind 0 positive, 1 negative
        counts = torch.bincount(group, minlength=2 * num_images)
        num_pos = counts[0::2].clamp(max=int(self.batch_size_per_image * self.positive_fraction))
        num_neg = torch.minimum(counts[1::2], self.batch_size_per_image - num_pos)
        quota = torch.stack((num_pos, num_neg), dim=1).reshape(-1)
        key = group.to(torch.float64) + torch.rand(cand.numel(), device=cand.device, dtype=torch.float64)
        order = torch.argsort(key)
        cand, group = cand[order], group[order]
        starts = counts.cumsum(0) - counts
        rank = torch.arange(cand.numel(), device=cand.device) - starts[group]
        take = rank < quota[group]
        negative = (group % 2).bool()
        return cand[take & ~negative], cand[take & negative]
