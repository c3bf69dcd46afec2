"""A large synthetic scene for sliced prediction: many small shapes of the embedded dataset's classes on one
textured background, a third of them centred on the seams of a tile grid."""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

from res_backbone.data.synthetic import SHAPES, _background, _colour, _draw_mask, _overlap, category_id


def large_scene(size: int = 2048, *, n_objects: int = 150, obj_px: Tuple[float, float] = (24, 48),
                num_classes: int = 5, tile: int = 160, overlap: float = 0.4, seed: int = 0
                ) -> Tuple[np.ndarray, List[Tuple[int, List[float]]]]:
    """``(image (size, size, 3) uint8, [(category_id, [x0, y0, x1, y1]), ...])``.

    Object sides are log-uniform in ``obj_px``; every third object is centred on a seam of the grid of
    ``tile`` px windows with ``overlap`` (:func:`heads.detection.slicing.tile_windows`), so a tile edge cuts it.
    """
    from heads.detection.slicing import tile_windows

    rng = np.random.default_rng(seed)
    canvas = _background(rng, size, size, True)
    seams = sorted({w[2] for w in tile_windows(size, size, tile, overlap) if w[2] < size})
    objects, boxes = [], []
    attempts = 0
    while len(objects) < n_objects and attempts < 20 * n_objects:
        attempts += 1
        shape_idx = int(rng.integers(num_classes))
        side = float(np.exp(rng.uniform(math.log(obj_px[0]), math.log(obj_px[1]))))
        mask = _draw_mask(SHAPES[shape_idx], rng, side, float(np.exp(rng.uniform(-0.2, 0.2))))
        mh, mw = mask.shape
        if len(objects) % 3 == 0:  # across a vertical seam
            x0 = int(rng.choice(seams)) - mw // 2
        else:
            x0 = int(rng.integers(0, size - mw))
        y0 = int(rng.integers(0, size - mh))
        x0 = min(max(x0, 0), size - mw)
        box = (x0, y0, x0 + mw, y0 + mh)
        if _overlap(box, boxes, 0.0) or _overlap(tuple(np.add(box, (-6, -6, 6, 6))), boxes, 0.0):
            continue
        canvas[y0:y0 + mh, x0:x0 + mw][mask > 0] = _colour(rng, 150.0, 255.0)
        boxes.append(box)
        objects.append((category_id(shape_idx), [float(v) for v in box]))
    canvas += rng.normal(0.0, 3.0, size=(size, size, 1)).astype(np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def match(objects, boxes, category_ids, iou: float = 0.5) -> Tuple[float, float, float]:
    """``(recall, duplicates, fragments)`` of detections (best first) against ``objects``.

    recall: the share of objects found by a box of their class at IoU >= ``iou``. duplicates: the share of boxes
    that match an already found object of their class at that IoU (one object reported twice). fragments: the
    share of boxes that match no object but lie mostly (intersection over the box's area >= 0.5) inside a found
    object, of any class (a part of an object reported next to it, e.g. cut by a tile edge).
    """
    import torch
    from torchvision.ops import box_iou

    if not len(boxes):
        return 0.0, 0.0, 0.0
    gt = torch.tensor([b for _, b in objects], dtype=torch.float64)
    det = torch.as_tensor(boxes, dtype=torch.float64)
    raw = box_iou(det, gt)
    same = torch.tensor(category_ids)[:, None] == torch.tensor([c for c, _ in objects])[None]
    ious = raw * same
    lt, rb = torch.max(det[:, None, :2], gt[None, :, :2]), torch.min(det[:, None, 2:], gt[None, :, 2:])
    ios = (rb - lt).clamp(min=0).prod(-1) / (det[:, 2:] - det[:, :2]).prod(-1).clamp(min=1e-9)[:, None]
    found, dups, unmatched = set(), 0, []
    for i in range(len(boxes)):
        j = int(ious[i].argmax())
        if ious[i, j] >= iou:
            dups += j in found
            found.add(j)
        else:
            unmatched.append(i)
    frags = sum(1 for i in unmatched if any(ios[i, j] >= 0.5 for j in found))
    return len(found) / len(objects), dups / len(boxes), frags / len(boxes)
