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
    wx, wy, ww, wh = weights
    rw = references[:, 2] - references[:, 0]
    rh = references[:, 3] - references[:, 1]
    rx = references[:, 0] + 0.5 * rw
    ry = references[:, 1] + 0.5 * rh
    tw = targets[:, 2] - targets[:, 0]
    th = targets[:, 3] - targets[:, 1]
    tx = targets[:, 0] + 0.5 * tw
    ty = targets[:, 1] + 0.5 * th
    return torch.stack(
        (wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * torch.log(tw / rw), wh * torch.log(th / rh)), dim=1
    )


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
    wx, wy, ww, wh = weights
    references = references.to(deltas.dtype)
    w = (references[:, 2] - references[:, 0])[:, None]
    h = (references[:, 3] - references[:, 1])[:, None]
    cx = references[:, 0, None] + 0.5 * w
    cy = references[:, 1, None] + 0.5 * h
    d = deltas.unflatten(-1, (-1, 4)) if deltas.dim() == 2 else deltas  # (N, C, 4), N = 0 included
    dx, dy = d[..., 0] / wx, d[..., 1] / wy
    dw = (d[..., 2] / ww).clamp(max=clip)
    dh = (d[..., 3] / wh).clamp(max=clip)
    pcx = dx * w + cx
    pcy = dy * h + cy
    half_w = 0.5 * torch.exp(dw) * w
    half_h = 0.5 * torch.exp(dh) * h
    return torch.stack((pcx - half_w, pcy - half_h, pcx + half_w, pcy + half_h), dim=2)


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
