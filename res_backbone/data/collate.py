"""Batching of detection items: pad bottom/right to a common, stride-friendly size."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

__all__ = ["collate_detection", "pad_images"]


def pad_images(images: Sequence[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
    """Stack (C, h_i, w_i) images into (B, C, Hp, Wp), zero-padded at the bottom/right.

    ``Hp``/``Wp`` are the batch maxima rounded up to a multiple of ``size_divisible`` (the coarsest
    feature stride, so every FPN level lines up). Padding only at the bottom/right keeps box
    coordinates valid unchanged. Zero is the normalised mean colour, i.e. "no signal".
    """
    if not images:
        raise ValueError("cannot collate an empty batch")
    if size_divisible < 1:
        raise ValueError(f"size_divisible must be >= 1, got {size_divisible}")
    c = images[0].shape[0]
    if any(im.dim() != 3 or im.shape[0] != c for im in images):
        raise ValueError(f"all images must be (C, h, w) with the same C, got {[tuple(im.shape) for im in images]}")
    max_h = max(int(im.shape[1]) for im in images)
    max_w = max(int(im.shape[2]) for im in images)
    hp = -(-max_h // size_divisible) * size_divisible
    wp = -(-max_w // size_divisible) * size_divisible
    out = images[0].new_zeros((len(images), c, hp, wp))
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]].copy_(im)
    return out


def collate_detection(
    batch: Sequence[Tuple[torch.Tensor, Dict[str, Any]]], size_divisible: int = 32
) -> Tuple[torch.Tensor, List[Tuple[int, int]], List[Dict[str, Any]]]:
    """``DataLoader`` collate_fn for ``CocoDetection`` items.

    Use ``functools.partial(collate_detection, size_divisible=64)`` for another multiple.

    Args:
        batch: ``[(image (3, h, w), target), ...]``.
        size_divisible: padded height and width are multiples of this.

    Returns:
        images: FloatTensor (B, 3, Hp, Wp), zero-padded bottom/right.
        image_sizes: ``[(h, w), ...]`` of each image before padding.
        targets: the target dicts, unchanged.
    """
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    image_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    return pad_images(images, size_divisible), image_sizes, targets
