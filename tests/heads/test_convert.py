"""torchvision Faster R-CNN weights in our detector: same detections on the same pre-processed input.

The torchvision model is built with ``min_size = max_size = S`` and mean 0 / std 1, so its
transform leaves an ``S x S`` input unchanged (resize factor 1.0, identity normalisation) and both
models see the same tensor. Random weights are made informative: non-trivial BatchNorm statistics,
a wider objectness and classifier init so that proposals and class scores are spread out (no
near-ties that float rounding could reorder), and the test checks there is something to compare.
"""
import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from heads import build_detector
from heads.detection.convert import convert_torchvision_state_dict, load_torchvision_detector

K = 3


def _randomise(tv, cls_std=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d":
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
        tv.rpn.head.cls_logits.weight.normal_(0, 0.1, generator=g)
        tv.roi_heads.box_predictor.cls_score.weight.normal_(0, cls_std, generator=g)
    return tv.eval()


def _compare(tv, ours, size, several_classes=True):
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tv(list(x))[0]
        out = ours.eval()(x, [(size, size)])[0]
    n = ref["boxes"].shape[0]
    assert n >= 20 and ref["scores"].unique().numel() > n // 2  # not vacuous: many distinct detections
    assert len(set(ref["labels"].tolist())) > 1 or not several_classes
    assert out["boxes"].shape[0] == n
    assert torch.equal(out["labels"], ref["labels"])
    box_err = (out["boxes"] - ref["boxes"]).abs().max().item()
    score_err = (out["scores"] - ref["scores"]).abs().max().item()
    assert box_err <= 1e-3 and score_err <= 1e-4, (box_err, score_err)
    return box_err, score_err


def test_fasterrcnn_resnet50_fpn_equivalence():
    s = 256
    tv = _randomise(torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=K + 1, min_size=s, max_size=s,
        image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0]))
    ours = load_torchvision_detector(build_detector("resnet50", num_classes=K), tv.state_dict())
    _compare(tv, ours, s)


@pytest.mark.filterwarnings("ignore:norm='frozen_bn'")  # frozen BN without pretrained: on purpose here
def test_resnet18_fpn_backbone_with_frozen_bn(tmp_path):
    s = 192
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)  # FrozenBatchNorm2d
    tv = _randomise(TVFasterRCNN(body, num_classes=K + 1, min_size=s, max_size=s,
                                 image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0]), cls_std=0.005)
    path = tmp_path / "tv_r18.pth"
    torch.save(tv.state_dict(), path)
    ours = build_detector("resnet18", num_classes=K, norm="frozen_bn", frozen_stages=2)
    load_torchvision_detector(ours, path)
    _compare(tv, ours, s, several_classes=False)  # one class dominates on random r18 features
    ours.roi_heads.pooler.impl = "torchvision"  # the GPU's path: levels pooled as sorted slices
    _compare(tv, ours, s, several_classes=False)
    # into trainable BN as well (num_batches_tracked added)
    _compare(tv, load_torchvision_detector(build_detector("resnet18", num_classes=K), path), s, several_classes=False)


def test_mapping_and_errors():
    sd = {"backbone.fpn.inner_blocks.2.0.weight": torch.zeros(1), "rpn.head.conv.weight": torch.zeros(1),
          "module.roi_heads.box_head.fc7.bias": torch.zeros(1), "backbone.body.layer1.0.bn1.running_var": torch.zeros(1)}
    assert sorted(convert_torchvision_state_dict(sd)) == [
        "backbone.fpn.lateral_convs.2.weight", "backbone.layer1.0.bn1.running_var",
        "roi_heads.box_head.fc2.bias", "rpn.head.conv.weight"]
    with pytest.raises(ValueError, match="box_head.0.0.weight"):
        convert_torchvision_state_dict({"roi_heads.box_head.0.0.weight": torch.zeros(1)})  # a v2 model
    ours = build_detector("resnet18", num_classes=K)
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K + 1)
    with pytest.raises(RuntimeError):
        load_torchvision_detector(ours, tv.state_dict())  # depth mismatch
