"""Losses: golden values of smooth-L1 and GIoU; the two stages against torchvision's formulas."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import fastrcnn_loss

from heads.detection.box_coder import BoxCoder
from heads.detection.losses import box_loss, fast_rcnn_loss, giou_loss, rpn_loss, smooth_l1_loss


def test_smooth_l1_golden():
    x = torch.tensor([0.05, 1.0, -2.0])
    expected = 0.5 * 0.05 ** 2 * 9 + (1.0 - 0.5 / 9) + (2.0 - 0.5 / 9)
    assert smooth_l1_loss(x, torch.zeros(3)).item() == pytest.approx(expected, rel=1e-6)
    assert smooth_l1_loss(x, torch.zeros(3), beta=0.0).item() == pytest.approx(3.05)


def test_giou_golden():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0]])
    per = [giou_loss(a[i:i + 1], b[i:i + 1]).item() for i in range(3)]
    assert per == pytest.approx([1 - (1 / 7 - 2 / 9), 1 + 7 / 9, 0.0], abs=1e-6)


def test_box_loss_kinds():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    tgt = torch.tensor([[1.0, 2.0, 11.0, 14.0]])
    perfect = coder.encode(tgt, ref)
    assert box_loss(perfect, ref, tgt, coder).item() == pytest.approx(0.0, abs=1e-6)
    assert box_loss(perfect, ref, tgt, coder, kind="giou").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="box loss"):
        box_loss(perfect, ref, tgt, coder, kind="l2")


def test_rpn_loss_golden():
    coder = BoxCoder()
    logits = torch.tensor([2.0, -1.0, 0.0, 0.5])
    labels = torch.tensor([1, 0, 0, 1])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0]])
    targets = torch.tensor([[1.0, 2.0, 11.0, 14.0], [0.0, 0.0, 20.0, 20.0]])
    deltas = torch.zeros(2, 4)
    obj, box = rpn_loss(logits, labels, deltas, anchors, targets, coder)
    assert obj.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, labels.float()).item())
    d = torch.tensor([0.1, 0.3, 0.0, math.log(1.2)])  # first positive's target deltas
    expected = float(torch.where(d < 1 / 9, 0.5 * d ** 2 * 9, d - 0.5 / 9).sum()) / 4
    assert box.item() == pytest.approx(expected, rel=1e-5)


def test_fast_rcnn_loss_equals_torchvision():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    n, k = 12, 3
    logits, deltas = torch.randn(n, k + 1), torch.randn(n, 4 * (k + 1))
    labels = torch.tensor([0, 1, 2, 3, 0, 0, 1, 1, 0, 3, 0, 2])
    props = torch.rand(n, 2) * 50
    props = torch.cat([props, props + 5 + torch.rand(n, 2) * 30], 1)
    gts = props + torch.randn(n, 4)
    reg_targets = coder.encode(gts, props)
    ref_cls, ref_box = fastrcnn_loss(logits, deltas, [labels], [reg_targets])
    pos = torch.nonzero(labels > 0).squeeze(1)
    cls, box = fast_rcnn_loss(logits, labels, deltas.reshape(n, -1, 4)[pos, labels[pos]], props[pos], gts[pos], coder)
    torch.testing.assert_close(cls, ref_cls)
    torch.testing.assert_close(box, ref_box, rtol=1e-5, atol=1e-6)
