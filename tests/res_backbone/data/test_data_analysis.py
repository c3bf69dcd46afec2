"""Dataset statistics (res_backbone/data/analysis.py) on a hand-built json whose answers are known."""
import json

import numpy as np
import pytest
from PIL import Image

from res_backbone.data import CocoDetection
from res_backbone.data.analysis import (
    box_statistics, collect_boxes, data_advice, size_bucket, suggest_image_size, summary_lines, training_scale,
)


def write_set(root, images, annotations, categories, sizes_on_disk=None):
    """A COCO json plus one PNG per image (``sizes_on_disk[id]`` overrides the file's size)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for im in images:
        w, h = (sizes_on_disk or {}).get(im["id"], (im["width"], im["height"]))
        Image.new("RGB", (w, h)).save(root / "img" / im["file_name"])
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, root / "img"


def ann(i, image_id, cat, bbox, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0, **kw}


@pytest.fixture
def hand_built(tmp_path):
    images = [{"id": 10, "file_name": "a.png", "width": 200, "height": 100},   # scale 2 at 400
              {"id": 11, "file_name": "b.png", "width": 100, "height": 100},   # scale 4 at 400
              {"id": 12, "file_name": "c.png", "width": 50, "height": 80}]     # empty; 60x80 on disk
    anns = [ann(1, 10, 5, [0, 0, 10, 20]),          # at the border; 10x20 -> 20x40 at 400 (sqrt 28.3, small)
            ann(2, 10, 5, [0, 0, 10, 20]),          # exact duplicate of 1
            ann(3, 10, 9, [50, 40, 30, 30]),        # 60x60 at 400: medium; not at the border
            ann(4, 11, 5, [20, 20, 30, 30]),        # 120x120 at 400: large
            ann(5, 11, 5, [21, 20, 30, 30]),        # near duplicate of 4 (IoU 29/31)
            ann(6, 11, 9, [40, 40, 5, 5], iscrowd=1)]  # crowd: not a training box
    cats = [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 20, "name": "bird"}]
    return write_set(tmp_path, images, anns, cats, sizes_on_disk={12: (60, 80)})


def test_statistics_of_a_hand_built_set(hand_built):
    ds = CocoDetection(*hand_built)
    table = collect_boxes(ds)
    s = box_statistics(ds, table, 400, border_px=2)
    assert (s["num_images"], s["num_boxes"], s["empty_images"]) == (3, 5, 1)
    by_name = {c["name"]: c for c in s["classes"]}
    assert (by_name["cat"]["images"], by_name["cat"]["boxes"]) == (2, 4)
    assert (by_name["dog"]["images"], by_name["dog"]["boxes"]) == (1, 1)
    assert (by_name["bird"]["images"], by_name["bird"]["boxes"]) == (0, 0)
    assert s["reader"]["crowd"] == 1
    assert s["boxes_per_image"]["max"] == 3 and s["boxes_per_image"]["min"] == 0
    assert s["sizes_train"]["buckets"] == {"small": 2, "medium": 1, "large": 2}
    assert s["sizes_original"]["coco_buckets"] == {"small": 5, "medium": 0, "large": 0}
    assert s["sizes_train"]["sqrt_area_px"]["min"] == pytest.approx(np.sqrt(20 * 40), abs=1e-3)
    assert sum(s["sizes_train"]["histogram"]["counts"]) == 5
    assert s["at_border"]["boxes"] == 2  # boxes 1 and 2 touch x = 0
    assert (s["duplicates"]["exact_pairs"], s["duplicates"]["near_pairs"]) == (1, 1)
    assert s["files"]["num_size_mismatch"] == 1 and s["files"]["size_mismatch"][0]["image_id"] == 12
    assert s["files"]["size_mismatch"][0]["file_wh"] == [60, 80]
    assert s["aspect_ratio_h_over_w"]["max"] == pytest.approx(2.0)
    text = "\n".join(summary_lines(s) + data_advice(s))
    assert "1 with another size" in text and "duplicated" in text and "--filter-empty" in text
    json.dumps(s)  # analysis.json is plain json


def test_missing_files_are_listed_not_fatal(hand_built):
    path, root = hand_built
    (root / "b.png").unlink()
    ds = CocoDetection(path, root)
    s = box_statistics(ds, collect_boxes(ds), 400)
    assert s["files"]["num_unreadable"] == 1 and s["files"]["unreadable"][0]["image_id"] == 11


def test_training_scale_and_buckets():
    assert training_scale(np.array([200, 100]), np.array([100, 400]), 400).tolist() == [2.0, 1.0]
    assert size_bucket(np.array([31.9 ** 2, 32 ** 2, 95 ** 2, 96 ** 2])).tolist() == [0, 1, 1, 2]


def test_suggested_image_size_upscales_small_objects_only(hand_built):
    ds = CocoDetection(*hand_built)
    table = collect_boxes(ds)
    size, why = suggest_image_size(table, small_px=16, quantile=0.0)
    # the smallest box is sqrt(200) = 14.1 px in a 200 px image: 16 px needs 226 -> 256 (multiple of 32)
    assert size == 256 and "brings" in why
    assert suggest_image_size(table, small_px=1, quantile=0.0)[0] == 128  # native median 100, rounded up
