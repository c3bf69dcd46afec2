"""The TIDE-style breakdown, the confusion matrix and the worst images on hand-built cases with known answers."""
import json

import numpy as np
import pytest

from res_backbone.evaluation.diagnostics import (
    ERROR_TYPES, box_iou_xywh, coco_diagnostics, write_diagnostics,
)

A, B, C = [10, 10, 40, 40], [100, 100, 30, 50], [60, 150, 20, 20]  # non-overlapping xywh boxes


def _gt(boxes, crowd=()):
    anns = [{"id": i + 1, "image_id": 1, "category_id": cat, "bbox": list(b), "area": b[2] * b[3], "iscrowd": 0}
            for i, (b, cat) in enumerate(boxes)]
    anns += [{"id": 100 + i, "image_id": 1, "category_id": cat, "bbox": list(b), "area": b[2] * b[3], "iscrowd": 1}
             for i, (b, cat) in enumerate(crowd)]
    return {"images": [{"id": 1, "file_name": "a.png", "width": 300, "height": 300},
                       {"id": 2, "file_name": "empty.png", "width": 300, "height": 300}],
            "categories": [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}], "annotations": anns}


def _det(box, cat, score, image_id=1):
    return {"image_id": image_id, "category_id": cat, "bbox": list(map(float, box)), "score": score}


def _shift(box, frac):  # IoU of a box shifted right by frac of its width: (1 - frac) / (1 + frac)
    return [box[0] + frac * box[2], box[1], box[2], box[3]]


# One error of one type, ranked above a true positive of the same class, so the AP50 is below 1.
CASES = {
    "loc": ([(A, 5), (B, 5)], [_det(_shift(A, 0.6), 5, 0.9), _det(B, 5, 0.8)]),           # IoU 0.25
    "dupe": ([(A, 5), (B, 5)], [_det(A, 5, 0.9), _det(_shift(A, 0.05), 5, 0.85), _det(B, 5, 0.8)]),
    "missed": ([(A, 5), (B, 5)], [_det(B, 5, 0.8)]),
    "cls": ([(A, 5), (B, 5)], [_det(A, 9, 0.9), _det(B, 5, 0.8)]),
    "bkg": ([(A, 5), (B, 5)], [_det(A, 5, 0.95), _det(C, 5, 0.9), _det(B, 5, 0.8)]),
    "both": ([(A, 5), (B, 5), (C, 9)], [_det(_shift(C, 0.6), 5, 0.95), _det(A, 5, 0.9), _det(B, 5, 0.8),
                                         _det(C, 9, 0.7)]),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_only_one_error_type_recovers_the_lost_ap(kind):
    boxes, dets = CASES[kind]
    tide = coco_diagnostics(_gt(boxes), dets)["tide"]
    assert tide["AP50"] < 0.9, "the case must lose AP"
    assert tide["AP50_fixed"][kind] == pytest.approx(1.0)
    assert tide["dAP50"][kind] == pytest.approx(1.0 - tide["AP50"])
    assert tide["counts"][kind] == 1 and tide["counts"]["other"] == 0
    for other in ERROR_TYPES:
        if other != kind:
            assert tide["dAP50"][other] == 0.0 and tide["counts"][other] == 0, other
    assert set(tide["how_computed"]) >= set(ERROR_TYPES) | {"method"}


def test_fix_of_an_already_matched_box_removes_the_detection():
    # the shifted A is a localisation error of A, which a better detection already found: fixed = removed
    tide = coco_diagnostics(_gt([(A, 5), (B, 5)]), [_det(A, 5, 0.95), _det(_shift(A, 0.6), 5, 0.9),
                                                     _det(B, 5, 0.8)])["tide"]
    assert tide["counts"]["loc"] == 1 and tide["AP50_fixed"]["loc"] == pytest.approx(1.0)


def test_confusion_matrix_counts_a_hand_case():
    gt = _gt([(A, 5), (B, 5), (C, 9)], crowd=[([200, 200, 80, 80], 9)])
    dets = [_det(A, 5, 0.9),                       # cat -> cat
            _det(_shift(B, 0.1), 9, 0.8),          # cat predicted as dog
            _det(_shift(B, 0.2), 5, 0.7),          # a second box on B: B is taken, so background -> cat
            _det([250, 10, 30, 30], 9, 0.6),       # background -> dog
            _det([210, 210, 20, 20], 9, 0.9),      # inside the crowd region: left out
            _det(C, 9, 0.3),                       # below the threshold: C (dog) is missed -> background
            _det(A, 9, 0.9, image_id=2)]           # an image without ground truth: background -> dog
    conf = coco_diagnostics(gt, dets, score_thresh=0.5)["confusion"]
    assert conf["classes"] == ["cat", "dog", "background"]
    assert conf["matrix"] == [[1, 1, 0],
                              [0, 0, 1],
                              [1, 2, 0]]


def test_worst_images_and_files(tmp_path):
    gt = _gt([(A, 5), (B, 5), (C, 9)])
    dets = [_det(A, 5, 0.9), _det(C, 5, 0.8), _det([250, 10, 30, 30], 9, 0.7), _det(A, 9, 0.9, image_id=2),
            _det(B, 5, 0.2)]  # B is found only below the threshold: missed at 0.5
    diag = coco_diagnostics(gt, dets, score_thresh=0.5)
    assert diag["worst"]["missed"] == [{"image_id": 1, "ground_truth": 3, "missed": 2, "false_positives": 2}]
    assert [r["image_id"] for r in diag["worst"]["false_positives"]] == [1, 2]
    assert diag["pr"]["precision"]["0.50"]["cat"][0] == pytest.approx(1.0) and len(diag["pr"]["recall"]) == 101
    paths = write_diagnostics(diag, tmp_path, extra={"rpn_recall": None})
    assert all(p.stat().st_size > 0 for p in paths)
    body = json.loads((tmp_path / "diagnostics.json").read_text())
    assert set(body["error_breakdown"]["dAP50"]) == set(ERROR_TYPES) and "rpn_recall" in body
    assert json.loads((tmp_path / "confusion.json").read_text())["matrix"][0][0] == 1


def test_box_iou_xywh():
    iou = box_iou_xywh([A, _shift(A, 0.5)], [A, [0, 0, 0, 0]])
    np.testing.assert_allclose(iou, [[1.0, 0.0], [1 / 3, 0.0]])
