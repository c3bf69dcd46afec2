"""The built-in Fashion-MNIST localization set and COCO json as single-object localization data."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from res_backbone.data.fashion_mnist import write_fake_fashion_mnist
from res_backbone.data.localization import (
    CocoLocalization, build_loc_eval_transforms, build_loc_train_transforms, collate_localization, largest_box_index,
)
from res_backbone.data.localization_fmnist import (
    iter_fmnist_localization, make_fmnist_localization, render_background, render_localization_image,
    write_fmnist_localization,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=40, n_test=20)


def test_same_seed_gives_byte_identical_images(fmnist):
    a = make_fmnist_localization("train", fmnist, num_images=6, canvas=48, scale=(20, 40), seed=3)
    b = make_fmnist_localization("train", fmnist, num_images=6, canvas=48, scale=(20, 40), seed=3)
    c = make_fmnist_localization("train", fmnist, num_images=6, canvas=48, scale=(20, 40), seed=4)
    assert a.images.dtype == np.uint8 and a.images.shape == (6, 48, 48, 3)
    assert a.images.tobytes() == b.images.tobytes() and np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.images, c.images)
    # image i does not depend on how many images are asked for
    d = make_fmnist_localization("train", fmnist, num_images=3, canvas=48, scale=(20, 40), seed=3)
    assert d.images.tobytes() == a.images[:3].tobytes()


def test_splits_draw_items_from_the_right_fashion_mnist_split(fmnist):
    tr = make_fmnist_localization("train", fmnist, num_images=40, canvas=32, scale=(20, 28))
    va = make_fmnist_localization("val", fmnist, num_images=10, canvas=32, scale=(20, 28))
    te = make_fmnist_localization("test", fmnist, num_images=10, canvas=32, scale=(20, 28))
    assert sorted(tr.item_indices.tolist()) == list(range(40))  # every train item once
    assert set(va.item_indices.tolist()) == set(range(0, 20, 2))  # test-split items, even ...
    assert set(te.item_indices.tolist()) == set(range(1, 20, 2))  # ... and odd: val and test never share one
    test_labels = np.arange(20) % 10  # write_fake_fashion_mnist's labels
    assert np.array_equal(va.labels, test_labels[va.item_indices])


def test_box_is_tight_around_the_pasted_pixels():
    rng_items = np.random.default_rng(0)
    for trial in range(8):
        item = (rng_items.random((28, 28)) * 255 * (rng_items.random((28, 28)) > 0.6)).astype(np.uint8)
        image, (x0, y0, x1, y1) = render_localization_image(np.random.default_rng(trial), item, canvas=64,
                                                            scale=(24, 56))
        bg, _ = render_background(np.random.default_rng(trial), 64)
        bg = np.clip(np.rint(bg), 0, 255).astype(np.uint8)
        changed = (image != bg).any(-1)
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        outside = changed.copy()
        outside[y0:y1, x0:x1] = False
        assert not outside.any(), "pixels outside the box changed"
        inside = changed[y0:y1, x0:x1]
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any(), \
            "the box is larger than what was pasted"


def test_box_is_the_item_extent_not_its_square():
    item = np.zeros((28, 28), np.uint8)
    item[10:18, 4:24] = 200  # a 20 x 8 bar inside the 28 x 28 frame
    _, (x0, y0, x1, y1) = render_localization_image(np.random.default_rng(1), item, canvas=96, scale=(56, 56),
                                                    aspect=0.0)
    w, h = x1 - x0, y1 - y0
    assert 38 <= w <= 42 and 14 <= h <= 18  # 2x the bar, give or take the resize's edge pixel


def test_rejects_bad_arguments(fmnist):
    with pytest.raises(ValueError, match="split"):
        next(iter_fmnist_localization("holdout", fmnist, num_images=1))
    with pytest.raises(ValueError, match="scale"):
        render_localization_image(np.random.default_rng(0), np.full((28, 28), 255, np.uint8), scale=(30, 10))
    with pytest.raises(ValueError, match="blank"):
        render_localization_image(np.random.default_rng(0), np.zeros((28, 28), np.uint8))


def test_written_set_is_coco_and_reused(fmnist, tmp_path):
    out = tmp_path / "loc"
    paths = write_fmnist_localization(out, root=fmnist, num_train=12, num_val=5, canvas=40, scale=(20, 36), seed=1)
    data = json.loads(open(paths["train_json"]).read())
    assert [c["id"] for c in data["categories"]] == list(range(1, 11))
    assert len(data["images"]) == 12 and len(data["annotations"]) == 12
    mem = make_fmnist_localization("train", fmnist, num_images=12, canvas=40, scale=(20, 36), seed=1)
    first = np.asarray(Image.open(out / "train" / data["images"][0]["file_name"]))
    assert np.array_equal(first, mem.images[0])  # PNG is lossless: the files are the rendered arrays
    x, y, w, h = data["annotations"][0]["bbox"]
    assert [x, y, x + w, y + h] == mem.boxes[0].tolist()
    assert data["annotations"][0]["category_id"] == mem.labels[0] + 1
    stamp = (out / "train" / "000001.png").stat().st_mtime_ns
    write_fmnist_localization(out, root=fmnist, num_train=12, num_val=5, canvas=40, scale=(20, 36), seed=1)
    assert (out / "train" / "000001.png").stat().st_mtime_ns == stamp  # same arguments: not rendered again
    ds = CocoLocalization(paths["val_json"], paths["val_images"], build_loc_eval_transforms(40, MEAN, STD))
    image, target = ds[0]
    assert image.shape == (3, 40, 40) and ds.num_classes == 10 and ds.skipped_empty == 0
    assert torch.all((target["box"] >= 0) & (target["box"] <= 1))


# ---------------------------------------------------------------------------------------------- COCO json
def _coco(tmp_path):
    """Three categories with ids 5, 9, 42; images: 1 (a crowd box larger than the rest), 2 (no annotations),
    3 (only a crowd box), 4 (two boxes of different classes), 5 (a degenerate box and a normal one)."""
    folder = tmp_path / "images"
    folder.mkdir()
    images = []
    for i in range(1, 6):
        Image.fromarray(np.full((50, 100, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 100, "height": 50})
    anns = [
        {"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 90, 45], "iscrowd": 1},
        {"id": 2, "image_id": 1, "category_id": 42, "bbox": [10, 10, 20, 10], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 5, "bbox": [50, 5, 30, 30], "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 5, "bbox": [1, 1, 20, 20], "iscrowd": 1},
        {"id": 5, "image_id": 4, "category_id": 42, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        {"id": 6, "image_id": 4, "category_id": 9, "bbox": [20, 10, 40, 30], "iscrowd": 0},
        {"id": 7, "image_id": 5, "category_id": 9, "bbox": [5, 5, 0, 10], "iscrowd": 0},
        {"id": 8, "image_id": 5, "category_id": 42, "bbox": [60, 20, 40, 30], "iscrowd": 0},
    ]
    cats = [{"id": c, "name": n} for c, n in ((42, "ring"), (5, "cat"), (9, "dog"))]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, folder


def test_coco_largest_non_crowd_box_is_the_target(tmp_path):
    ann, folder = _coco(tmp_path)
    ds = CocoLocalization(ann, folder)
    assert ds.cat_ids == [5, 9, 42] and ds.class_names == ["cat", "dog", "ring"]  # sorted ids -> labels 0, 1, 2
    assert ds.ids == [1, 4, 5] and ds.skipped_empty == 2  # image 2 (nothing) and 3 (crowd only) skipped
    label, boxes, labels = ds.ground_truth(0)
    assert label == 0 and boxes.tolist() == [[50, 5, 80, 35]]  # the crowd box is larger but never the target
    assert ds.ground_truth(1)[0] == 1 and ds.ground_truth(2)[0] == 2  # the degenerate box of image 5 is dropped
    assert ds.labels() == [0, 1, 2]
    image, target = ds[0]  # no transforms: original size, [0, 1]
    assert image.shape == (3, 50, 100) and target["image_id"] == 1 and target["orig_size"] == (50, 100)
    assert torch.allclose(target["box"], torch.tensor([0.5, 0.1, 0.8, 0.7]))


def test_coco_all_boxes_keeps_every_box_with_the_largest_first(tmp_path):
    ann, folder = _coco(tmp_path)
    ds = CocoLocalization(ann, folder, build_loc_eval_transforms(64, MEAN, STD), all_boxes=True)
    _, target = ds[0]
    assert target["label"] == 0 and target["gt_labels"].tolist() == [0, 2]
    assert torch.allclose(target["gt_boxes"], torch.tensor([[0.5, 0.1, 0.8, 0.7], [0.1, 0.2, 0.3, 0.4]]), atol=1e-6)
    assert torch.equal(target["box"], target["gt_boxes"][0])
    _, target = ds[1]
    assert target["gt_labels"].tolist() == [1, 2]


def test_flip_moves_every_box_and_keeps_the_target_first(tmp_path):
    ann, folder = _coco(tmp_path)
    ds = CocoLocalization(ann, folder, build_loc_train_transforms(64, MEAN, STD, hflip=1.0, photometric=False),
                          all_boxes=True)
    image, target = ds[0]
    assert image.shape == (3, 64, 64)
    assert torch.allclose(target["gt_boxes"], torch.tensor([[0.2, 0.1, 0.5, 0.7], [0.7, 0.2, 0.9, 0.4]]), atol=1e-5)
    images, sizes, targets = collate_localization([ds[0], ds[1]])
    assert images.shape == (2, 3, 64, 64) and sizes == [(64, 64)] * 2 and len(targets) == 2


def test_largest_box_index_takes_the_first_on_ties():
    assert largest_box_index(np.array([[0, 0, 2, 2], [5, 5, 7, 7], [0, 0, 1, 1]])) == 0
    with pytest.raises(ValueError):
        largest_box_index(np.zeros((0, 4)))


def test_transforms_warp_flip_and_reseed():
    image = np.zeros((20, 40, 3), np.uint8)
    image[5:10, 0:10] = 255
    tf = build_loc_train_transforms(16, MEAN, STD, hflip=1.0, photometric=True, seed=0)
    out = tf(image=image, bboxes=np.array([[0, 5, 10, 10]], np.float32), labels=[0])
    assert out["image"].shape == (3, 16, 16) and out["image"].dtype == torch.float32
    assert np.allclose(out["bboxes"], [[12, 4, 16, 8]])  # warped by (0.4, 0.8), then mirrored
    tf.set_random_seed(7)
    first = tf(image=image, bboxes=np.zeros((0, 4)), labels=[])["image"]
    tf.set_random_seed(7)
    assert torch.equal(first, tf(image=image, bboxes=np.zeros((0, 4)), labels=[])["image"])
    ev = build_loc_eval_transforms(16, MEAN, STD)(image=np.full((16, 16, 3), 128, np.uint8), bboxes=[], labels=[])
    assert torch.allclose(ev["image"], torch.full((3, 16, 16), (128 / 255 - 0.5) / 0.25))
