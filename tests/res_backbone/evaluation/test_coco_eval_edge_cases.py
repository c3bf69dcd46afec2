"""COCO evaluation edge cases: every combination is defined (pycocotools' -1 = undefined, explained in
the output), nothing crashes, and metrics.json keeps the -1 as numbers. tools/eval_det.py end to end."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from res_backbone.evaluation import STAT_NAMES, coco_evaluate
from res_backbone.evaluation.coco import UNDEFINED_NOTE

ROOT = Path(__file__).resolve().parents[3]
CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "ghost"}]  # ghost: never annotated


def _img(i, w=64, h=48):
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def _ann(i, img, cat, bbox, crowd=0):
    return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": crowd}


GT = {
    "normal": {"images": [_img(1), _img(2), _img(9)], "categories": CATS, "annotations": [
        _ann(1, 1, 3, [4, 4, 20, 16]), _ann(2, 1, 7, [30, 10, 25, 30]), _ann(3, 2, 7, [2, 2, 10, 10]),
        _ann(4, 9, 3, [0, 0, 40, 40], crowd=1)]},  # image 9 holds only a crowd box
    "only_crowd": {"images": [_img(9)], "categories": CATS, "annotations": [_ann(4, 9, 3, [0, 0, 40, 40], crowd=1)]},
    "no_annotations": {"images": [_img(1), _img(2)], "categories": CATS, "annotations": []},
    "empty_val_set": {"images": [], "categories": CATS, "annotations": []},
    "no_categories": {"images": [_img(1)], "categories": [], "annotations": []},
}


def _dets(gt, kind):
    ids = [im["id"] for im in gt["images"]]
    real = [a for a in gt["annotations"] if not a["iscrowd"]]
    if kind == "none" or not ids or not gt["categories"]:
        return []
    if kind == "perfect":
        return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
                for a in real]
    if kind == "ghost_only":  # every detection in the category that has no ground truth
        return [{"image_id": i, "category_id": 11, "bbox": [1, 1, 10, 10], "score": 0.8} for i in ids]
    rng = np.random.default_rng(0)  # "random": 5 boxes per image, random classes and scores
    return [{"image_id": i, "category_id": int(rng.choice([3, 7, 11])),
             "bbox": [float(v) for v in rng.uniform(0, 30, 2)] + [float(v) for v in rng.uniform(1, 30, 2)],
             "score": float(rng.random())} for i in ids for _ in range(5)]


@pytest.mark.parametrize("dets", ["none", "perfect", "ghost_only", "random"])
@pytest.mark.parametrize("gt_name", sorted(GT))
def test_every_edge_case_is_defined_and_explained(gt_name, dets):
    gt = GT[gt_name]
    m = coco_evaluate(copy.deepcopy(gt), _dets(gt, dets))
    for k in STAT_NAMES:
        assert isinstance(m[k], float) and (m[k] == -1.0 or 0.0 <= m[k] <= 1.0), (k, m[k])
    assert all(v == -1.0 or 0.0 <= v <= 1.0 for v in m["per_class_AP"].values())
    assert m["note"] == UNDEFINED_NOTE and m["summary"].rstrip().endswith(UNDEFINED_NOTE)
    out = json.loads(json.dumps({k: v for k, v in m.items() if k != "summary"}, allow_nan=False))
    assert None not in out.values() and out["note"].startswith("-1 = undefined")
    has_gt = any(not a["iscrowd"] for a in gt["annotations"]) and gt["images"]
    if not has_gt:  # nothing to find: every number undefined, whatever was detected
        assert all(m[k] == -1.0 for k in STAT_NAMES) and set(m["per_class_AP"].values()) <= {-1.0}
    else:
        assert m["per_class_AP"]["ghost"] == -1.0  # a category without ground truth: undefined, not 0
        assert m["AP"] == {"none": 0.0, "perfect": pytest.approx(1.0), "ghost_only": 0.0}.get(dets, m["AP"])


def test_crowd_regions_ignore_detections_of_their_own_category_only():
    gt = GT["normal"]
    perfect = _dets(gt, "perfect")
    on_crowd = {"image_id": 9, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.95}  # inside the crowd box
    assert coco_evaluate(gt, perfect + [on_crowd])["AP"] == pytest.approx(1.0)  # ignored, not a false positive
    wrong_class = dict(on_crowd, category_id=7)  # no dog crowd there: a real false positive, ranked first
    m = coco_evaluate(gt, perfect + [wrong_class])
    assert m["per_class_AP"]["dog"] < 1.0 and m["per_class_AP"]["cat"] == pytest.approx(1.0)


def test_category_without_ground_truth_is_reported_as_undefined():
    gt = GT["normal"]
    m = coco_evaluate(gt, _dets(gt, "perfect") + _dets(gt, "ghost_only"))
    assert m["AP"] == pytest.approx(1.0)  # ghost detections do not lower the mean: the category is left out
    assert m["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0), "ghost": -1.0}
    assert "ghost  -1 (no ground truth)" in m["summary"]


def test_empty_val_set_and_unknown_ids_are_named():
    m = coco_evaluate(GT["empty_val_set"], [])
    assert "0 images" in m["summary"] and UNDEFINED_NOTE in m["summary"]
    with pytest.raises(ValueError, match=r"result image id\(s\) are not in the ground truth \(0 images\): \[5\]"):
        coco_evaluate(GT["empty_val_set"], [{"image_id": 5, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match=r"\[99\]"):
        coco_evaluate(GT["normal"], [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match=r"img_ids \[42\] are not in the ground truth"):
        coco_evaluate(GT["normal"], [], img_ids=[1, 42])
    for bad, match in (({"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}, "detection 0 must be a dict"),
                       ({"image_id": [1], "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}, "must be integers"),
                       ({"image_id": 1, "category_id": 3, "bbox": [0, 0, 1], "score": 1.0}, r"bbox must be \[x, y")):
        with pytest.raises(ValueError, match=match):
            coco_evaluate(GT["normal"], [bad])


# ---------------------------------------------------------------------- tools/eval_det.py
DET = dict(backbone="resnet18", num_classes=3, fpn_channels=32, representation_size=64, rpn_pre_nms_top_n_test=50,
           rpn_post_nms_top_n_test=20, box_detections_per_img=10, box_score_thresh=0.0)


@pytest.fixture(scope="module")
def det_checkpoint(tmp_path_factory):
    from heads.detection import build_detector

    base = tmp_path_factory.mktemp("eval_det_edge")
    model = build_detector(**DET)
    path = base / "det.pt"
    torch.save({"model": model.state_dict(), "task": "detection", "detector_kwargs": DET, "cat_ids": [3, 7, 11],
                "class_names": ["cat", "dog", "ghost"], "config": {"image_size": 64}, "pretrained_cfg": {}}, path)
    return base, path


def _eval_det(argv):
    spec = importlib.util.spec_from_file_location("tool_eval_det", ROOT / "tools" / "eval_det.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.parametrize("gt_name", ["normal", "empty_val_set"])
def test_eval_det_prints_and_writes_the_convention(det_checkpoint, gt_name, capsys):
    base, ckpt = det_checkpoint
    folder = base / gt_name
    (folder / "images").mkdir(parents=True)
    gt = GT[gt_name]
    for im in gt["images"]:
        arr = np.random.default_rng(im["id"]).integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / "images" / im["file_name"])
    (folder / "val.json").write_text(json.dumps(gt))
    rc = _eval_det(["--checkpoint", str(ckpt), "--val-json", str(folder / "val.json"), "--val-images",
                    str(folder / "images"), "--image-size", "64", "--workers", "0", "--batch-size", "2",
                    "--num-pictures", "1", "--no-progress", "--diagnostics", "--output", str(folder / "out")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert UNDEFINED_NOTE in printed
    metrics = json.loads((folder / "out" / "metrics.json").read_text())
    assert metrics["note"] == UNDEFINED_NOTE and metrics["per_class_AP"]["ghost"] == -1.0
    assert all(isinstance(metrics[k], float) and not math.isnan(metrics[k]) for k in STAT_NAMES)
    diagnostics = json.loads((folder / "out" / "diagnostics.json").read_text())  # defined in both cases
    if gt_name == "empty_val_set":
        assert "Diagnostics skipped" in printed and "no images" in diagnostics["skipped"]
        assert all(metrics[k] == -1.0 for k in STAT_NAMES) and "no images" in printed
        assert json.loads((folder / "out" / "detections.json").read_text()) == []
    else:
        assert metrics["APl"] == -1.0  # no large objects in 64 px images: undefined, printed as -1
        assert "ghost  -1 (no ground truth)" in printed
