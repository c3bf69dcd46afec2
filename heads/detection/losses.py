"""Losses of Faster R-CNN as pure functions (Ren et al., 2015, eq. 1; Fast R-CNN, eq. 1-3).

Both stages sum a classification term (binary cross-entropy for the RPN's objectness, softmax
cross-entropy over ``K + 1`` classes for the box head) and a box term over positives only, divided
by the number of *sampled* items (torchvision's normalisation), so the box loss weight falls with
the positive share. The box term is smooth-L1 on encoded deltas (``beta = 1/9`` as in torchvision
and Detectron1) or GIoU on decoded boxes (Rezatofighi et al., 2019).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .box_coder import BoxCoder

BOX_LOSSES = ("smooth_l1", "giou")


def smooth_l1_loss(input: torch.Tensor, target: torch.Tensor, beta: float = 1.0 / 9) -> torch.Tensor:
    """Summed smooth-L1: ``0.5 x^2 / beta`` for ``|x| < beta``, else ``|x| - 0.5 beta``.

    Args:
        input, target: same shape (e.g. ``(P, 4)`` deltas).
        beta: transition point; 0 gives plain L1.

    Returns:
        scalar sum over all elements.
    """
    if beta < 1e-5:
        return (input - target).abs().sum()
    return F.smooth_l1_loss(input, target, beta=beta, reduction="sum")


def giou_loss(boxes: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Summed ``1 - GIoU`` of paired xyxy boxes ``(P, 4)``; 0 for identical boxes, up to 2.

    ``GIoU = IoU - |C \\ (A u B)| / |C|`` with ``C`` the smallest box enclosing both.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    a1, b1, a2, b2 = target.unbind(-1)
    iw = (torch.min(x2, a2) - torch.max(x1, a1)).clamp(min=0)
    ih = (torch.min(y2, b2) - torch.max(y1, b1)).clamp(min=0)
    inter = iw * ih
    union = (x2 - x1) * (y2 - y1) + (a2 - a1) * (b2 - b1) - inter
    iou = inter / (union + eps)
    enclose = (torch.max(x2, a2) - torch.min(x1, a1)) * (torch.max(y2, b2) - torch.min(y1, b1))
    giou = iou - (enclose - union) / (enclose + eps)
    return (1 - giou).sum()


def box_loss(
    pred_deltas: torch.Tensor,
    references: torch.Tensor,
    target_boxes: torch.Tensor,
    box_coder: BoxCoder,
    kind: str = "smooth_l1",
    beta: float = 1.0 / 9,
) -> torch.Tensor:
    """Summed box loss of positives.

    Args:
        pred_deltas: ``(P, 4)`` predicted deltas.
        references: ``(P, 4)`` xyxy anchors or proposals they apply to.
        target_boxes: ``(P, 4)`` xyxy matched ground truth.
        box_coder: the stage's coder (its weights scale the deltas).
        kind: ``"smooth_l1"`` on encoded deltas or ``"giou"`` on decoded boxes.
    """
    if kind == "smooth_l1":
        return smooth_l1_loss(pred_deltas, box_coder.encode(target_boxes, references), beta)
    if kind == "giou":
        return giou_loss(box_coder.decode(pred_deltas, references)[:, 0], target_boxes)
    raise ValueError(f"box loss must be one of {BOX_LOSSES}, got {kind!r}")


def rpn_loss(logits: torch.Tensor, labels: torch.Tensor, pos_deltas: torch.Tensor, pos_anchors: torch.Tensor,
             pos_targets: torch.Tensor, box_coder: BoxCoder, kind: str = "smooth_l1", beta: float = 1.0 / 9,
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """RPN losses over the sampled anchors.

    Args:
        logits: ``(S,)`` objectness logits of the sampled anchors.
        labels: ``(S,)`` 1 for positive, 0 for negative.
        pos_deltas, pos_anchors, pos_targets: ``(P, 4)`` of the positive ones.

    Returns:
        ``(loss_objectness, loss_rpn_box)``: mean BCE, summed box loss / ``S``.
    """
    objectness = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="sum")
    return _per_sampled(objectness, logits.numel(), pos_deltas, pos_anchors, pos_targets, box_coder, kind, beta)


def fast_rcnn_loss(class_logits: torch.Tensor, labels: torch.Tensor, pos_deltas: torch.Tensor,
                   pos_proposals: torch.Tensor, pos_targets: torch.Tensor, box_coder: BoxCoder,
                   kind: str = "smooth_l1", beta: float = 1.0 / 9) -> Tuple[torch.Tensor, torch.Tensor]:
    """Box-head losses over the sampled proposals.

    Args:
        class_logits: ``(S, K + 1)``; labels ``(S,)`` in ``0..K`` (0 = background).
        pos_deltas: ``(P, 4)`` the deltas predicted for each positive's own class.
        pos_proposals, pos_targets: ``(P, 4)`` xyxy proposals and their matched ground truth.

    Returns:
        ``(loss_cls, loss_box)``: mean cross-entropy, summed box loss / ``S``.
    """
    cls = F.cross_entropy(class_logits, labels, reduction="sum")
    return _per_sampled(cls, labels.numel(), pos_deltas, pos_proposals, pos_targets, box_coder, kind, beta)


def _per_sampled(cls_sum: torch.Tensor, num_sampled: int, *box_args) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both stages' normalisation: the summed classification loss and the positives' summed
    :func:`box_loss` (``box_args``), each divided by the number of sampled items (at least 1)."""
    num = max(num_sampled, 1)
    return cls_sum / num, box_loss(*box_args) / num
