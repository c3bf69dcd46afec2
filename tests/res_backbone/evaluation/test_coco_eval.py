import copy
import io
import contextlib
import json

import pytest
import torch
from pycocotools.coco import COCO

from res_backbone.evaluation import (STAT_NAMES, coco_evaluate, gather_results, load_coco_gt, to_coco_results,
                                     write_detections_json)


def _gt():
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 100},
                   {"id": 4, "file_name": "b.png", "width": 100, "height": 100},
                   {"id": 9, "file_name": "crowd.png", "width": 100, "height": 100}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "ghost"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [100, 20, 60, 60], "area": 3600, "iscrowd": 0},
            {"id": 3, "image_id": 4, "category_id": 7, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 4, "image_id": 9, "category_id": 3, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 1},
        ],
    }


def _perfect(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            for a in gt["annotations"] if not a["iscrowd"]]


def test_perfect_detections_ap_one():
    gt = _gt()
    m = coco_evaluate(gt, _perfect(gt))
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0)
    assert m["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0), "ghost": -1.0}
    assert m["APl"] == -1.0  # no large ground truth: undefined, pycocotools' -1
    assert set(STAT_NAMES) <= set(m) and isinstance(m["summary"], str) and "Average Precision" in m["summary"]
    assert all(isinstance(m[k], float) for k in STAT_NAMES)


def test_shifted_boxes_lower_ap():
    gt = _gt()
    res = _perfect(gt)
    for r in res:
        r["bbox"][0] += 0.3 * r["bbox"][2]
    m = coco_evaluate(gt, res)
    assert 0.0 < m["AP"] < 1.0 and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(0.0)


def test_wrong_class_gets_zero():
    gt = _gt()
    res = [dict(r, category_id=11) for r in _perfect(gt)]
    m = coco_evaluate(gt, res)
    assert m["AP"] == 0.0 and m["per_class_AP"]["ghost"] == -1.0


def test_no_detections_does_not_crash():
    m = coco_evaluate(_gt(), [])
    assert all(m[k] in (0.0, -1.0) for k in STAT_NAMES) and m["AP"] == 0.0
    assert m["per_class_AP"] == {"cat": 0.0, "dog": 0.0, "ghost": -1.0}


def test_empty_val_set_and_crowd_only():
    gt = _gt()
    empty = {"images": [], "annotations": [], "categories": gt["categories"]}
    m = coco_evaluate(empty, [])
    assert all(m[k] == -1.0 for k in STAT_NAMES)
    m = coco_evaluate(gt, [{"image_id": 9, "category_id": 3, "bbox": [0, 0, 50, 50], "score": 0.9}], img_ids=[9])
    assert m["AP"] == -1.0  # crowd-only image: nothing to find, the detection is ignored, not a false positive


def test_does_not_mutate_inputs_and_accepts_coco_object():
    gt = _gt()
    res = _perfect(gt)
    before = copy.deepcopy(res)
    coco = load_coco_gt(gt)
    assert isinstance(coco, COCO)
    assert coco_evaluate(coco, res)["AP"] == pytest.approx(1.0)
    assert res == before


def test_unknown_ids_are_errors():
    gt = _gt()
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(gt, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match=r"category ids \[1\]"):
        coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_to_coco_results_roundtrip_via_scale():
    cat_ids = [3, 7, 11]
    # model saw image 1 resized by 0.5: (100, 200) -> (50, 100); y1 = 50.5 / 0.5 = 101 is clipped to H = 100
    outputs = [{"boxes": torch.tensor([[5.0, 5, 25, 20], [50, 10, 80, 50.5]]), "scores": torch.tensor([0.9, 0.8]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
    targets = [{"image_id": 1, "scale": 0.5, "orig_size": (100, 200)}, {"image_id": 4, "scale": 1.0, "orig_size": (100, 100)}]
    res = to_coco_results(outputs, targets, cat_ids)
    assert res == [{"image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 40.0, 30.0], "score": pytest.approx(0.9)},
                   {"image_id": 1, "category_id": 7, "bbox": [100.0, 20.0, 60.0, 80.0], "score": pytest.approx(0.8)}]
    assert all(type(v) is float for r in res for v in r["bbox"] + [r["score"]])
    assert all(type(r["image_id"]) is int and type(r["category_id"]) is int for r in res)
    with pytest.raises(ValueError, match="outside 1..3"):
        to_coco_results([{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([0])}],
                        targets[:1], cat_ids)


def test_write_detections_json_loadres(tmp_path):
    gt = _gt()
    res = [dict(r, score=torch.tensor(0.5)) for r in _perfect(gt)]  # tensor scores are converted
    path = write_detections_json(res, tmp_path / "out" / "detections.json")
    assert json.loads(path.read_text())[0]["score"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["detections.json"]  # no temp file left behind
    coco = load_coco_gt(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(str(path))
    assert len(dt.anns) == 3
    assert coco_evaluate(gt, str(path))["AP50"] == pytest.approx(1.0)


def test_gather_results_without_distributed_is_noop():
    res = [{"image_id": 1}]
    out = gather_results(res)
    assert out == res and out is not res


def test_gather_results_deduplicates_padded_images(monkeypatch):
    import torch.distributed as dist

    per_rank = [[{"image_id": 1, "score": 0.9}, {"image_id": 2, "score": 0.8}],
                [{"image_id": 3, "score": 0.7}, {"image_id": 1, "score": 0.9}]]  # image 1 padded onto rank 1
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    def fake_all_gather_object(out, obj):
        out[:] = per_rank

    monkeypatch.setattr(dist, "all_gather_object", fake_all_gather_object)
    merged = gather_results(per_rank[0])
    assert sorted(r["image_id"] for r in merged) == [1, 2, 3]


def test_dataset_targets_roundtrip_to_ap_one(tmp_path):
    """Data pipeline (resize) -> to_coco_results -> COCOeval on the original json gives AP 1."""
    from res_backbone.data import CocoDetection, build_eval_transforms, make_synthetic_coco

    p = make_synthetic_coco(tmp_path, num_train=0, num_val=12, image_size=80, num_classes=4)
    ds = CocoDetection(p["val_json"], p["val_images"], build_eval_transforms(111, (0.5,) * 3, (0.25,) * 3))
    targets = [ds[i][1] for i in range(len(ds))]
    outputs = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))} for t in targets]
    m = coco_evaluate(p["val_json"], to_coco_results(outputs, targets, ds.cat_ids), class_names=ds.class_names)
    assert m["AP"] == pytest.approx(1.0)
    assert list(m["per_class_AP"]) == ds.class_names
