"""The localization loss: cross-entropy + L1 + generalized IoU over normalised xyxy boxes."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss


def localization_loss(
    outputs: Dict[str, torch.Tensor], labels: torch.Tensor, boxes: torch.Tensor, *, cls_weight: float = 1.0,
    l1_weight: float = 5.0, giou_weight: float = 2.0, label_smoothing: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """Cross-entropy + L1 + generalized IoU (Rezatofighi et al., 2019), DETR's weights by default.

    Args:
        outputs: the model's ``{"logits": (N, K), "boxes": (N, 4) | (N, K, 4)}``.
        labels: (N,) target classes 0..K-1; for pcr they pick the box that is trained.
        boxes: (N, 4) target boxes, normalised xyxy.
        cls_weight, l1_weight, giou_weight: the terms' weights (the L1 is the mean over the 4
            coordinates, the GIoU loss the mean over images).
        label_smoothing: of both cross-entropies (0: none).

    Returns:
        ``{"loss_cls", "loss_l1", "loss_giou"}`` (and ``"loss_crop_cls"``, the crop classifier's
        cross-entropy with ``cls_weight``, when the outputs have ``"crop_logits"``), already weighted (their sum
        is the training loss).
    """
    logits, pred = outputs["logits"], outputs["boxes"].float()
    labels = labels.long()
    if pred.dim() == 3:
        pred = pred[torch.arange(len(labels), device=pred.device), labels]
    if pred.shape != boxes.shape:
        raise ValueError(f"predicted boxes {tuple(pred.shape)} and targets {tuple(boxes.shape)} differ; "
                         "targets must be (N, 4) normalised xyxy")
    boxes = boxes.to(pred.dtype)
    losses = {
        "loss_cls": cls_weight * F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing),
        "loss_l1": l1_weight * F.l1_loss(pred, boxes),
        "loss_giou": giou_weight * generalized_box_iou_loss(pred, boxes, reduction="mean"),
    }
    if "crop_logits" in outputs:
        losses["loss_crop_cls"] = cls_weight * F.cross_entropy(outputs["crop_logits"].float(), labels,
                                                               label_smoothing=label_smoothing)
    return losses
