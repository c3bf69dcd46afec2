"""heads/detection/predictor.py with stand-in models (exact box arithmetic) and a tiny real detector (the
evaluation pipeline's preprocessing, the fast copy, results)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from heads.detection.predictor import DetectionPredictor, resolve_classes
from heads.meta import MetaError

META = {"task": "detection", "cat_ids": [3, 7, 11], "class_names": ["circle", "square", "cross"],
        "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 64, "num_classes": 3}


class LeftHalf(nn.Module):
    """Boxes the left half of each (resized) image as class 2 (score 0.8) and a sliver as class 1 (0.3)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, images, sizes):
        self.calls.append((tuple(images.shape), list(sizes)))
        out = []
        for h, w in sizes:
            boxes = torch.tensor([[0.0, 0.0, w / 2, h], [0.0, 0.0, 2.0, 2.0]])
            out.append({"boxes": boxes, "scores": torch.tensor([0.8, 0.3]), "labels": torch.tensor([2, 1])})
        return out


def test_boxes_come_back_in_original_pixels_with_category_ids():
    model = LeftHalf()
    pred = DetectionPredictor(model, META, fast=False)
    r = pred(np.zeros((100, 200, 3), np.uint8))  # longer side 200 -> 64: (32, 64), scale 0.32
    assert model.calls[0] == ((1, 3, 32, 64), [(32, 64)])  # padded to a multiple of 32
    assert r.boxes[0].tolist() == pytest.approx([0.0, 0.0, 100.0, 100.0])
    assert r.category_ids == [7, 3] and r.names == ["square", "circle"] and r.orig_size == (100, 200)
    coco = r.to_coco(image_id=5)
    assert coco[0] == {"image_id": 5, "category_id": 7, "bbox": pytest.approx([0, 0, 100, 100]),
                       "score": pytest.approx(0.8)}
    rec = r.to_records(image_id=5)[0]
    assert rec["file_name"] == "<input 0>" and rec["category_name"] == "square" and rec["image_id"] == 5
    assert r.to_txt().splitlines()[0] == "7 0.00 0.00 100.00 100.00 0.8000"


def test_flip_tta_and_ensembles_merge_to_one_box_per_object():
    pred = DetectionPredictor([LeftHalf(), LeftHalf()], META, fast=False, tta_flip=True, merge="nms",
                              merge_iou=0.3)
    r = pred(np.zeros((64, 64, 3), np.uint8))
    # the mirrored pass boxes the right half: two objects of class 2, one sliver of class 1 on each side
    assert pred.n_variants == 4
    halves = sorted(b.tolist() for b, lab in zip(r.boxes, r.labels) if lab == 2)
    assert halves == [pytest.approx([0, 0, 32, 64]), pytest.approx([32, 0, 64, 64])]
    wbf = DetectionPredictor([LeftHalf(), LeftHalf()], META, fast=False, merge="wbf")(np.zeros((64, 64, 3), np.uint8))
    assert wbf.boxes[0].tolist() == pytest.approx([0, 0, 32, 64]) and len(wbf) == 2


def test_score_threshold_class_filter_and_max_dets():
    img = np.zeros((64, 64, 3), np.uint8)
    assert len(DetectionPredictor(LeftHalf(), META, fast=False, score_thresh=0.5)(img)) == 1
    assert DetectionPredictor(LeftHalf(), META, fast=False, classes=["circle"])(img).names == ["circle"]
    assert DetectionPredictor(LeftHalf(), META, fast=False, classes=["7"])(img).category_ids == [7]
    assert len(DetectionPredictor(LeftHalf(), META, fast=False, max_dets=1)(img)) == 1
    with pytest.raises(ValueError, match=r"unknown class 'dog'.*circle \(3\), square \(7\), cross \(11\)"):
        resolve_classes(["dog"], META["cat_ids"], META["class_names"])


