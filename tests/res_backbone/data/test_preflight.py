"""The pre-flight check: every kind of bad file found at once, grouped, cached, and the two policies."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from res_backbone.data import CocoDetection
from res_backbone.data.preflight import (
    BadImageFault, BadImagesError, GuardedDataset, check_image, preflight, read_mid_run,
)


def _png(path, w=20, h=10, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _bad_set(root):
    """A COCO json over 8 images: 2 good and one of each bad kind."""
    root.mkdir(parents=True, exist_ok=True)
    _png(root / "good1.png")
    _png(root / "good2.png", seed=1)
    (root / "empty.png").write_bytes(b"")
    raw = _png(root / "cut.png", seed=2).read_bytes()
    (root / "cut.png").write_bytes(raw[: len(raw) // 2])
    (root / "noise.png").write_bytes(b"\x89PNG not really" + bytes(range(200)))
    _png(root / "big.png", w=30)
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(root / "cut.jpg", quality=90)
    data = (root / "cut.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[:-40])
    names = ["good1.png", "good2.png", "missing.png", "empty.png", "cut.png", "noise.png", "big.png", "cut.jpg"]
    ann = {"images": [{"id": i + 1, "file_name": n, "width": 20, "height": 10} for i, n in enumerate(names)],
           "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 5, 5], "area": 25,
                            "iscrowd": 0} for i in range(len(names))],
           "categories": [{"id": 1, "name": "thing"}]}
    (root / "ann.json").write_text(json.dumps(ann))
    return root / "ann.json"


EXPECTED = {3: "missing", 4: "empty", 5: "truncated", 6: "undecodable", 7: "size_mismatch", 8: "truncated"}


def test_every_kind_is_found_and_reported_at_once(tmp_path):
    ann = _bad_set(tmp_path / "data")
    ds = CocoDetection(ann, tmp_path / "data", None)
    with pytest.raises(BadImagesError) as e:
        preflight({"train": ds}, output=tmp_path / "run", progress=False)
    msg = str(e.value)
    assert "6 bad image(s)" in msg and "--on-bad-image skip" in msg
    for kind in set(EXPECTED.values()):
        assert f"  {kind}: " in msg
    report = json.loads((tmp_path / "run" / "bad_images.json").read_text())
    assert {b["key"]: b["kind"] for b in report["bad"]} == EXPECTED
    assert report["counts"]["truncated"] == 2 and report["policy"] == "error"
    assert len(ds) == 8  # nothing dropped under "error"


def test_skip_drops_the_bad_images_and_the_cache_makes_a_rerun_instant(tmp_path):
    ann = _bad_set(tmp_path / "data")
    ds = CocoDetection(ann, tmp_path / "data", None)
    first = preflight({"train": ds, "val": None}, policy="skip", output=tmp_path / "run", progress=False)
    assert ds.ids == [1, 2] and len(first.bad) == 6 and first.from_cache == 0
    again = CocoDetection(ann, tmp_path / "data", None)
    second = preflight({"train": again}, policy="skip", output=tmp_path / "run", progress=False)
    assert second.from_cache == 7 and {b.key: b.kind for b in second.bad} == EXPECTED  # missing: not cached
    _png(tmp_path / "data" / "big.png", w=20)  # fixed on disk: the changed size and mtime invalidate the entry
    third = preflight({"train": CocoDetection(ann, tmp_path / "data", None)}, policy="skip",
                      output=tmp_path / "run", progress=False)
    assert 7 not in {b.key for b in third.bad}


def test_full_mode_decodes_pixels(tmp_path):
    path = _png(tmp_path / "a.png")
    assert check_image(path, (20, 10), "full") is None
    raw = bytearray(path.read_bytes())
    raw[60:90] = b"\x00" * 30  # damaged pixel data, header and end marker intact
    path.write_bytes(bytes(raw))
    assert check_image(path, (20, 10), "header") is None
    assert check_image(path, (20, 10), "full")[0] in ("undecodable", "truncated")


def test_exif_rotated_photo_is_named_as_the_likely_cause(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (20, 10)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    kind, detail = check_image(tmp_path / "r.jpg", (10, 20))
    assert kind == "size_mismatch" and "EXIF-rotated" in detail


class _Flaky(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 1:
            raise FileNotFoundError("image file not found: /data/b.png")
        return i


def test_guarded_dataset_skips_or_fails_in_one_line(tmp_path):
    skip = GuardedDataset(_Flaky(), "skip", output=tmp_path)
    assert [skip[i] for i in range(4)] == [0, 2, 2, 3]
    assert read_mid_run(tmp_path)[0]["error"] == "FileNotFoundError: image file not found: /data/b.png"
    with pytest.raises(BadImageFault, match="bad image during training .*: image file not found: /data/b.png"):
        GuardedDataset(_Flaky(), "error")[1]
