"""The composed multi-object detection set of Fashion-MNIST test-split items (res_backbone.data.detection_fmnist)."""
import json
from itertools import combinations

import numpy as np
import pytest

from res_backbone.data.detection_fmnist import (
    detection_item_pools, iter_fmnist_detection, render_detection_image, write_fmnist_detection,
)
from res_backbone.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, write_fake_fashion_mnist
from res_backbone.data.localization_fmnist import render_background

RENDER = dict(canvas=64, scale=(18.0, 30.0), max_items=4, seed=3)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=20, n_test=40)


@pytest.fixture(scope="module")
def test_items(fmnist):
    return tuple(t.numpy() for t in load_fashion_mnist("test", fmnist))


def _render(items, split, n, **kw):
    return list(iter_fmnist_detection(split, items, num_images=n, **{**RENDER, **kw}))


def test_same_seed_same_bytes_and_image_i_independent_of_count(test_items):
    a, b = _render(test_items, "train", 6), _render(test_items, "train", 6)
    c = _render(test_items, "train", 6, seed=4)
    assert all(x[0].tobytes() == y[0].tobytes() and x[1:] == y[1:] for x, y in zip(a, b))
    assert any(x[0].tobytes() != y[0].tobytes() for x, y in zip(a, c))
    d = _render(test_items, "train", 3)
    assert all(x[0].tobytes() == y[0].tobytes() for x, y in zip(a, d))
    assert a[0][0].dtype == np.uint8 and a[0][0].shape == (64, 64, 3)


def test_train_and_val_use_disjoint_test_split_items(test_items):
    pools = detection_item_pools(40, seed=3)
    assert set(pools["train"]).isdisjoint(pools["val"]) and len(pools["train"]) + len(pools["val"]) == 40
    assert len(pools["val"]) == 8  # val_fraction 0.2
    used = {split: {i for _, _, _, idx in _render(test_items, split, 30) for i in idx} for split in ("train", "val")}
    assert used["train"] <= set(pools["train"].tolist()) and used["val"] <= set(pools["val"].tolist())
    assert used["train"] and used["val"] and used["train"].isdisjoint(used["val"])
    labels = test_items[1]
    for _, _, lbl, idx in _render(test_items, "val", 10):  # labels are the test split's labels of those items
        assert lbl == [int(labels[i]) for i in idx]
    with pytest.raises(ValueError, match="val_fraction"):
        detection_item_pools(10, val_fraction=1.0)


def test_boxes_inside_the_canvas_tight_and_with_bounded_overlap(test_items):
    counts = []
    for image, boxes, labels, idx in _render(test_items, "train", 20):
        counts.append(len(boxes))
        assert 1 <= len(boxes) <= 4 and len(boxes) == len(labels) == len(idx) == len(set(idx))
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        for (a0, b0, a1, b1), (c0, d0, c1, d1) in combinations(boxes, 2):
            iw, ih = min(a1, c1) - max(a0, c0), min(b1, d1) - max(b0, d0)
            inter = max(0, iw) * max(0, ih)
            assert inter <= 0.1 * min((a1 - a0) * (b1 - b0), (c1 - c0) * (d1 - d0)) + 1e-9
    assert len(set(counts)) > 1  # the item count varies


def test_pixels_change_only_inside_the_boxes():
    rng_items = np.random.default_rng(0)
    items = [(rng_items.random((28, 28)) * 255 * (rng_items.random((28, 28)) > 0.5)).astype(np.uint8) for _ in range(3)]
    image, boxes, kept = render_detection_image(np.random.default_rng(5), items, canvas=96, scale=(24, 40))
    bg, _ = render_background(np.random.default_rng(5), 96)
    changed = (image != np.clip(np.rint(bg), 0, 255).astype(np.uint8)).any(-1)
    inside = np.zeros_like(changed)
    for x0, y0, x1, y1 in boxes:
        inside[y0:y1, x0:x1] = True
        assert changed[y0:y1, x0:x1].any()
    assert not (changed & ~inside).any() and kept == sorted(kept)


def test_written_coco_json_and_cache(fmnist, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "det"
    paths = write_fmnist_detection(out, root=fmnist, num_train=12, num_val=5, **RENDER)
    coco = COCO(paths["train_json"])
    cats = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in cats] == list(range(1, 11)) and [c["name"] for c in cats] == list(FASHION_MNIST_CLASSES)
    assert len(coco.getImgIds()) == 12
    for img in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert len(anns) == len(img["fmnist_indices"]) >= 1
        for a in anns:
            x, y, w, h = a["bbox"]
            assert 1 <= a["category_id"] <= 10 and x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
    val = json.loads(open(paths["val_json"]).read())
    train_items = {i for im in coco.loadImgs(coco.getImgIds()) for i in im["fmnist_indices"]}
    assert train_items.isdisjoint({i for im in val["images"] for i in im["fmnist_indices"]})
    # same arguments: reused (nothing rewritten); other arguments: rendered again
    stamp = (out / "train" / "000001.png").stat().st_mtime_ns
    assert write_fmnist_detection(out, root=fmnist, num_train=12, num_val=5, **RENDER) == paths
    assert (out / "train" / "000001.png").stat().st_mtime_ns == stamp
    write_fmnist_detection(out, root=fmnist, num_train=12, num_val=5, **{**RENDER, "seed": 9})
    assert json.loads((out / "fmnist_det_meta.json").read_text())["seed"] == 9


@pytest.mark.parametrize("dark_prob,dark", [(1.0, True), (0.0, False)])
def test_dark_prob_sets_the_polarity(dark_prob, dark):
    item = np.zeros((28, 28), np.uint8)
    item[6:22, 6:22] = 255
    for seed in range(4):
        image, boxes, _ = render_detection_image(np.random.default_rng(seed), [item], canvas=64, scale=(20, 24),
                                                 dark_prob=dark_prob)
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        x0, y0, x1, y1 = boxes[0]
        inside, outside = luma[y0 + 3:y1 - 3, x0 + 3:x1 - 3].mean(), luma[:, :].copy()
        outside[y0:y1, x0:x1] = np.nan
        background = np.nanmean(outside)
        assert (background < 120) == dark and (inside > background) == dark  # bright items on dark, or the reverse
