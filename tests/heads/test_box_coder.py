"""Box coder: golden deltas, round trip, clamp, agreement with torchvision's BoxCoder."""
import math

import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from heads.detection.box_coder import BBOX_XFORM_CLIP, BoxCoder, decode_boxes, encode_boxes


def test_encode_golden():
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    tgt = torch.tensor([[1.0, 2.0, 11.0, 14.0]])  # centre (6, 8), size 10 x 12
    torch.testing.assert_close(encode_boxes(tgt, ref), torch.tensor([[0.1, 0.3, 0.0, math.log(1.2)]]))
    torch.testing.assert_close(encode_boxes(tgt, ref, (10, 10, 5, 5)), torch.tensor([[1.0, 3.0, 0.0, 5 * math.log(1.2)]]))


def test_round_trip_and_class_sets():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 20.0]])
    tgt = torch.tensor([[1.0, 2.0, 11.0, 14.0], [0.0, 4.0, 40.0, 25.0]])
    deltas = coder.encode(tgt, ref)
    torch.testing.assert_close(coder.decode(deltas, ref)[:, 0], tgt)
    three = coder.decode(deltas.repeat(1, 3), ref)
    assert three.shape == (2, 3, 4)
    torch.testing.assert_close(three[:, 2], tgt)


def test_decode_clamps_log_scale():
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    out = decode_boxes(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), ref)[0, 0]
    side = 10 * math.exp(BBOX_XFORM_CLIP)  # 625 = 10 * 1000 / 16
    torch.testing.assert_close(out, torch.tensor([5 - side / 2, 5 - side / 2, 5 + side / 2, 5 + side / 2]))


def test_matches_torchvision():
    ref = torch.rand(50, 2) * 100
    ref = torch.cat([ref, ref + 1 + torch.rand(50, 2) * 50], 1)
    deltas = torch.randn(50, 8)
    tv = TVBoxCoder((10.0, 10.0, 5.0, 5.0))
    ours = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(ours.decode(deltas, ref), tv.decode(deltas, [ref]).reshape(50, 2, 4), rtol=0, atol=1e-4)
    tgt = ours.decode(deltas[:, :4], ref)[:, 0]
    torch.testing.assert_close(ours.encode(tgt, ref), tv.encode_single(tgt, ref), rtol=0, atol=1e-4)


def test_decode_zero_references_keeps_the_class_axis():
    # An eval batch whose RPN kept no proposal decodes zero rows; the class axis must survive.
    assert decode_boxes(torch.zeros(0, 12), torch.zeros(0, 4)).shape == (0, 3, 4)
    assert BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 1, 4)
