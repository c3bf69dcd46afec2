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
        pos = labels >= 1
        neg = labels == 0
        pos_count = torch.zeros(num_images, dtype=torch.long, device=labels.device).index_add_(0, image_index, pos.long())
        neg_count = torch.zeros(num_images, dtype=torch.long, device=labels.device).index_add_(0, image_index, neg.long())
        num_pos = pos_count.clamp(max=int(self.batch_size_per_image * self.positive_fraction))
        num_neg = torch.minimum(neg_count, self.batch_size_per_image - num_pos)
        return (_random_subset(pos, image_index, num_pos, num_images),
                _random_subset(neg, image_index, num_neg, num_images))


def _random_subset(mask: torch.Tensor, image_index: torch.Tensor, quota: torch.Tensor, num_images: int) -> torch.Tensor:
    """Indices of ``quota[i]`` items drawn uniformly without replacement from ``mask`` in image ``i``."""
    idx = torch.nonzero(mask).squeeze(1)
    if idx.numel() == 0:
        return idx
    img = image_index[idx]
    # sort by (image, random key): a random permutation within each image, images kept apart
    key = img.to(torch.float64) + torch.rand(idx.numel(), device=idx.device, dtype=torch.float64)
    order = torch.argsort(key)
    idx, img = idx[order], img[order]
    starts = torch.zeros(num_images + 1, dtype=torch.long, device=idx.device)
    starts[1:] = torch.bincount(img, minlength=num_images).cumsum(0)
    rank = torch.arange(idx.numel(), device=idx.device) - starts[img]
    return idx[rank < quota[img]]
