import pytest
import torch

from heads.detection import build_detector

DET_KW = dict(backbone="resnet18", num_classes=3, arch="fpn", fpn_channels=16, representation_size=32,
              rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_detections_per_img=20)


def det_checkpoint(path, **overrides):
    """A train_det.py-layout checkpoint of a tiny random detector (what export and prediction read)."""
    torch.manual_seed(0)
    kw = {**DET_KW, **overrides}
    model = build_detector(pretrained=False, **kw)
    torch.save({"model": model.state_dict(), "task": "detection", "arch": kw["backbone"], "detector_kwargs": kw,
                "cat_ids": [3, 7, 9], "class_names": ["cat", "dog", "owl"], "config": {"image_size": 128},
                "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}, path)
    return path


@pytest.fixture
def det_ckpt(tmp_path):
    return det_checkpoint(tmp_path / "det.pt")
