"""Hostile and broken input, fuzzed (hypothesis): the COCO, localization and ImageFolder readers.

Every generated case must end in sane outputs (RGB uint8 H x W x 3, finite boxes inside the image,
labels in range) or in one of the documented exceptions of ``res_backbone.data.coco`` whose message
names the item (json path, image file or image id); boxes that cannot be used are dropped and
counted in ``stats``. No case may read a file outside the image root (every ``open`` and
``PIL.Image.open`` is spied on), hang, or decode more pixels than the documented limit.

The runs are derandomized (same cases on every machine). Each test records how many cases it ran
and how they ended; the table is written to ``<pytest basetemp>/fuzz_coco_report.json`` (and to
``$RB_FUZZ_REPORT`` when set) at the end of the module.
"""
from __future__ import annotations

import builtins
import collections
import copy
import io
import json
import math
import os
import resource
import shutil
import struct
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import res_backbone.data.images as images_mod
from res_backbone.data import (CocoDetection, CocoFormatError, CocoLocalization, ImageDecodeError,
                               ImageFolderClassification, build_eval_transforms, build_loc_eval_transforms,
                               load_rgb_image)
from res_backbone.data.cls_transforms import build_cls_transforms
from res_backbone.data.images import ImageTooLargeError, read_image_size

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt files it is fed
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
# Per-class example counts, sized so the module runs in well under 45 s on one slow core.
N_JSON, N_NAMES, N_BYTES, N_MODES, N_BOXES = 250, 150, 250, 120, 200
MAX_CASE_S = 10.0  # a case slower than this counts as a hang
W, H = 12, 10  # size of every real image in the arena
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

TALLY: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


# ---------------------------------------------------------------------- the arena
def _png_bytes(arr: np.ndarray, mode: Optional[str] = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    """``base/root`` (the image root) with real images and links; sentinels outside it.

    root/ok.png, root/sub/ok.png, root/<unicode>.png (W x H), root/gray.png (L), root/link_in.png -> ok.png,
    root/link_out.png -> ../outside.png, root/dirlink -> ../outside_dir, root/loop.png -> itself.
    """
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    for rel in ("ok.png", "sub/ok.png", "ünïcødé 画像.png"):
        (root / rel).write_bytes(_png_bytes(rgb))
    (root / "gray.png").write_bytes(_png_bytes(np.full((H, W), 77, np.uint8)))
    red = np.zeros((H, W, 3), np.uint8)
    red[..., 0] = 255
    (base / "outside.png").write_bytes(_png_bytes(red))
    (base / "outside_dir").mkdir()
    (base / "outside_dir" / "inner.png").write_bytes(_png_bytes(red))
    os.symlink("ok.png", root / "link_in.png")
    os.symlink(base / "outside.png", root / "link_out.png")
    os.symlink(base / "outside_dir", root / "dirlink")
    os.symlink("loop.png", root / "loop.png")
    return {"base": base, "root": root, "rgb": rgb}


@pytest.fixture(scope="module", autouse=True)
def _report(tmp_path_factory):
    yield
    table = {k: {"cases": sum(v.values()), "outcomes": dict(sorted(v.items()))} for k, v in sorted(TALLY.items())}
    text = json.dumps(table, indent=2, ensure_ascii=False)
    (tmp_path_factory.getbasetemp() / "fuzz_coco_report.json").write_text(text)
    if os.environ.get("RB_FUZZ_REPORT"):
        Path(os.environ["RB_FUZZ_REPORT"]).write_text(text)


@contextmanager
def spy_opens(root: Path):
    """Record every path given to ``open`` and ``PIL.Image.open``; fail on any outside ``root``
    (the annotation json, which lies next to ``root``, is the one file allowed outside it)."""
    opened: List[str] = []
    real_open, real_pil_open = builtins.open, Image.open

    def _note(p):
        if isinstance(p, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(p)))

    def fake_open(file, *a, **k):
        _note(file)
        return real_open(file, *a, **k)

    def fake_pil_open(fp, *a, **k):
        _note(fp)
        return real_pil_open(fp, *a, **k)

    builtins.open, Image.open = fake_open, fake_pil_open
    try:
        yield opened
    finally:
        builtins.open, Image.open = real_open, real_pil_open
    root_r = os.path.realpath(root)
    outside = [p for p in opened if os.path.commonpath([root_r, p]) != root_r and not p.endswith(".json")]
    assert not outside, f"read outside the image root {root_r}: {outside}"


