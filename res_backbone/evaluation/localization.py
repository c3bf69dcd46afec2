"""ILSVRC single-object localization error (Russakovsky et al., 2015, section 4.2), top-1 and top-5.

An image counts as correct at top-k when ANY of its k predicted ``(class, box)`` pairs has the right
class and a box with IoU >= 0.5 with a ground-truth box of that class; otherwise it is an error -
a right class with a bad box and a good box with a wrong class are both errors.

Errors are in percent (as the ResNet paper's Table 13 and this project's classification metrics);
``mean_iou`` is a fraction in [0, 1].

Boxes are ``xyxy`` in any common frame per image (pixels, or normalised by the image size: IoU does
not change when x and y are scaled separately, so both give the same numbers).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torchvision.ops import box_iou

__all__ = ["localization_errors"]


def _as_boxes(x, where: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32)
    if t.dim() == 1 and t.numel() == 4:
        t = t[None]
    if t.dim() != 2 or t.shape[-1] != 4:
        raise ValueError(f"{where}: expected boxes of shape (M, 4) xyxy, got {tuple(t.shape)}")
    return t


def _err(correct: torch.Tensor) -> float:
    """Percent of False entries (rounded to 1e-6, so 31% reads 31.0 and not 31.000000000000007)."""
    return round(100.0 * (1.0 - correct.double().mean().item()), 6)


def localization_errors(
    pred_classes_topk: torch.Tensor,
    pred_boxes_topk: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_boxes_list: Sequence[torch.Tensor],
    k: Sequence[int] = (1, 5),
    iou_thresh: float = 0.5,
    *,
    gt_box_labels_list: Optional[Sequence[torch.Tensor]] = None,
    gt_known_boxes: Optional[torch.Tensor] = None,
) -> Dict[str, float]:
    """Localization and classification errors of a set of images.

    Args:
        pred_classes_topk: (N, T) predicted classes, best first (T >= max(k); top-5 with fewer than
            5 classes uses all T).
        pred_boxes_topk: (N, T, 4) the box predicted with each of those classes (class-agnostic
            models repeat one box).
        gt_labels: (N,) the image's class (for ILSVRC: the one class of the image; here the class
            of the target object).
        gt_boxes_list: N tensors (M_i, 4) of ground-truth boxes (M_i >= 1).
        k: the top-k values to report; 1 and 5 give the standard keys below.
        iou_thresh: the IoU a box needs (>=) to count as found.
        gt_box_labels_list: N tensors (M_i,) giving each ground-truth box's class, for images with
            objects of several classes; default: every box has the image's class ``gt_labels[i]``.
        gt_known_boxes: (N, 4) the box predicted *for the true class* (per-class models); default
            the top-1 box (right for class-agnostic models, whose box does not depend on the class).

    Returns:
        ``top{k}_loc_err``, ``top{k}_cls_err`` (percent) for each k; ``mean_iou`` (the
        IoU of the top-1 box with the best-matching ground-truth box of the true class, averaged);
        ``gt_known_loc_err`` (the share of images whose true-class box misses every
        ground-truth box of that class: localization with the class given, percent); ``num_images``.
    """
    classes = torch.as_tensor(pred_classes_topk).long()
    boxes = torch.as_tensor(pred_boxes_topk, dtype=torch.float32)
    labels = torch.as_tensor(gt_labels).long().reshape(-1)
    n = labels.numel()
    if classes.dim() == 1:
        classes = classes[:, None]
    if boxes.dim() == 2:
        boxes = boxes[:, None]
    if classes.shape[0] != n or boxes.shape[:2] != classes.shape or boxes.shape[-1] != 4:
        raise ValueError(f"shapes do not agree: pred_classes_topk {tuple(classes.shape)}, pred_boxes_topk "
                         f"{tuple(boxes.shape)} (expected (N, T, 4)), gt_labels {tuple(labels.shape)}")
    if len(gt_boxes_list) != n:
        raise ValueError(f"gt_boxes_list has {len(gt_boxes_list)} entries for {n} images")
    if gt_box_labels_list is not None and len(gt_box_labels_list) != n:
        raise ValueError(f"gt_box_labels_list has {len(gt_box_labels_list)} entries for {n} images")
    if n == 0:
        raise ValueError("no images to evaluate")
    ks = sorted({int(v) for v in k})
    if any(v < 1 for v in ks):
        raise ValueError(f"k must be positive, got {list(k)}")
    T = classes.shape[1]
    if ks[0] > T:
        raise ValueError(f"top-{ks[0]} needs at least {ks[0]} predictions per image, got {T}")

    hit = torch.zeros(n, T, dtype=torch.bool)  # pair j of image i: right class and IoU >= thresh
    ious = torch.zeros(n)
    gt_known_hit = torch.zeros(n, dtype=torch.bool)
    known = boxes[:, 0] if gt_known_boxes is None else _as_boxes(gt_known_boxes, "gt_known_boxes")
    if known.shape[0] != n:
        raise ValueError(f"gt_known_boxes has {known.shape[0]} boxes for {n} images")
    for i in range(n):
        gtb = _as_boxes(gt_boxes_list[i], f"gt_boxes_list[{i}]")
        if len(gtb) == 0:
            raise ValueError(f"image {i} has no ground-truth box; skip such images before evaluating")
        gtl = (torch.full((len(gtb),), int(labels[i])) if gt_box_labels_list is None
               else torch.as_tensor(gt_box_labels_list[i]).long().reshape(-1))
        if len(gtl) != len(gtb):
            raise ValueError(f"image {i}: {len(gtb)} ground-truth boxes but {len(gtl)} box labels")
        iou = box_iou(boxes[i], gtb)  # (T, M)
        same_class = classes[i][:, None] == gtl[None, :]
        hit[i] = ((iou >= iou_thresh) & same_class).any(1)
        true_cls = gtl == labels[i]
        if true_cls.any():
            ious[i] = iou[0][true_cls].max()
            gt_known_hit[i] = bool((box_iou(known[i:i + 1], gtb[true_cls]) >= iou_thresh).any())
    cls_hit = classes == labels[:, None]
    out: Dict[str, float] = {}
    for v in ks:
        kk = min(v, T)
        out[f"top{v}_loc_err"] = _err(hit[:, :kk].any(1))
        out[f"top{v}_cls_err"] = _err(cls_hit[:, :kk].any(1))
    out["mean_iou"] = ious.mean().item()
    out["gt_known_loc_err"] = _err(gt_known_hit)
    out["num_images"] = n
    return out
