"""The ILSVRC localization error on hand-made cases (errors in percent)."""
import pytest
import torch

from res_backbone.evaluation.localization import localization_errors

GT = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
GOOD = [10.0, 12.0, 50.0, 52.0]  # IoU 38*40 / (40*40 + 40*2) > 0.9
BAD = [60.0, 60.0, 90.0, 90.0]  # no overlap


def _run(classes, boxes, labels, gts, **kw):
    return localization_errors(torch.tensor(classes), torch.tensor(boxes), torch.tensor(labels), gts, **kw)


def test_right_class_right_box_is_correct():
    m = _run([[3, 1, 2, 4, 5]], [[GOOD] * 5], [3], [GT])
    assert m["top1_loc_err"] == 0.0 and m["top5_loc_err"] == 0.0 and m["top1_cls_err"] == 0.0
    assert m["mean_iou"] > 0.9 and m["gt_known_loc_err"] == 0.0 and m["num_images"] == 1


def test_right_class_wrong_box_is_an_error():
    m = _run([[3, 1, 2, 4, 5]], [[BAD] * 5], [3], [GT])
    assert m["top1_loc_err"] == 100.0 and m["top5_loc_err"] == 100.0
    assert m["top1_cls_err"] == 0.0  # the class alone was right
    assert m["mean_iou"] == 0.0 and m["gt_known_loc_err"] == 100.0


def test_wrong_class_right_box_is_an_error():
    m = _run([[7, 1, 2, 4, 5]], [[GOOD] * 5], [3], [GT])
    assert m["top1_loc_err"] == 100.0 and m["top5_loc_err"] == 100.0 and m["top1_cls_err"] == 100.0
    assert m["gt_known_loc_err"] == 0.0  # the box is fine once the class is given
    assert m["mean_iou"] > 0.9  # IoU of the top-1 box with the true class's box, whatever the predicted class


def test_top5_rescue_needs_the_right_class_and_its_own_box():
    # true class 3 is 4th; its own box is good -> top-5 correct, top-1 wrong
    m = _run([[7, 1, 2, 3, 5]], [[GOOD, GOOD, GOOD, GOOD, BAD]], [3], [GT])
    assert m["top1_loc_err"] == 100.0 and m["top5_loc_err"] == 0.0 and m["top5_cls_err"] == 0.0
    # the right class in the top 5, but the good box belongs to a wrong class -> still an error
    m = _run([[7, 1, 2, 3, 5]], [[GOOD, BAD, BAD, BAD, BAD]], [3], [GT])
    assert m["top5_loc_err"] == 100.0 and m["top5_cls_err"] == 0.0


def test_iou_threshold_is_inclusive_and_errors_average_over_images():
    half = [10.0, 10.0, 50.0, 30.0]  # IoU exactly 0.5 with GT
    m = _run([[1], [1], [2], [1]], [[half], [BAD], [GOOD], [GOOD]], [1, 1, 1, 1], [GT] * 4, k=(1,))
    assert m["top1_loc_err"] == pytest.approx(50.0)  # images 2 (box) and 3 (class) wrong
    assert m["top1_cls_err"] == pytest.approx(25.0)
    assert "top5_loc_err" not in m


def test_any_ground_truth_box_of_the_predicted_class_counts():
    gts = [torch.tensor([[60.0, 60.0, 90.0, 90.0], [10.0, 10.0, 50.0, 50.0]])]
    m = _run([[2]], [[GOOD]], [2], gts, k=(1,))
    assert m["top1_loc_err"] == 0.0
    # with per-box classes, the matching box belongs to class 4: a class-2 prediction there is wrong ...
    m = _run([[2]], [[GOOD]], [2], gts, k=(1,), gt_box_labels_list=[torch.tensor([2, 4])])
    assert m["top1_loc_err"] == 100.0 and m["top1_cls_err"] == 0.0
    # ... and a class-4 prediction is right by the box rule, though the image's label (2) was not predicted
    m = _run([[4]], [[GOOD]], [2], gts, k=(1,), gt_box_labels_list=[torch.tensor([2, 4])])
    assert m["top1_loc_err"] == 0.0 and m["top1_cls_err"] == 100.0


def test_gt_known_uses_the_true_class_box_when_given():
    m = _run([[7]], [[BAD]], [3], [GT], k=(1,), gt_known_boxes=torch.tensor([GOOD]))
    assert m["gt_known_loc_err"] == 0.0 and m["top1_loc_err"] == 100.0


def test_fewer_than_five_predictions_use_all():
    m = _run([[0, 1, 2]], [[BAD, BAD, GOOD]], [2], [GT])
    assert m["top1_loc_err"] == 100.0 and m["top5_loc_err"] == 0.0


@pytest.mark.parametrize("bad", [
    dict(classes=[[1]], boxes=[[GOOD, GOOD]]),  # T differs
    dict(classes=[[1]], boxes=[[GOOD]], gts=[]),  # no gt entry
    dict(classes=[[1]], boxes=[[GOOD]], gts=[torch.zeros(0, 4)]),  # an image without boxes
])
def test_bad_inputs_raise_clear_errors(bad):
    with pytest.raises(ValueError):
        _run(bad["classes"], bad["boxes"], [1], bad.get("gts", [GT]), k=(1,))