@contextmanager
def timed(what: str):
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    assert dt < MAX_CASE_S, f"{what}: a case took {dt:.1f} s (hang?)"


# ---------------------------------------------------------------------- the contract
def _label(e: BaseException) -> str:
    if isinstance(e, CocoFormatError):
        return "CocoFormatError"
    if isinstance(e, ImageTooLargeError):
        return "ImageTooLargeError"
    if isinstance(e, ImageDecodeError):
        return "ImageDecodeError"
    if isinstance(e, FileNotFoundError):
        return "FileNotFoundError"
    if isinstance(e, ValueError) and "decodes to" in str(e):
        return "ValueError(size differs from json)"
    if isinstance(e, ValueError) and "symbolic link" in str(e):
        return "ValueError(link out of root)"
    raise AssertionError(f"undocumented exception {type(e).__name__}: {e}") from e


ITEM_ERRORS = (FileNotFoundError, ImageDecodeError, ValueError)


def _check_det_item(ds: CocoDetection, index: int, image: torch.Tensor, target: dict) -> None:
    info = ds.coco.imgs[ds.ids[index]]
    h, w = info["height"], info["width"]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, h, w)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4) and labels.dtype == torch.int64
    assert torch.isfinite(boxes).all()
    assert ((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w) & (boxes[:, 3] <= h)).all()
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    assert ((labels >= 1) & (labels <= ds.num_classes)).all()
    assert target["image_id"] == ds.ids[index] and target["orig_size"] == (h, w)


def _check_stats(ds: CocoDetection) -> None:
    """Every annotation is accounted for: kept, crowd, or dropped under a counted reason."""
    s = ds.stats
    assert s["annotations"] == (s["boxes"] + s["crowd"] + s["dropped_nonfinite"] + s["dropped_nonpositive"]
                                + s["dropped_outside"]), s


def read_all(ann: Path, root: Path, *, localization: bool = True) -> str:
    """Build the COCO readers on ``ann`` and read every item; returns the case outcome.

    Raises AssertionError when the contract is broken (undocumented exception, message not naming
    the item, insane output).
    """
    try:
        ds = CocoDetection(ann, root)
    except CocoFormatError as e:
        assert str(ann) in str(e), f"error does not name the json: {e}"
        return "refused at construction: CocoFormatError"
    _check_stats(ds)
    assert sorted(ds.ids) == ds.ids and len(set(ds.ids)) == len(ds.ids)
    errors = collections.Counter()
    for i in range(len(ds)):
        try:
            image, target = ds[i]
        except ITEM_ERRORS as e:
            label = _label(e)
            assert f"image id {ds.ids[i]}" in str(e), f"{label} does not name the image id {ds.ids[i]}: {e}"
            errors[label] += 1
            continue
        _check_det_item(ds, i, image, target)
    problems = ds.check_images(raise_on_error=False)  # the header scan meets the same files without raising
    assert all(p[0] in ds.ids for p in problems)
    if localization:
        loc = CocoLocalization(ann, root)
        assert len(loc) + loc.skipped_empty == len(ds)
        for i in range(len(loc)):
            try:
                image, target = loc[i]
            except ITEM_ERRORS as e:
                _label(e)
                assert f"image id {loc.ids[i]}" in str(e)
                continue
            assert 0 <= target["label"] < loc.num_classes
            box = target["box"]
            assert torch.isfinite(box).all() and (box >= 0).all() and (box <= 1).all()
            assert box[2] >= box[0] and box[3] >= box[1]
    if errors:
        return "items refused: " + ", ".join(sorted(errors))
    dropped = sum(v for k, v in ds.stats.items() if k.startswith("dropped"))
    return "read ok, unusable boxes dropped and counted" if dropped else "read ok"


def _write_json(path: Path, data) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(json.dumps(data, allow_nan=True))
    return path


