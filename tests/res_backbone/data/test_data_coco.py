"""CocoDetection on a hand-written json: ids, crowd, empty images, degenerate boxes, odd image modes, errors."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from res_backbone.data import CocoDetection, CocoFormatError, ImageDecodeError, build_eval_transforms, safe_join

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _write_images(root):
    root.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (200, 10, 10)
    Image.fromarray(rgb).save(root / "rgb.png")
    Image.fromarray(np.full((50, 40), 128, np.uint8), mode="L").save(root / "gray.png")
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 250, 7
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")
    Image.fromarray(np.full((20, 25), 65535, np.uint16)).save(root / "gray16.png")
    (root / "sub").mkdir(exist_ok=True)
    Image.fromarray(rgb).save(root / "sub" / "empty.png")


def _dataset_json():
    return {
        "images": [
            {"id": 10, "file_name": "rgb.png", "width": 60, "height": 40},
            {"id": 5, "file_name": "gray.png", "width": 40, "height": 50},
            {"id": 7, "file_name": "rgba.png", "width": 30, "height": 30},
            {"id": 8, "file_name": "gray16.png", "width": 25, "height": 20},
            {"id": 20, "file_name": "sub/../sub/empty.png", "width": 60, "height": 40},
        ],
        "categories": [{"id": 90, "name": "zebra"}, {"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [10, 5, 20, 10], "iscrowd": 0, "area": 200},
            {"id": 2, "image_id": 10, "category_id": 90, "bbox": [0, 0, 60, 40], "iscrowd": 1, "area": 2400},
            {"id": 3, "image_id": 10, "category_id": 17, "bbox": [50, 30, 20, 20], "iscrowd": 0, "area": 400},  # clipped
            {"id": 4, "image_id": 5, "category_id": 90, "bbox": [1, 1, 0, 5], "iscrowd": 0, "area": 0},  # w = 0
            {"id": 5, "image_id": 5, "category_id": 17, "bbox": [2, 3, 4, 5]},  # no iscrowd key -> 0
            {"id": 6, "image_id": 7, "category_id": 3, "bbox": [100, 100, 5, 5], "iscrowd": 0},  # outside
            {"id": 7, "image_id": 7, "category_id": 3, "bbox": [1, 1, -3, 4], "iscrowd": 0},  # negative w
            {"id": 8, "image_id": 8, "category_id": 90, "bbox": [0, 0, float("nan"), 4], "iscrowd": 0},
            {"id": 9, "image_id": 8, "category_id": 90, "bbox": [3, 4, 5, 6], "iscrowd": 0},
        ],
    }


@pytest.fixture
def coco_files(tmp_path):
    root = tmp_path / "images"
    _write_images(root)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_dataset_json()))
    return ann, root


def _write_json(tmp_path, data):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    return p


def test_label_mapping_non_contiguous(coco_files):
    ds = CocoDetection(*coco_files)
    assert ds.cat_ids == [3, 17, 90]
    assert ds.class_names == ["cat", "dog", "zebra"]
    assert ds.cat_id_to_label == {3: 1, 17: 2, 90: 3}
    assert ds.num_classes == 3
    for label in range(1, 4):  # round trip labels -> category ids
        assert ds.cat_id_to_label[ds.label_to_cat_id[label]] == label
        assert ds.cat_ids[label - 1] == ds.label_to_cat_id[label]
    assert ds.ids == [5, 7, 8, 10, 20]  # sorted by image id, empty images kept


def test_targets_crowd_degenerate_clipped(coco_files, caplog):
    with caplog.at_level(logging.INFO, logger="res_backbone.data.coco"):
        ds = CocoDetection(*coco_files)
    assert ds.stats == {"images": 5, "annotations": 9, "crowd": 1, "boxes": 4, "clipped": 1, "dropped_nonfinite": 1,
                        "dropped_nonpositive": 2, "dropped_outside": 1, "empty_images": 2,
                        "filtered_empty_images": 0}
    msgs = [r.getMessage() for r in caplog.records if r.name == "res_backbone.data.coco"]
    assert len(msgs) == 1 and str(coco_files[0]) in msgs[0]

    img, tgt = ds[ds.ids.index(10)]
    assert set(tgt) == {"boxes", "labels", "image_id", "orig_size", "size", "scale"}
    assert tgt["image_id"] == 10 and tgt["orig_size"] == (40, 60) and tgt["size"] == (40, 60) and tgt["scale"] == 1.0
    assert tgt["boxes"].dtype == torch.float32 and tgt["labels"].dtype == torch.int64
    torch.testing.assert_close(tgt["boxes"], torch.tensor([[10.0, 5, 30, 15], [50, 30, 60, 40]]))  # crowd excluded
    assert tgt["labels"].tolist() == [1, 2]
    assert img.shape == (3, 40, 60) and img.dtype == torch.float32

    _, tgt7 = ds[ds.ids.index(7)]  # only outside + negative: a negative image
    assert tgt7["boxes"].shape == (0, 4) and tgt7["labels"].shape == (0,)
    _, tgt8 = ds[ds.ids.index(8)]
    assert tgt8["labels"].tolist() == [3]


def test_filter_empty(coco_files):
    ds = CocoDetection(*coco_files, filter_empty=True)
    assert ds.ids == [5, 8, 10]
    assert ds.stats["filtered_empty_images"] == 2


def test_image_modes_to_rgb_uint8(coco_files):
    ds = CocoDetection(*coco_files)
    for img_id, expect in ((5, (128, 128, 128)), (7, (0, 250, 0)), (8, (255, 255, 255))):
        arr = ds.load_image(ds.ids.index(img_id))
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
        assert tuple(arr[0, 0]) == expect


def test_transforms_and_scale(coco_files):
    ds = CocoDetection(*coco_files, build_eval_transforms(120, MEAN, STD))
    img, tgt = ds[ds.ids.index(10)]
    assert img.shape == (3, 80, 120) and tgt["size"] == (80, 120) and tgt["scale"] == pytest.approx(2.0)
    torch.testing.assert_close(tgt["boxes"], torch.tensor([[20.0, 10, 60, 30], [100, 60, 120, 80]]))
    assert tgt["labels"].dtype == torch.int64 and tgt["labels"].tolist() == [1, 2]
    # normalised: the red half of the image has channel 0 = (200/255 - mean) / std
    assert img[0, 0, 0].item() == pytest.approx((200 / 255 - MEAN[0]) / STD[0], abs=1e-4)
    _, empty = ds[ds.ids.index(7)]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64


def test_aspect_ratios_from_json(coco_files):
    ds = CocoDetection(*coco_files)
    assert ds.aspect_ratios() == [40 / 50, 1.0, 25 / 20, 60 / 40, 60 / 40]


def test_id_keyed_accessors(coco_files):
    ann, root = coco_files
    ds = CocoDetection(ann, root)
    assert ds.image_ids == ds.ids
    assert ds.image_path(20) == root / "sub" / "empty.png"
    raw = ds.original_annotations(10)
    assert [a["id"] for a in raw] == [1, 2, 3] and raw[1]["iscrowd"] == 1  # as stored, crowd included
    with pytest.raises(KeyError, match="image id 99"):
        ds.image_path(99)


def test_class_names_override(coco_files):
    ds = CocoDetection(*coco_files, class_names=["a", "b", "c"])
    assert ds.class_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="class_names has 2 names"):
        CocoDetection(*coco_files, class_names=["a", "b"])


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("annotations"), "missing required key 'annotations'"),
    (lambda d: d.pop("categories"), "missing required key 'categories'"),
    (lambda d: d.update(images={}), "'images' must be a list"),
    (lambda d: d["images"][0].pop("width"), r"images\[0\]: missing key 'width'"),
    (lambda d: d["annotations"][0].update(image_id=999), "unknown image_id 999"),
    (lambda d: d["annotations"][0].update(category_id=4), "unknown category_id 4"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"'bbox' must be \[x, y, w, h\]"),
    (lambda d: d["annotations"][1].update(id=1), "duplicate annotation id 1"),
    (lambda d: d["images"][0].update(file_name="../../outside.png"), "escapes the image root"),
    (lambda d: d["images"][0].update(file_name="/etc/passwd"), "absolute path"),
])
def test_malformed_json_errors(tmp_path, mutate, match):
    data = _dataset_json()
    mutate(data)
    p = _write_json(tmp_path, data)
    with pytest.raises(CocoFormatError, match=match) as e:
        CocoDetection(p, tmp_path)
    assert str(p) in str(e.value)


def test_not_json_and_not_object(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(CocoFormatError, match="not valid JSON"):
        CocoDetection(p, tmp_path)
    p.write_text("[]")
    with pytest.raises(CocoFormatError, match="top level must be a JSON object"):
        CocoDetection(p, tmp_path)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


def test_missing_and_broken_image(coco_files):
    ann, root = coco_files
    (root / "gray.png").unlink()
    (root / "rgba.png").write_bytes(b"not a png at all")
    ds = CocoDetection(ann, root)
    with pytest.raises(FileNotFoundError, match=r"gray\.png.*image id 5"):
        ds[ds.ids.index(5)]
    with pytest.raises(ImageDecodeError, match=r"rgba\.png.*image id 7"):
        ds[ds.ids.index(7)]
    problems = ds.check_images(raise_on_error=False)
    assert [(i, why) for i, _, why in problems][0] == (5, "missing")
    assert [i for i, _, _ in problems] == [5, 7]
    with pytest.raises(RuntimeError, match="2 bad image file"):
        ds.check_images()
    assert len(ds.check_images(decode=True, raise_on_error=False)) == 2


def test_size_mismatch_is_an_error(coco_files, tmp_path):
    ann, root = coco_files
    data = _dataset_json()
    data["images"][0]["width"] = 61
    p = _write_json(tmp_path, data)
    ds = CocoDetection(p, root)
    with pytest.raises(ValueError, match=r"decodes to 60x40.*61x40"):
        ds[ds.ids.index(10)]
    assert ds.check_images(raise_on_error=False)[0][0] == 10


def test_safe_join(tmp_path):
    assert safe_join(tmp_path, "a/b.png") == tmp_path / "a" / "b.png"
    assert safe_join(tmp_path, "a/../b.png") == tmp_path / "b.png"
    for bad in ("../../outside.png", "a/../../x.png", "/abs.png", "C:\\x.png", ""):
        with pytest.raises(ValueError):
            safe_join(tmp_path, bad)


def test_decoded_image_cache_within_its_budget(coco_files):
    ann, root = coco_files
    plain = CocoDetection(ann, root)
    ds = CocoDetection(ann, root, cache_mb=15000 / 2**20)  # bytes: gray 6000, rgba 2700, gray16 1500, rgb 7200
    first = [ds.load_image(i) for i in range(len(ds))]
    assert sorted(ds._cache) == [5, 7, 8] and ds._cached_bytes == 10200  # the first ones that fit
    fresh = {img_id: plain.load_image(i) for i, img_id in enumerate(plain.ids)}
    assert all(np.array_equal(a, fresh[img_id]) for a, img_id in zip(first, ds.ids))
    first[0][:] = 0  # what a caller gets is its own copy
    for p in root.rglob("*.png"):
        p.unlink()
    for i, img_id in enumerate(ds.ids):
        if img_id in (5, 7, 8):  # served from memory, equal to a fresh decode, files gone
            assert np.array_equal(ds.load_image(i), fresh[img_id])
        else:
            with pytest.raises(FileNotFoundError, match="image file not found"):
                ds.load_image(i)
    with pytest.raises(ValueError, match="cache_mb"):
        CocoDetection(ann, root, cache_mb=-1)
