"""RPN recall (heads/detection/diagnostics.py) on hand-built proposals and on a tiny model with a known proposal."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from heads.detection.diagnostics import greedy_covered, proposal_recall, rpn_recall

FAR = [500.0, 500.0, 510.0, 510.0]  # a proposal that covers nothing


def test_recall_per_count_iou_and_size_bucket():
    gts = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 200.0, 200.0]])]  # small (100), large (10000)
    props = torch.tensor([[0.0, 0.0, 10.0, 10.0]] + [FAR] * 150 + [[100.0, 100.0, 200.0, 170.0]])  # IoU 0.7 at 152
    rec = proposal_recall([props], gts, [[100.0, 10000.0]], tops=(100, 300), ious=(0.5, 0.75))
    assert rec["gt_boxes"] == {"all": 2, "small": 1, "medium": 0, "large": 1}
    assert rec["recall"]["100"]["0.5"] == {"all": 0.5, "small": 1.0, "medium": -1.0, "large": 0.0}
    assert rec["recall"]["300"]["0.5"]["all"] == 1.0 and rec["recall"]["300"]["0.75"]["all"] == 0.5


def test_one_proposal_covers_one_box_only():
    iou = torch.tensor([[0.9, 0.6], [0.8, 0.0]])  # box 0 takes proposal 0; box 1 is left with nothing
    assert greedy_covered(iou).tolist() == pytest.approx([0.9, 0.0])
    assert greedy_covered(torch.zeros(2, 0)).tolist() == [0.0, 0.0]


class KnownRPN(nn.Module):
    """Proposes one known box (in the resized batch's pixels) first, then boxes that cover nothing."""

    def __init__(self, box):
        super().__init__()
        self.box, self.post_nms_top_n, self.asked = torch.tensor(box), {"test": 7}, []

    def forward(self, features, sizes, targets=None):
        self.asked.append(self.post_nms_top_n["test"])
        n = sizes.shape[0]
        per_image = torch.cat([self.box[None], torch.tensor([FAR] * 3)])
        return (per_image.repeat(n, 1), torch.arange(n).repeat_interleave(4)), {}


def test_rpn_recall_reads_the_models_proposals_in_original_pixels(tmp_path):
    from heads.detection import build_detector
    from res_backbone.data import CocoDetection

    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(tmp_path / name)
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 128, "height": 128},
                     {"id": 2, "file_name": "b.png", "width": 128, "height": 128}],
          "categories": [{"id": 4, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [20, 20, 60, 60], "area": 3600, "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 4, "bbox": [20, 20, 60, 60], "area": 3600, "iscrowd": 0},
                          {"id": 3, "image_id": 2, "category_id": 4, "bbox": [100, 100, 10, 10], "area": 100, "iscrowd": 0},
                          {"id": 4, "image_id": 2, "category_id": 4, "bbox": [0, 0, 128, 128], "area": 16384, "iscrowd": 1}]}
    (tmp_path / "val.json").write_text(json.dumps(gt))
    dataset = CocoDetection(tmp_path / "val.json", tmp_path, None)
    model = build_detector("resnet18", num_classes=1, fpn_channels=16, representation_size=32).eval()
    model.rpn = KnownRPN([10.0, 10.0, 40.0, 40.0])  # images resized 128 -> 64: box [20, 20, 80, 80] in the json's pixels
    predictor = SimpleNamespace(models=[model], scales=[64], meta={"mean": [0.5] * 3, "std": [0.25] * 3},
                                batch_size=2, workers=0, forward=lambda fn, *args: fn(*args))
    rec = rpn_recall(predictor, dataset)
    assert model.rpn.asked == [1000] and model.rpn.post_nms_top_n["test"] == 7 and rec["proposals_kept"] == 7
    assert rec["gt_boxes"] == {"all": 3, "small": 1, "medium": 2, "large": 0}  # the crowd box is left out
    assert rec["recall"]["100"]["0.7"] == {"all": pytest.approx(2 / 3), "small": 0.0, "medium": 1.0, "large": -1.0}
    assert dataset.transforms is None  # restored