# ---------------------------------------------------------------------- 1. json structure
def _base_json() -> dict:
    return {
        "info": {"description": "fuzz"},
        "images": [{"id": 1, "file_name": "ok.png", "width": W, "height": H},
                   {"id": 2, "file_name": "gray.png", "width": W, "height": H},
                   {"id": 3, "file_name": "sub/ok.png", "width": W, "height": H}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "ghost"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 4], "iscrowd": 0, "area": 20},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [6, 2, 5, 7], "iscrowd": 0, "area": 35},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 12, 10], "iscrowd": 1, "area": 120},
            {"id": 4, "image_id": 3, "category_id": 11, "bbox": [2.5, 1.5, 3, 3], "area": 9},
        ],
    }


EXTREME_INTS = [0, -1, -(2**31), 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**400,
                -(10**400)]
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.sampled_from(EXTREME_INTS), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
    st.lists(st.integers(-3, 3), max_size=5), st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
)
LISTS = ("images", "annotations", "categories")
KEYS = {"images": ["id", "file_name", "width", "height"], "annotations": ["id", "image_id", "category_id", "bbox",
        "iscrowd", "area"], "categories": ["id", "name", "supercategory"]}
RAW_TEXT = st.one_of(
    st.binary(max_size=64),  # mostly not UTF-8, not JSON
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"images": ', b"\xff\xfe{}", "[" * 100_000 + "]" * 100_000,
                     b'{"images": [], "annotations": [], "categories": []}']),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
).map(lambda b: b.encode() if isinstance(b, str) else b)


@st.composite
def mutated_json(draw):
    if draw(st.integers(0, 19)) == 0:
        return draw(RAW_TEXT)
    data = _base_json()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop_top", "replace_top", "drop_field", "set_field", "duplicate", "not_object",
                                   "unknown_ref", "extreme_id", "extreme_size", "extra_keys", "whole_not_object"]))
        if not isinstance(data, dict):
            break
        name = draw(st.sampled_from(LISTS))
        items = data.get(name)
        if op == "drop_top":
            data.pop(name, None)
        elif op == "replace_top":
            data[name] = draw(HOSTILE)
        elif op == "whole_not_object":
            data = draw(st.one_of(HOSTILE, st.just([data])))
        elif not isinstance(items, list) or not items:
            continue
        elif op == "drop_field":
            entry = items[draw(st.integers(0, len(items) - 1))]
            if isinstance(entry, dict) and entry:
                entry.pop(draw(st.sampled_from(sorted(entry))))
        elif op == "set_field":
            entry = items[draw(st.integers(0, len(items) - 1))]
            if isinstance(entry, dict):
                entry[draw(st.sampled_from(KEYS[name] + ["extra"]))] = draw(HOSTILE)
        elif op == "duplicate":
            items.append(copy.deepcopy(items[draw(st.integers(0, len(items) - 1))]))
        elif op == "not_object":
            items[draw(st.integers(0, len(items) - 1))] = draw(HOSTILE)
        elif op == "unknown_ref" and name == "annotations":
            entry = items[draw(st.integers(0, len(items) - 1))]
            if isinstance(entry, dict):
                entry[draw(st.sampled_from(["image_id", "category_id"]))] = draw(st.integers(-5, 20))
        elif op == "extreme_id":
            entry = items[draw(st.integers(0, len(items) - 1))]
            if isinstance(entry, dict):
                entry[draw(st.sampled_from(["id", "image_id", "category_id"] if name == "annotations" else ["id"]))] = \
                    draw(st.sampled_from(EXTREME_INTS))
        elif op == "extreme_size" and name == "images":
            entry = items[draw(st.integers(0, len(items) - 1))]
            if isinstance(entry, dict):
                entry[draw(st.sampled_from(["width", "height"]))] = draw(st.sampled_from(EXTREME_INTS + [H, W, 1]))
        elif op == "extra_keys":
            for entry in items:
                if isinstance(entry, dict):
                    entry[draw(st.text(min_size=1, max_size=8))] = draw(HOSTILE)
    return data


