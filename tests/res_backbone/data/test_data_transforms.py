import numpy as np
import pytest
import torch

from res_backbone.data import build_eval_transforms, build_train_transforms
from res_backbone.data.transforms import bboxes_to_tensor, labels_to_tensor

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image(h=100, w=200):
    return np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_eval_resize_scales_boxes():
    tf = build_eval_transforms(100, MEAN, STD)
    out = tf(image=_image(), bboxes=np.array([[10.0, 20, 50, 60], [0, 0, 200, 100]]), labels=[3, 1])
    assert tuple(out["image"].shape) == (3, 50, 100) and out["image"].dtype == torch.float32
    torch.testing.assert_close(bboxes_to_tensor(out["bboxes"]), torch.tensor([[5.0, 10, 25, 30], [0, 0, 100, 50]]))
    labels = labels_to_tensor(out["labels"])
    assert labels.dtype == torch.int64 and labels.tolist() == [3, 1]


def test_eval_upscales_too():
    out = build_eval_transforms(400, MEAN, STD)(image=_image(), bboxes=np.zeros((0, 4)), labels=[])
    assert tuple(out["image"].shape) == (3, 200, 400)
    assert bboxes_to_tensor(out["bboxes"]).shape == (0, 4) and labels_to_tensor(out["labels"]).shape == (0,)


def test_normalisation_uses_given_stats():
    img = np.full((10, 10, 3), 255, np.uint8)
    out = build_eval_transforms(10, MEAN, STD)(image=img, bboxes=np.zeros((0, 4)), labels=[])
    torch.testing.assert_close(out["image"], torch.full((3, 10, 10), 2.0))


def test_hflip_maps_x():
    tf = build_train_transforms(200, MEAN, STD, scale_jitter=None, hflip=1.0, photometric=False)
    out = tf(image=_image(), bboxes=np.array([[10.0, 20, 50, 60]]), labels=[7])
    # w = 200 unchanged; x' = w - x
    torch.testing.assert_close(bboxes_to_tensor(out["bboxes"]), torch.tensor([[150.0, 20, 190, 60]]), atol=1e-3, rtol=0)
    assert labels_to_tensor(out["labels"]).tolist() == [7]


def test_train_scale_jitter_box_consistent():
    tf = build_train_transforms(100, MEAN, STD, scale_jitter=(0.8, 1.2), hflip=0.0, seed=3)
    sizes = set()
    for _ in range(20):
        out = tf(image=_image(), bboxes=np.array([[20.0, 10, 100, 90]]), labels=[2])
        h, w = out["image"].shape[1:]
        sizes.add(w)
        assert 80 <= w <= 120 and abs(h - w / 2) <= 1
        s = w / 200
        torch.testing.assert_close(bboxes_to_tensor(out["bboxes"]), torch.tensor([[20 * s, 10 * s, 100 * s, 90 * s]]),
                                   atol=0.6, rtol=0)
        assert labels_to_tensor(out["labels"]).dtype == torch.int64
    assert len(sizes) > 3


def test_train_seed_reproducible():
    a = build_train_transforms(100, MEAN, STD, seed=1)(image=_image(), bboxes=np.array([[1.0, 2, 30, 40]]), labels=[1])
    b = build_train_transforms(100, MEAN, STD, seed=1)(image=_image(), bboxes=np.array([[1.0, 2, 30, 40]]), labels=[1])
    torch.testing.assert_close(a["image"], b["image"])


def test_labels_float_pitfall():
    assert labels_to_tensor([3.0, 2.9999999]).tolist() == [3, 3]
    assert labels_to_tensor([]).dtype == torch.int64


def test_bad_stats_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_eval_transforms(100, (123.7, 116.3, 103.5), (58.4, 57.1, 57.4))
