"""Box <-> delta encoding of R-CNN (Girshick et al., 2014, appendix C), as Faster R-CNN uses it.

For a reference box ``(x1, y1, x2, y2)`` with width ``w``, height ``h`` and centre ``(cx, cy)`` and a
target with ``w*, h*, cx*, cy*``::

    dx = wx * (cx* - cx) / w     dy = wy * (cy* - cy) / h
    dw = ww * log(w* / w)        dh = wh * log(h* / h)

Widths are ``x2 - x1`` (no ``+1``, as torchvision and detectron2 since 2019). On decoding ``dw``/``dh``
are clamped at ``log(1000 / 16)`` so that an untrained head cannot overflow ``exp``.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torchvision.ops import batched_nms, nms

BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def encode_boxes(
    targets: torch.Tensor, references: torch.Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> torch.Tensor:
    """Deltas that move ``references`` onto ``targets``.

    Args:
        targets: ``(N, 4)`` xyxy boxes to reach.
        references: ``(N, 4)`` xyxy anchors or proposals (positive width and height).
        weights: ``(wx, wy, ww, wh)``.

    Returns:
        ``(N, 4)`` deltas ``(dx, dy, dw, dh)``.
    """
    # x and y are computed together as (N, 2) pairs: half the kernel launches of a per-coordinate
    # version (what a GPU at small batch pays for), the same float operations in the same order
    rwh = references[:, 2:] - references[:, :2]
    rctr = references[:, :2] + 0.5 * rwh
    twh = targets[:, 2:] - targets[:, :2]
    tctr = targets[:, :2] + 0.5 * twh
    dxy = _scale(tctr - rctr, weights[0], weights[1]) / rwh
    dwh = _scale(torch.log(twh / rwh), weights[2], weights[3])
    return torch.cat((dxy, dwh), dim=1)


def decode_boxes(
    deltas: torch.Tensor,
    references: torch.Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = BBOX_XFORM_CLIP,
) -> torch.Tensor:
    """Apply ``deltas`` to ``references``.

    Args:
        deltas: ``(N, 4 * C)`` deltas, ``C`` sets per reference (e.g. one per class).
        references: ``(N, 4)`` xyxy boxes.
        weights: ``(wx, wy, ww, wh)``, the ones used to encode.
        clip: upper bound of ``dw``/``dh`` after dividing by the weights.

    Returns:
        ``(N, C, 4)`` xyxy boxes.
    """
    references = references.to(deltas.dtype)
    wh = (references[:, 2:] - references[:, :2])[:, None, :]  # (N, 1, 2)
    ctr = references[:, None, :2] + 0.5 * wh
    d = deltas.unflatten(-1, (-1, 4)) if deltas.dim() == 2 else deltas  # (N, C, 4), N = 0 included
    dxy = _scale(d[..., :2], weights[0], weights[1], divide=True)
    dwh = _scale(d[..., 2:], weights[2], weights[3], divide=True).clamp(max=clip)
    pctr = dxy * wh + ctr
    half = 0.5 * torch.exp(dwh) * wh
    return torch.cat((pctr - half, pctr + half), dim=2)


def _scale(x: torch.Tensor, wa: float, wb: float, divide: bool = False) -> torch.Tensor:
    """``x (..., 2)`` times (or divided by) ``(wa, wb)``: one scalar op when both are equal, none when 1."""
    if wa == wb:
        if wa == 1.0:
            return x
        return x / wa if divide else wa * x
    w = torch.tensor((wa, wb), dtype=x.dtype, device=x.device)
    return x / w if divide else w * x


class BoxCoder:
    """:func:`encode_boxes` / :func:`decode_boxes` with fixed weights and clamp.

    Args:
        weights: ``(wx, wy, ww, wh)``; ``(1, 1, 1, 1)`` for the RPN, ``(10, 10, 5, 5)`` for the box head.
        clip: clamp of ``dw``/``dh`` on decoding (default ``log(1000/16)``).
    """

    def __init__(self, weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0), clip: float = BBOX_XFORM_CLIP):
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip

    def encode(self, targets: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        return encode_boxes(targets, references, self.weights)

    def decode(self, deltas: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        return decode_boxes(deltas, references, self.weights, self.clip)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, clip={self.clip:.4f})"


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.batched_nms``: indices kept by NMS within each group, by decreasing score.

    While ``torch.export`` traces (``tools/export.py``), always the coordinate-offset form (boxes of different
    groups moved apart, one NMS): ``batched_nms`` chooses its form from ``boxes.numel()``, a data-dependent size
    that export cannot branch on (pytorch/pytorch#146152). Both forms keep the same boxes.
    """
    if not torch.compiler.is_exporting():
        return batched_nms(boxes, scores, groups, iou_threshold)
    # the largest coordinate without a data-dependent branch on emptiness (an empty max() fails at run time:
    # a graph exported so crashes on an image with no candidate boxes, pytorch/vision#2380)
    top = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = groups.to(boxes) * (top + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)