def test_fuzz_malformed_json(arena):
    ann = arena["base"] / "ann.json"

    @settings(FUZZ, max_examples=N_JSON)
    @given(data=mutated_json())
    def run(data):
        _write_json(ann, data)
        with timed("json"), spy_opens(arena["root"]):
            outcome = read_all(ann, arena["root"])
        TALLY["json: missing keys, wrong types, None, extreme/duplicate ids and sizes, unknown refs, "
              "not JSON / not UTF-8 / nested 100k deep"][outcome] += 1

    run()
    assert sum(next(v for k, v in TALLY.items() if k.startswith("json")).values()) >= N_JSON // 2


def test_valid_json_is_not_refused(arena):
    """The validation refuses nothing that is valid: the unmutated base reads fully."""
    ann = _write_json(arena["base"] / "valid.json", _base_json())
    assert read_all(ann, arena["root"]) == "read ok"


# ---------------------------------------------------------------------- 2. file names and links
SEGMENTS = ["..", ".", "sub", "ok.png", "outside.png", "link_out.png", "link_in.png", "dirlink", "inner.png",
            "loop.png", "ünïcødé 画像.png", "", "~", "C:", "..\\..", "%2e%2e", "\x00", "\ud800", "x" * 300]
NAMED = ["../../outside.jpg", "../outside.png", "sub/../../outside.png", "/etc/passwd", "//server/share/x.png",
         "C:\\outside.png", "..\\outside.png", "link_out.png", "dirlink/inner.png", "loop.png", "link_in.png",
         "sub/../ok.png", "./ok.png", "ünïcødé 画像.png", "ok.png\x00.txt", "\ud800.png", "x" * 300 + ".png", ".",
         "sub", "sub/", "ok.png/", "missing.png", " ok.png", "OK.PNG", "~/ok.png", "%2e%2e/outside.png"]
FILE_NAMES = st.one_of(
    st.sampled_from(NAMED),
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5).map("/".join),
    st.text(max_size=30),
    st.text(max_size=20).map(lambda t: "../" + t),
)


def test_fuzz_file_names_never_leave_root(arena):
    ann = arena["base"] / "names.json"

    @settings(FUZZ, max_examples=N_NAMES)
    @given(name=FILE_NAMES)
    def run(name):
        data = _base_json()
        data["images"][0]["file_name"] = name
        _write_json(ann, data)
        with timed("names"), spy_opens(arena["root"]):
            outcome = read_all(ann, arena["root"], localization=False)
        TALLY["file names: unicode, ../ traversal, absolute, NUL, surrogates, 300 chars, links out/in/loop"][
            outcome] += 1

    run()


def test_links_out_of_root_are_named_and_never_read(arena):
    data = _base_json()
    data["images"][0]["file_name"] = "link_out.png"
    data["images"][1]["file_name"] = "dirlink/inner.png"
    data["images"][2]["file_name"] = "link_in.png"  # a link that stays inside is fine
    ann = _write_json(arena["base"] / "links.json", data)
    with spy_opens(arena["root"]):
        ds = CocoDetection(ann, arena["root"])
        for img_id in (1, 2):
            with pytest.raises(ValueError, match=rf"symbolic link.*image id {img_id}"):
                ds[ds.ids.index(img_id)]
        image, _ = ds[ds.ids.index(3)]
        problems = ds.check_images(raise_on_error=False)
    assert torch.equal((image * 255).round().byte().permute(1, 2, 0), torch.from_numpy(arena["rgb"]))
    assert [p[0] for p in problems] == [1, 2] and all("outside the image root" in p[2] for p in problems)


# ---------------------------------------------------------------------- 3. broken image bytes
def _encoded(fmt: str) -> bytes:
    arr = np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
