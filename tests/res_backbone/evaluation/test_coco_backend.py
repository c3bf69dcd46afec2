"""``coco_evaluate(..., backend="faster")`` (faster-coco-eval) gives pycocotools' numbers."""
import importlib.util
import sys

import pytest

from res_backbone.evaluation.coco import STAT_NAMES, CocoBackendMissing, coco_evaluate, require_backend
from studies.bench_coco_eval import CATEGORY_IDS, compare, synthetic_eval_set

needs_faster = pytest.mark.skipif(importlib.util.find_spec("faster_coco_eval") is None,
                                  reason="faster-coco-eval not installed (pip install 'res-backbone[eval]')")


def _same(gt, dets, **kw):
    ref = coco_evaluate(gt, dets, backend="pycocotools", **kw)
    fast = coco_evaluate(gt, dets, backend="faster", **kw)
    assert ref["coco_backend"] == "pycocotools" and fast["coco_backend"] == "faster"
    assert compare(ref, fast) <= 1e-6, {k: (ref[k], fast[k]) for k in STAT_NAMES}
    return ref


@needs_faster
def test_generated_set_gives_the_same_twelve_stats():
    gt, dets = synthetic_eval_set(80, seed=3)
    # the set has what the test claims: crowd, images without ground truth or detections, sparse ids
    assert any(a["iscrowd"] for a in gt["annotations"]) and list(CATEGORY_IDS) != list(range(1, 9))
    with_gt = {a["image_id"] for a in gt["annotations"]}
    with_dets = {d["image_id"] for d in dets}
    assert len(gt["images"]) > len(with_gt) and len(gt["images"]) > len(with_dets) and with_dets - with_gt
    ref = _same(gt, dets)
    assert 0.0 < ref["AP"] < 1.0 and all(ref[k] != -1.0 for k in STAT_NAMES)


@needs_faster
def test_edge_cases_agree():
    gt, dets = synthetic_eval_set(20, seed=1)
    # a category with detections but no ground truth (-1 in both), a subset of images, no detections at all
    gt["categories"].append({"id": 99, "name": "unseen"})
    dets.append({"image_id": 1, "category_id": 99, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.9})
    assert _same(gt, dets)["per_class_AP"]["unseen"] == -1.0
    _same(gt, dets, img_ids=[2, 3, 10, 11])
    assert _same(gt, [])["AP"] == 0.0


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import fails as if not installed
    with pytest.raises(CocoBackendMissing, match=r"res-backbone\[eval\]"):
        coco_evaluate({"images": [], "annotations": [], "categories": []}, [], backend="faster")
    with pytest.raises(ValueError, match="pycocotools, faster"):
        require_backend("detectron")
