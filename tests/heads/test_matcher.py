"""Matcher: thresholds, ignore band, low-quality matches, empty ground truth."""
import torch
from torchvision.models.detection._utils import Matcher as TVMatcher

from heads.detection.matcher import Matcher

IOU = torch.tensor([
    [0.90, 0.40, 0.10, 0.20, 0.00],
    [0.10, 0.65, 0.20, 0.65, 0.29],
])


def test_thresholds_golden():
    assert Matcher(0.7, 0.3)(IOU).tolist() == [0, -2, -1, -2, -1]


def test_low_quality_matches_golden():
    # gt 1's best IoU (0.65) is shared by predictions 1 and 3: both become its matches
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(IOU).tolist() == [0, 1, -1, 1, -1]


def test_no_ground_truth_is_background():
    assert Matcher(0.7, 0.3, True)(torch.zeros(0, 4)).tolist() == [-1] * 4


def test_matches_torchvision_on_random():
    iou = torch.rand(6, 300) ** 3
    for low_quality in (False, True):
        ours = Matcher(0.7, 0.3, low_quality)(iou)
        assert torch.equal(ours, TVMatcher(0.7, 0.3, low_quality)(iou))