VALID = {fmt: _encoded(fmt) for fmt in FORMATS}
EXTS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".webp", ".ppm", ".PNG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_size(w: int, h: int, color_type: int = 2) -> bytes:
    """A PNG whose (valid, CRC-checked) header declares ``w`` x ``h`` but whose data is a few bytes."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b""))


def jpeg_with_size(w: int, h: int) -> bytes:
    b = bytearray(VALID["JPEG"])
    sof = b.index(b"\xff\xc0")
    b[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(b)


def gif_with_size(w: int, h: int) -> bytes:
    b = bytearray(VALID["GIF"])
    b[6:10] = struct.pack("<HH", w, h)
    return bytes(b)


def bmp_with_size(w: int, h: int) -> bytes:
    b = bytearray(VALID["BMP"])
    b[18:26] = struct.pack("<ii", w, h)
    return bytes(b)


HEADERS = {"PNG": png_with_size, "JPEG": jpeg_with_size, "GIF": gif_with_size, "BMP": bmp_with_size}
SIDE = st.one_of(st.integers(0, 3000), st.sampled_from([0, 1, 65535, 2**31 - 1]))
FUZZ_LIMIT = 2_000_000  # the pixel limit during the byte fuzz, so within-limit decodes stay small


@st.composite
def broken_image(draw):
    """``(kind, bytes, declared (w, h) or None)``."""
    kind = draw(st.one_of(st.sampled_from(["truncated", "flipped", "random", "empty", "magic_then_garbage",
                                           "valid_then_garbage"]), st.just("header_size")))
    fmt = draw(st.sampled_from(FORMATS))
    data = VALID[fmt]
    if kind == "truncated":
        return kind, data[:draw(st.integers(0, len(data) - 1))], None
    if kind == "flipped":
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        return kind, bytes(b), None
    if kind == "random":
        return kind, draw(st.binary(min_size=1, max_size=300)), None
    if kind == "empty":
        return kind, b"", None
    if kind == "magic_then_garbage":
        return kind, data[:draw(st.integers(2, 16))] + draw(st.binary(max_size=200)), None
    if kind == "valid_then_garbage":
        return kind, data + draw(st.binary(min_size=1, max_size=64)), None
    fmt = draw(st.sampled_from(sorted(HEADERS)))
    w, h = draw(SIDE), draw(SIDE)
    if fmt != "PNG":
        w, h = min(w, 65535), min(h, 65535)
    return f"header_size_{fmt}", HEADERS[fmt](w, h), (w, h)


@contextmanager
def pixel_limit(limit):
    old = images_mod.MAX_IMAGE_PIXELS
    images_mod.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        images_mod.MAX_IMAGE_PIXELS = old


def _folder_outcome(root: Path, path: Path) -> str:
    ds = ImageFolderClassification(root, transform=build_cls_transforms(train=False, mean=MEAN, std=STD, resize=8,
                                                                         crop=8))
    try:
        x, label = ds[0]
    except ITEM_ERRORS as e:
        assert str(path) in str(e), f"{type(e).__name__} does not name {path}: {e}"
        return _label(e)
    assert x.shape == (3, 8, 8) and torch.isfinite(x).all() and label == 0
    return "read ok"


def test_fuzz_broken_image_files(arena):
    base = arena["base"]
    root, cls_root = base / "root", base / "cls"
    ann = base / "bytes.json"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @settings(FUZZ, max_examples=N_BYTES)
    @given(case=broken_image(), ext=st.sampled_from(EXTS))
    def run(case, ext):
        kind, payload, declared = case
        path = root / f"fuzz{ext}"
        path.write_bytes(payload)
        w, h = declared if declared and min(declared) > 0 else (16, 12)
        data = {"images": [{"id": 5, "file_name": path.name, "width": w, "height": h}],
                "categories": [{"id": 1, "name": "x"}],
                "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 4, 4]}]}
        _write_json(ann, data)
        shutil.rmtree(cls_root, ignore_errors=True)
        (cls_root / "a").mkdir(parents=True)
        (cls_root / "a" / path.name).write_bytes(payload)
        with timed(kind), pixel_limit(FUZZ_LIMIT), spy_opens(base):
            try:
                arr = load_rgb_image(path)
                assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.size > 0
                direct = "decoded"
            except ITEM_ERRORS as e:
                assert str(path) in str(e)
                direct = _label(e)
            coco = read_all(ann, root)
            folder = _folder_outcome(cls_root, cls_root / "a" / path.name)
        if kind == "header_size_PNG" and min(declared) > 0:
            # the guard decides from the header alone: refused exactly when the size is over the limit
            assert (direct == "ImageTooLargeError") == (declared[0] * declared[1] > FUZZ_LIMIT), (declared, direct)
        if direct == "decoded":
            assert arr.shape[0] * arr.shape[1] <= FUZZ_LIMIT
        TALLY[f"image bytes: {kind}"][f"load_rgb_image {direct} | COCO {coco} | ImageFolder {folder}"] += 1

    run()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mb < 300, f"peak memory grew by {grown_mb:.0f} MB while fuzzing image bytes"


def test_decompression_bomb_refused_before_decoding(tmp_path):
    """Header-declared sizes over the default limit are refused by name without allocating the pixels."""
    assert images_mod.MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS  # documented default = PIL's
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cases = {"bomb.png": png_with_size(10_000, 10_000, 6),  # 1e8 px RGBA: 400 MB if decoded
             "bomb.jpg": jpeg_with_size(65_535, 65_535),  # over twice PIL's limit: PIL's own refusal, renamed
             "bomb.gif": gif_with_size(65_535, 20_000), "bomb.bmp": bmp_with_size(20_000, 20_000)}
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        t0 = time.perf_counter()
        with pytest.raises(ImageTooLargeError, match=name.replace(".", r"\.")):
            load_rgb_image(tmp_path / name)
        with pytest.raises(ImageTooLargeError):
            read_image_size(tmp_path / name)
        assert time.perf_counter() - t0 < 1.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024 < 100
    # the dataset names the image id, and its own limit applies to ordinary images too
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "big.png")
    ann = _write_json(tmp_path / "a.json", {"images": [{"id": 9, "file_name": "big.png", "width": 50, "height": 40}],
                                            "categories": [], "annotations": []})
    ds = CocoDetection(ann, tmp_path, max_image_pixels=1999)
    with pytest.raises(ImageTooLargeError, match=r"2000 pixels.*limit of 1999.*image id 9"):
        ds[0]
    assert "too large" in ds.check_images(raise_on_error=False)[0][2]
    assert CocoDetection(ann, tmp_path, max_image_pixels=2000)[0][0].shape == (3, 40, 50)


def test_foreign_formats_are_not_decoded(tmp_path):
    """PIL knows ~40 formats; only IMAGE_FORMATS are tried, whatever the file is called (EPS would run Ghostscript)."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, "ICO")
    for name, payload in (("ps.png", eps), ("icon.png", ico.getvalue())):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ImageDecodeError, match=name):
            load_rgb_image(tmp_path / name)


