import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from res_backbone.data import CocoDetection, make_synthetic_coco
from res_backbone.data.synthetic import SHAPES


def _digest(paths):
    h = hashlib.sha256()
    for name in ("train_json", "val_json"):
        h.update(Path(paths[name]).read_bytes())
    for name in ("train_images", "val_images"):
        for f in sorted(Path(paths[name]).glob("*.png"))[:5]:
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return make_synthetic_coco(out, num_train=24, num_val=8, image_size=96, num_classes=5, seed=0)


def test_deterministic_byte_identical(synth, tmp_path):
    again = make_synthetic_coco(tmp_path / "b", num_train=24, num_val=8, image_size=96, num_classes=5, seed=0)
    assert _digest(synth) == _digest(again)
    other = make_synthetic_coco(tmp_path / "c", num_train=24, num_val=8, image_size=96, num_classes=5, seed=1)
    assert _digest(synth) != _digest(other)


def test_val_independent_of_num_train(synth, tmp_path):
    more = make_synthetic_coco(tmp_path / "d", num_train=3, num_val=8, image_size=96, num_classes=5, seed=0)
    assert Path(more["val_json"]).read_bytes() == Path(synth["val_json"]).read_bytes()


def test_coco_structure_and_non_contiguous_ids(synth):
    data = json.loads(Path(synth["train_json"]).read_text())
    cat_ids = [c["id"] for c in data["categories"]]
    assert cat_ids == [3, 7, 11, 15, 19] and [c["name"] for c in data["categories"]] == list(SHAPES[:5])
    assert len(data["images"]) == 24
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=25)[1:]
    assert per_image.max() <= 6
    for img in data["images"]:
        with Image.open(Path(synth["train_images"]) / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
            assert 76 <= im.size[0] <= 116 and 76 <= im.size[1] <= 116
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        img = data["images"][a["image_id"] - 1]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
        assert a["iscrowd"] == 0 and a["area"] == w * h


def test_readable_by_dataset(synth):
    ds = CocoDetection(synth["val_json"], synth["val_images"])
    assert ds.cat_ids == [3, 7, 11, 15, 19] and ds.stats["dropped_nonpositive"] == 0
    ds.check_images(decode=True)


def test_some_empty_images():
    from res_backbone.data.synthetic import render_image

    empties = sum(not render_image(np.random.default_rng(i), 64, 8)[1] for i in range(200))
    assert 1 <= empties <= 25


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_masks_are_tight(shape):
    from res_backbone.data.synthetic import _draw_mask

    for i in range(5):
        mask = _draw_mask(shape, np.random.default_rng(i), size=12 + 10 * i, stretch=1.1)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert max(mask.shape) >= 0.7 * (12 + 10 * i)


def test_reuse_skips_regeneration(synth):
    f = Path(synth["train_json"])
    mtime = f.stat().st_mtime_ns
    make_synthetic_coco(f.parent.parent, num_train=24, num_val=8, image_size=96, num_classes=5, seed=0)
    assert f.stat().st_mtime_ns == mtime


def test_synthetic_paths(synth):
    from res_backbone.data import synthetic_paths

    root = Path(synth["train_json"]).parent.parent
    assert synthetic_paths(root) == synth == make_synthetic_coco.paths(root)


def test_bad_args(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_coco(tmp_path, num_classes=9)
