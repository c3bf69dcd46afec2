"""Anchors: count, order and positions on a 2-level toy case; torchvision agreement; cache."""
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from heads.detection.anchors import AnchorGenerator, cell_anchors


def test_cell_anchors_golden():
    # size 16, ratio h/w 0.5: w = 16 * sqrt(2) = 22.6, h = 11.3 -> half 11.3, 5.66 -> rounded
    assert cell_anchors((16,), (0.5, 1.0, 2.0)).tolist() == [
        [-11.0, -6.0, 11.0, 6.0], [-8.0, -8.0, 8.0, 8.0], [-6.0, -11.0, 6.0, 11.0]]


def test_two_levels_golden():
    gen = AnchorGenerator(sizes=((8,), (16,)), aspect_ratios=((1.0,), (0.5, 1.0, 2.0)), strides=(4, 8))
    assert gen.num_anchors_per_location == [1, 3]
    a0, a1 = gen.grid_anchors([(2, 3), (1, 2)], torch.device("cpu"))
    assert a0.shape == (6, 4) and a1.shape == (6, 4)
    # level 0, cell (y=1, x=2): centre (8, 4), 8 x 8
    assert a0[1 * 3 + 2].tolist() == [4.0, 0.0, 12.0, 8.0]
    assert a0[0].tolist() == [-4.0, -4.0, 4.0, 4.0]
    # level 1, cell (y=0, x=1), anchor 2 (ratio 2): centre (8, 0)
    assert a1[1 * 3 + 2].tolist() == [2.0, -11.0, 14.0, 11.0]


def test_from_shapes_and_torchvision_agreement():
    shapes = {"p2": (8, 4), "p3": (8, 8)}
    gen = AnchorGenerator.from_shapes(shapes, sizes=((32,), (64,)))
    feats = [torch.zeros(1, 8, 8, 12), torch.zeros(1, 8, 4, 6)]
    tv = TVAnchorGenerator(sizes=((32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 2)
    ref = tv(ImageList(torch.zeros(1, 3, 32, 48), [(32, 48)]), feats)[0]
    assert torch.equal(torch.cat(gen(feats)), ref)


def test_cached_per_size():
    gen = AnchorGenerator(sizes=((8,),), aspect_ratios=((1.0,),), strides=(4,))
    a = gen.grid_anchors([(2, 2)], torch.device("cpu"))
    assert gen.grid_anchors([(2, 2)], torch.device("cpu")) is a
    assert gen.grid_anchors([(3, 2)], torch.device("cpu"))[0].shape == (6, 4)


def test_concatenated_levels_cached():
    gen = AnchorGenerator(sizes=((8,), (16,)), aspect_ratios=((0.5, 1.0),), strides=(4, 8))
    feats = [torch.zeros(2, 1, 4, 6), torch.zeros(2, 1, 2, 3)]
    cat = gen.concatenated(feats)
    assert torch.equal(cat, torch.cat(gen(feats))) and cat.shape == (4 * 6 * 2 + 2 * 3 * 2, 4)
    assert gen.concatenated(feats) is cat