def test_json_not_utf8_or_too_deep_is_a_format_error(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    for payload, match in ((b'{"images": "\xff"}', "not UTF-8"), (deep, "nested too deeply")):
        p = _write_json(tmp_path / "x.json", payload)
        with pytest.raises(CocoFormatError, match=match):
            CocoDetection(p, tmp_path)


# ---------------------------------------------------------------------- 4. image modes and sizes
def _saveable() -> List[tuple]:
    """(format, mode) pairs PIL writes and reads back here."""
    pairs = []
    for fmt in FORMATS:
        for mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I", "F", "CMYK", "YCbCr"):
            try:
                buf = io.BytesIO()
                Image.new(mode, (3, 2)).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
                buf.seek(0)
                Image.open(buf).load()
                pairs.append((fmt, mode))
            except Exception:
                pass
    return pairs


SAVEABLE = _saveable()
EXT_OF = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "PPM": ".ppm"}


def _make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    if mode in ("L", "P"):
        im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
        if mode == "P":
            im = im.convert("P")
            im.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        return im
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32))
    if mode == "PA":
        return _make_image("LA", w, h, seed).convert("PA")
    arr = rng.integers(0, 256, (h, w, Image.getmodebands(mode)), dtype=np.uint8)
    return Image.frombytes(mode, (w, h), arr.tobytes())


