"""FPN: levels, shapes, options; and the FPN backbone inside torchvision's FasterRCNN."""
import math

import pytest
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

import res_backbone as rb
from res_backbone.fpn import FPN


@pytest.mark.parametrize("p6", ["maxpool", "conv", None])
def test_fpn_levels_and_shapes(p6):
    m = rb.create_backbone("resnet18", fpn=True, fpn_channels=64, fpn_p6=p6)
    names = ["p2", "p3", "p4", "p5"] + (["p6"] if p6 else [])
    assert list(m.output_shape()) == names
    assert m.out_channels == 64
    feats = m(torch.randn(1, 3, 200, 333))
    assert list(feats) == names
    for name, t in feats.items():
        ch, stride = m.output_shape()[name]
        assert t.shape == (1, ch, math.ceil(200 / stride), math.ceil(333 / stride)), name
    has_p6_conv = any(k.startswith("fpn.p6.") for k in m.state_dict())
    assert has_p6_conv == (p6 == "conv")


def test_fpn_top_down_is_nearest_upsampling_plus_lateral():
    fpn = FPN({"res4": (8, 16), "res5": (16, 32)}, out_channels=4, p6=None)
    c4, c5 = torch.randn(1, 8, 4, 6), torch.randn(1, 16, 2, 3)
    out = fpn({"res4": c4, "res5": c5})
    top = fpn.lateral_convs[1](c5)
    inner = fpn.lateral_convs[0](c4) + top.repeat_interleave(2, -2).repeat_interleave(2, -1)
    torch.testing.assert_close(out["p4"], fpn.output_convs[0](inner))
    torch.testing.assert_close(out["p5"], fpn.output_convs[1](top))


def test_fpn_rejects_unordered_inputs():
    with pytest.raises(ValueError, match="fine to coarse"):
        FPN({"res5": (16, 32), "res4": (8, 16)})


def test_fpn_over_subset_of_levels():
    m = rb.create_backbone("resnet50", out_features=("res3", "res4", "res5"), fpn=True, fpn_p6="conv")
    assert list(m.output_shape()) == ["p3", "p4", "p5", "p6"]


def test_drops_into_torchvision_faster_rcnn():
    """Our FPN backbone, unchanged, in torchvision's FasterRCNN: one training step, then inference."""
    backbone = rb.create_backbone("resnet18", fpn=True, fpn_channels=64)
    levels = list(backbone.output_shape())  # p2..p6
    anchor_gen = AnchorGenerator(sizes=tuple((16 * 2 ** i,) for i in range(len(levels))),
                                 aspect_ratios=((0.5, 1.0, 2.0),) * len(levels))
    model = FasterRCNN(
        backbone, num_classes=3, rpn_anchor_generator=anchor_gen,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=levels[:4], output_size=7, sampling_ratio=2),
        min_size=128, max_size=160,
    )
    images = [torch.rand(3, 128, 160), torch.rand(3, 120, 150)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 30.0, 100.0, 80.0], [5.0, 5.0, 40.0, 40.0]]), "labels": torch.tensor([2, 1])}]
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    before = backbone.conv1.weight.detach().clone()
    loss.backward()
    opt.step()
    assert not torch.equal(before, backbone.conv1.weight)
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2 and set(dets[0]) == {"boxes", "labels", "scores"}
