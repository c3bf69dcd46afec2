"""Box-head outputs -> detections: per-class decoding, score threshold, per-class NMS, top-k per image.

Follows torchvision's ``RoIHeads.postprocess_detections`` (so converted weights give the same
detections) but for the whole batch at once: one ``batched_nms`` call whose groups are
``image * (K + 1) + class`` instead of a loop over images.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from .box_coder import BoxCoder, grouped_nms
from .rpn import _per_image_top, clip_boxes


def postprocess_detections(
    class_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    proposals: torch.Tensor,
    image_index: torch.Tensor,
    image_sizes: torch.Tensor,
    box_coder: BoxCoder,
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
) -> List[Dict[str, torch.Tensor]]:
    """Turn per-RoI scores and deltas into per-image detections.

    Args:
        class_logits: ``(R, K + 1)``, column 0 the background.
        box_deltas: ``(R, 4 * (K + 1))`` class-specific deltas.
        proposals: ``(R, 4)`` xyxy RoIs; image_index ``(R,)`` long, the image of each RoI.
        image_sizes: ``(N, 2)`` ``(h, w)`` before padding; boxes are clipped to them.
        box_coder: the box head's coder (weights ``(10, 10, 5, 5)``).
        score_thresh: keep class scores strictly above it. nms_thresh: per-class NMS IoU.
        detections_per_img: best detections kept per image. min_size: drop thinner boxes.

    Returns:
        per image ``{"boxes": (M, 4) xyxy, "scores": (M,), "labels": (M,) in 1..K}``, by score.
    """
    num_images = image_sizes.shape[0]
    num_classes = class_logits.shape[1]  # K + 1
    boxes = box_coder.decode(box_deltas, proposals)  # (R, K+1, 4)
    boxes = clip_boxes(boxes, image_sizes[image_index][:, None, :])
    scores = F.softmax(class_logits, -1)
    boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)
    labels = torch.arange(1, num_classes, device=scores.device).repeat(class_logits.shape[0])
    img = image_index.repeat_interleave(num_classes - 1)
    wh = boxes[:, 2:] - boxes[:, :2]
    cand = torch.nonzero((scores > score_thresh) & (wh >= min_size).all(dim=1)).squeeze(1)
    keep = cand[grouped_nms(boxes[cand], scores[cand], img[cand] * num_classes + labels[cand], nms_thresh)]
    keep = _per_image_top(keep, img, num_images, detections_per_img)
    if num_images == 1:  # no bincount, no device-to-host copy, no split (an exported graph keeps empty results)
        return [{"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}]
    counts = torch.bincount(img[keep], minlength=num_images).tolist()
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(boxes[keep].split(counts), scores[keep].split(counts), labels[keep].split(counts))
    ]