def expected_rgb(path: Path) -> np.ndarray:
    """An oracle independent of the library's conversion: the stored pixels, by the documented rules."""
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode in ("1", "L", "LA"):
            g = np.asarray(im.getchannel(0)).astype(np.uint8) * (255 if mode == "1" else 1)
            return np.repeat(g[..., None], 3, 2)
        if mode in ("P", "PA"):
            idx = np.asarray(im.getchannel(0) if mode == "PA" else im)
            pal = np.asarray(im.getpalette("RGB"), np.uint8).reshape(-1, 3)
            return pal[idx]
        if mode in ("RGB", "RGBA"):
            return np.asarray(im)[..., :3]
        if mode.startswith("I"):
            v = np.asarray(im).astype(np.float64)
            if mode.startswith("I;16") or v.max() > 255:
                v = v / 257.0
            return np.repeat(np.clip(np.rint(v), 0, 255).astype(np.uint8)[..., None], 3, 2)
        if mode == "F":
            v = np.asarray(im).astype(np.float64)
            return np.repeat(np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)[..., None], 3, 2)
        return np.asarray(im.convert("RGB"))  # CMYK, YCbCr: PIL's colour conversion is the reference


SIZES = st.one_of(st.tuples(st.integers(1, 40), st.integers(1, 40)),
                  st.sampled_from([(1, 1), (1, 300), (300, 1), (2, 1), (1, 2)]))


def test_fuzz_image_modes_and_sizes(arena):
    base = arena["base"]
    root, cls_root = base / "modes", base / "modes_cls"
    root.mkdir(exist_ok=True)
    ann = base / "modes.json"

    @settings(FUZZ, max_examples=N_MODES)
    @given(pair=st.sampled_from(SAVEABLE), size=SIZES, seed=st.integers(0, 2**16))
    def run(pair, size, seed):
        fmt, mode = pair
        w, h = size
        path = root / f"img{EXT_OF[fmt]}"
        _make_image(mode, w, h, seed).save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        with timed(f"{fmt} {mode}"):
            arr = load_rgb_image(path)  # valid files must decode
            assert arr.dtype == np.uint8 and arr.shape == (h, w, 3)
            np.testing.assert_array_equal(arr, expected_rgb(path), err_msg=f"{fmt} {mode} {w}x{h}")
            _write_json(ann, {"images": [{"id": 1, "file_name": path.name, "width": w, "height": h}],
                              "categories": [{"id": 4, "name": "thing"}],
                              "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "bbox": [0, 0, w, h]}]})
            ds = CocoDetection(ann, root, build_eval_transforms(32, MEAN, STD))
            image, target = ds[0]
            assert image.shape[0] == 3 and max(image.shape[1:]) == 32 and torch.isfinite(image).all()
            assert target["boxes"].shape == (1, 4) and target["labels"].tolist() == [1]
            assert (target["boxes"][0, 2:] <= torch.tensor([image.shape[2], image.shape[1]])).all()
            loc = CocoLocalization(ann, root, build_loc_eval_transforms(16, MEAN, STD))
            image, target = loc[0]
            assert image.shape == (3, 16, 16) and torch.allclose(target["box"], torch.tensor([0.0, 0, 1, 1]))
            shutil.rmtree(cls_root, ignore_errors=True)
            (cls_root / "only").mkdir(parents=True)
            shutil.copy(path, cls_root / "only" / path.name)
            for in_chans in (1, 3):
                x, label = ImageFolderClassification(cls_root, in_chans=in_chans)[0]
                assert x.shape == (in_chans, h, w) and label == 0 and 0 <= float(x.min()) <= float(x.max()) <= 1
        TALLY[f"valid images: {len(SAVEABLE)} format x mode pairs (1-bit..16-bit, LA/PA/RGBA/CMYK/YCbCr/F), "
              "1x1..40x40, 1x300"]["read ok, pixels equal the oracle"] += 1

    run()


def test_large_image_within_limit_reads(tmp_path):
    """A genuinely large (4000 x 3000, 12 Mpx) image under the limit decodes, at the json's size."""
    Image.new("L", (4000, 3000), 9).save(tmp_path / "big.png")
    ann = _write_json(tmp_path / "a.json", {"images": [{"id": 1, "file_name": "big.png", "width": 4000,
                                                        "height": 3000}], "categories": [], "annotations": []})
    arr = CocoDetection(ann, tmp_path).load_image(0)
    assert arr.shape == (3000, 4000, 3) and arr.dtype == np.uint8 and int(arr[1234, 3210, 2]) == 9


# ---------------------------------------------------------------------- 5. boxes
SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400), 2**64, 1e308, -1e308, 5e-324, 1e-8,
                           -0.0, 0, W - 1e-7, H + 1e-7])