def test_a_list_of_mixed_inputs_gives_a_list(tmp_path):
    from PIL import Image

    p = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(p)
    pred = DetectionPredictor(LeftHalf(), META, fast=False)
    rs = pred([str(p), Image.open(p), torch.zeros(3, 40, 80)])
    assert [r.orig_size for r in rs] == [(40, 80)] * 3 and rs[0].path == str(p)
    out = rs[0].save(tmp_path / "drawn.png")
    assert Image.open(out).size[0] >= 80


@pytest.fixture(scope="module")
def tiny_detector():
    from heads.detection.faster_rcnn import build_detector

    torch.manual_seed(0)
    model = build_detector(backbone="resnet18", num_classes=3, pretrained=False, fpn_channels=32,
                           representation_size=64, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                           box_score_thresh=0.0, anchor_sizes=((8,), (16,), (32,), (64,), (128,))).eval()
    return model


def test_the_evaluation_pipeline_and_the_fast_copy(tiny_detector):
    """predict() on an image == the COCO reader's eval transforms + collate + the model, boxes / scale; the
    inference copy (default) agrees with the model as trained."""
    from res_backbone.data import build_eval_transforms, collate_detection

    img = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    tf = build_eval_transforms(64, META["mean"], META["std"])
    x = tf(image=img, bboxes=np.zeros((0, 4)), labels=[])["image"].float()
    images, sizes, _ = collate_detection([(x, {})])
    with torch.no_grad():
        ref = tiny_detector(images, sizes)[0]
    scale = sizes[0][0] / 50
    slow = DetectionPredictor(tiny_detector, META, fast=False)(img)
    assert len(slow) == len(ref["scores"]) > 0
    assert torch.allclose(slow.boxes, (ref["boxes"].double() / scale).clamp(min=0).minimum(
        torch.tensor([90.0, 50, 90, 50], dtype=torch.float64)), atol=1e-4)
    fast = DetectionPredictor(tiny_detector, META)(img)
    assert tiny_detector.training is False and len(fast) == len(slow)
    assert torch.allclose(fast.scores, slow.scores, atol=1e-4)


def test_from_files_checks_the_task(tmp_path, tiny_detector):
    torch.save({"task": "classification", "model": {}, "classes": ["a"], "model_name": "resnet18",
                "config": {"image_size": 32}}, tmp_path / "cls.pt")
    with pytest.raises(MetaError, match="cls.pt: a classification model, but a detection model is expected"):
        DetectionPredictor.from_files(tmp_path / "cls.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        DetectionPredictor.from_files(tmp_path / "nope.pt")
    json.dumps(META)  # meta stays JSON (the exported files' contract)


def test_exported_files_are_dispatched_by_heads_exported(tmp_path, monkeypatch):
    """The B/C contract: a file heads.exported.is_exported_file recognises is loaded by load_exported, its meta
    checked for the task, and called like the eager model (a stand-in module until heads/exported.py lands)."""
    import sys
    import types

    class Exported:
        format = "onnx"

        def __init__(self, meta):
            self.meta, self.model = meta, LeftHalf()

        def __call__(self, images, sizes):
            return self.model(images, sizes)

    metas = {"det.onnx": META, "cls.onnx": dict(META, task="classification")}
    fake = types.ModuleType("heads.exported")
    fake.is_exported_file = lambda path: str(path).endswith(".onnx")
    fake.load_exported = lambda path, device="cpu": Exported(metas[Path(path).name])
    monkeypatch.setitem(sys.modules, "heads.exported", fake)
    for name in metas:
        (tmp_path / name).write_bytes(b"onnx")
    pred = DetectionPredictor.from_files(tmp_path / "det.onnx")
    assert pred.eager == [False] and pred(np.zeros((100, 200, 3), np.uint8)).boxes[0].tolist() == pytest.approx(
        [0, 0, 100, 100])
    with pytest.raises(MetaError, match="cls.onnx: a classification model, but a detection model is expected"):
        DetectionPredictor.from_files(tmp_path / "cls.onnx")
