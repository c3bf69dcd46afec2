"""A pre-training set rendered like the detection target: Fashion-MNIST *train* items on textured canvases.

The detection canvases (:mod:`.detection_fmnist`) hold 1-4 coloured items of 24-56 px on textured
backgrounds, drawn from Fashion-MNIST's *test* split. A classifier pre-trained on plain grey, centred
28 px items sees none of that (issue 18: it errs at chance on true-box crops of the canvases). This
module renders canvases with the very same code (:func:`~.detection_fmnist.render_detection_image`:
colour, scale, aspect, texture, clutter) but from the **train** split's items, and cuts one crop
around each placed item, as the probe cuts true boxes (:func:`box_crops`), with a little random context
(the square side ``context`` times the box's longer side, the centre moved by up to ``jitter`` of it),
resized to ``size`` px and labelled by the item's class. Neighbouring items reach into the crop as
clutter, as they do around a box in the target. (A fixed 64 px window at native scale was tried first:
items of 24 px in it were often outnumbered by their neighbours, and a first run stalled at chance.)

    images, labels = render_pretrain_crops(items, num_canvases=3000)      # uint8 (N, 3, 48, 48), int64 (N,)
    crops = box_crops(image, boxes, size=48)                              # the probe's true-box crops

Every canvas draws from its own ``SeedSequence([seed, 3 + split, index])``: same arguments -> the same
crops. ``split`` 0 and 1 (pre-training train / val) are different canvases of the same train items.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .detection_fmnist import render_detection_image

__all__ = ["box_crops", "render_pretrain_crops"]

_SPLIT_BASE = 3  # SeedSequence codes 0..2 belong to the detection / localization splits


def render_pretrain_crops(
    items: Tuple[np.ndarray, np.ndarray], *, num_canvases: int = 3000, canvas: int = 128, size: int = 48,
    scale: Tuple[float, float] = (24.0, 56.0), max_items: int = 4, dark_prob: float = 0.5,
    context: Tuple[float, float] = (1.0, 1.3), jitter: float = 0.1, split: int = 0, seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Render ``num_canvases`` detection-style canvases and return one crop per placed item.

    Args:
        items: ``(images uint8 (M, 28, 28), labels (M,))`` of Fashion-MNIST's **train** split.
        num_canvases: canvases to render (each gives 1..``max_items`` crops).
        canvas, scale, max_items, dark_prob: as for :func:`~.detection_fmnist.iter_fmnist_detection`.
        size: side of the square crops in pixels.
        context: the crop's side is the box's longer side times ``U(*context)``.
        jitter: the crop's centre moves from the box's by up to this share of the crop's side.
        split: 0 for training crops, 1 for validation crops (other canvases).
        seed: same arguments -> the same crops.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, size, size)`` and int64 ``(N,)`` class indices.
    """
    if size < 8 or not 0 < context[0] <= context[1]:
        raise ValueError(f"need size >= 8 and 0 < context[0] <= context[1], got size={size}, context={context}")
    src, src_labels = np.asarray(items[0]), np.asarray(items[1])
    if len(src) == 0:
        raise ValueError("no Fashion-MNIST items to render")
    crops, labels = [], []
    for i in range(num_canvases):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_BASE + split, i + 1]))
        n = int(rng.integers(1, max_items + 1))
        chosen = rng.choice(len(src), size=n, replace=False)
        image, boxes, kept = render_detection_image(rng, [src[j] for j in chosen], canvas=canvas, scale=scale,
                                                    dark_prob=dark_prob)
        grown = []
        for (x0, y0, x1, y1), k in zip(boxes, kept):
            half = max(x1 - x0, y1 - y0) * rng.uniform(*context) / 2
            cx, cy = (x0 + x1) / 2 + rng.uniform(-jitter, jitter) * 2 * half, \
                (y0 + y1) / 2 + rng.uniform(-jitter, jitter) * 2 * half
            grown.append((cx - half, cy - half, cx + half, cy + half))
            labels.append(int(src_labels[chosen[k]]))
        crops.append(box_crops(image, grown, size))
    if not labels:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.cat(crops), torch.tensor(labels, dtype=torch.long)


def box_crops(image: np.ndarray, boxes: Sequence[Sequence[float]], size: int = 48) -> torch.Tensor:
    """True-box crops of one image: each box made square about its centre (the longer side, clamped to
    the image), cut out and resized to ``size`` x ``size`` (bilinear).

    Args:
        image: uint8 ``(H, W, 3)``.
        boxes: ``(x0, y0, x1, y1)`` in pixel edges.

    Returns:
        uint8 ``(len(boxes), 3, size, size)``.
    """
    h, w = image.shape[:2]
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    out = []
    for x0, y0, x1, y1 in boxes:
        side = max(x1 - x0, y1 - y0, 1.0)
        side = min(side, h, w)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left = int(np.clip(round(cx - side / 2), 0, w - side))
        top = int(np.clip(round(cy - side / 2), 0, h - side))
        s = int(round(side))
        crop = t[:, top:top + s, left:left + s][None]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0])
    if not out:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.stack(out).round_().clamp_(0, 255).to(torch.uint8)