COORD = st.one_of(st.floats(-5, 15), st.integers(-3, 14), SPECIAL, st.floats(allow_nan=True, allow_infinity=True))
SIDE_LEN = st.one_of(st.floats(-2, 15), st.integers(-2, 14), SPECIAL, st.floats(1e-9, 1e-5))
NUMBER = st.one_of(COORD, SIDE_LEN)
BBOX = st.tuples(COORD, COORD, SIDE_LEN, SIDE_LEN).map(list)
BAD_BBOX = st.one_of(st.lists(NUMBER, min_size=0, max_size=6), HOSTILE,
                     st.lists(st.one_of(NUMBER, st.booleans(), st.none(), st.text(max_size=2)), min_size=4, max_size=4))
ISCROWD = st.sampled_from(["absent", 0, 1, True, False, 1.0])
BAD_ISCROWD = st.sampled_from([2, -1, None, "1", 0.5, [1]])
ANNOTATION = st.fixed_dictionaries({"image_id": st.sampled_from([1, 2]), "category_id": st.sampled_from([3, 7, 11]),
                                    "bbox": BBOX, "iscrowd": ISCROWD})


@st.composite
def annotation_lists(draw):
    """Up to 8 annotations; one case in four also breaks one of them (bbox or iscrowd) or duplicates an id."""
    anns = [dict(a, id=i + 1) for i, a in enumerate(draw(st.lists(ANNOTATION, max_size=8)))]
    if anns and draw(st.integers(0, 3)) == 0:
        victim = anns[draw(st.integers(0, len(anns) - 1))]
        how = draw(st.sampled_from(["bbox", "iscrowd", "dup"]))
        if how == "bbox":
            victim["bbox"] = draw(BAD_BBOX)
        elif how == "iscrowd":
            victim["iscrowd"] = draw(BAD_ISCROWD)
        else:
            victim["id"] = anns[0]["id"] if victim is not anns[0] else len(anns) + 5
    for a in anns:
        if a["iscrowd"] == "absent":
            del a["iscrowd"]
    return anns


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _reference_boxes(anns, img_id: int):
    """Expected kept boxes of ``img_id`` (xyxy, clipped), from the documented rules."""
    out = []
    for a in anns:
        if a["image_id"] != img_id or a.get("iscrowd", 0):
            continue
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
        except OverflowError:
            continue
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            continue
        with np.errstate(over="ignore"):
            box = np.float32([max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))])
        if box[2] > box[0] and box[3] > box[1]:  # non-empty after clipping and in float32
            out.append(box)
    return out


def test_fuzz_boxes(arena):
    ann = arena["base"] / "boxes.json"

    @settings(FUZZ, max_examples=N_BOXES)
    @given(anns=annotation_lists())
    def run(anns):
        data = _base_json()
        data["annotations"] = anns
        _write_json(ann, data)
        valid = (len({a["id"] for a in anns}) == len(anns)
                 and all(isinstance(a["bbox"], list) and len(a["bbox"]) == 4 and all(_num(v) for v in a["bbox"])
                         and a.get("iscrowd", 0) in (0, 1) for a in anns))
        with timed("boxes"), spy_opens(arena["root"]):
            outcome = read_all(ann, arena["root"])
        if valid:  # structurally valid json is never refused, whatever the numbers
            assert not outcome.startswith("refused"), outcome
            ds = CocoDetection(ann, arena["root"])
            for img_id in (1, 2):
                boxes, _ = ds.get_annotation(ds.ids.index(img_id))
                ref = np.asarray(_reference_boxes(anns, img_id), np.float32).reshape(-1, 4)
                np.testing.assert_allclose(boxes, ref, rtol=1e-6)
            image, target = CocoDetection(ann, arena["root"], build_eval_transforms(24, MEAN, STD))[0]
            b = target["boxes"]
            assert torch.isfinite(b).all() and (b[:, 2] <= image.shape[2] + 1e-3).all()
            assert (b[:, 3] <= image.shape[1] + 1e-3).all() and len(b) == len(target["labels"])
        TALLY["bbox/iscrowd: NaN, inf, 1e400, negative, zero, wrong length, wrong types, duplicate ids"][outcome] += 1

    run()
