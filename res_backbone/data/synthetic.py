"""Synthetic shapes in COCO format: the embedded default detection dataset.

Crisp, high-contrast filled shapes (circle, square, triangle, cross, ring, star, diamond, hexagon) on
textured backgrounds (noise, stripes, gradients, blotches) with a few distractor lines and dots.
Class is decided by outline only (colour is random per object), sizes span ~0.1-0.5 of the image
side, 1-6 objects per image with limited overlap, a few images with no objects at all. Category
ids are deliberately non-contiguous (3, 7, 11, ...) so the label <-> id mapping is exercised.

Every image draws from its own ``SeedSequence([seed, split, index])``, so the output is
byte-identical for the same arguments (and ``num_train`` does not change the val split).

    python tools/make_data.py shapes --out data/shapes
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .coco_writer import coco_layout_paths, render_once, write_coco_split

log = logging.getLogger(__name__)

__all__ = ["SHAPES", "category_id", "make_synthetic_coco", "render_image", "synthetic_paths"]

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "hexagon")
_SPLIT_CODE = {"train": 0, "val": 1}
_FORMAT_VERSION = 1  # bump when the rendering changes, so cached sets are regenerated
_LUMA = np.array([0.299, 0.587, 0.114])


def category_id(shape_index: int) -> int:
    """COCO category id of ``SHAPES[shape_index]``: 3, 7, 11, ... (non-contiguous on purpose)."""
    return 3 + 4 * shape_index


# ---------------------------------------------------------------------------------------- colours
def _colour(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A random RGB colour (0-255 floats) whose luminance lies in [lo, hi]."""
    cand = rng.uniform(0, 255, size=(64, 3))
    luma = cand @ _LUMA
    ok = np.flatnonzero((luma >= lo) & (luma <= hi))
    if len(ok):
        return cand[ok[0]]
    grey = rng.uniform(lo, hi)
    return np.full(3, grey)


# ------------------------------------------------------------------------------------ backgrounds
def _background(rng: np.random.Generator, h: int, w: int, dark: bool) -> np.ndarray:
    """(h, w, 3) float32 texture whose luminance stays within a dark (20-105) or light (150-235) band."""
    lo, hi = (35.0, 90.0) if dark else (165.0, 220.0)
    base = _colour(rng, lo, hi)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # fine noise
        tex = rng.normal(0.0, rng.uniform(6, 14), size=(h, w, 1)).astype(np.float32)
    elif kind == 1:  # stripes, any direction
        theta, period = rng.uniform(0, math.pi), rng.uniform(5, 24)
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) * (2 * math.pi / period)
        tex = (np.sin(phase) * rng.uniform(8, 15))[..., None]
    elif kind == 2:  # linear gradient
        theta = rng.uniform(0, 2 * math.pi)
        ramp = (xx * math.cos(theta) + yy * math.sin(theta)) / max(h, w)
        tex = ((ramp - ramp.mean()) * rng.uniform(20, 30))[..., None]
    else:  # blotches: upsampled coarse noise
        gh, gw = int(rng.integers(3, 7)), int(rng.integers(3, 7))
        coarse = rng.normal(0.0, 9.0, size=(gh, gw)).astype(np.float32)
        tex = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))[..., None]
    # a second, colour-tinted component so backgrounds are not grey-scale textures only
    tint = rng.uniform(-1, 1, size=3).astype(np.float32) * 0.4 + 1.0
    return base.astype(np.float32) + tex * tint


# ---------------------------------------------------------------------------------------- shapes
def _rot(pts: np.ndarray, theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return pts @ np.array([[c, s], [-s, c]])


def _regular(n: int, theta: float) -> np.ndarray:
    a = theta + np.arange(n) * (2 * math.pi / n)
    return np.stack([np.cos(a), np.sin(a)], 1) * 0.5


def _draw_mask(shape: str, rng: np.random.Generator, size: float, stretch: float) -> np.ndarray:
    """Binary mask (uint8 0/255) of one shape, about ``size`` px across, cropped to its tight extent."""
    side = int(math.ceil(size * 1.5)) + 4
    img = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(img)
    cx = cy = side / 2.0
    sx, sy = size * stretch, size / stretch

    def poly(unit_pts: np.ndarray) -> None:  # unit_pts in [-0.5, 0.5] units
        pts = [(cx + x * sx, cy + y * sy) for x, y in unit_pts]
        d.polygon(pts, fill=255)

    if shape in ("circle", "ring"):
        d.ellipse([cx - sx / 2, cy - sy / 2, cx + sx / 2, cy + sy / 2], fill=255)
        if shape == "ring":
            r = rng.uniform(0.45, 0.62)
            d.ellipse([cx - sx * r / 2, cy - sy * r / 2, cx + sx * r / 2, cy + sy * r / 2], fill=0)
    elif shape == "square":
        sq = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
        poly(_rot(sq, rng.uniform(-0.2, 0.2)) * 0.9)
    elif shape == "diamond":
        poly(_rot(np.array([[0, -0.5], [0.5, 0], [0, 0.5], [-0.5, 0]]), rng.uniform(-0.15, 0.15)))
    elif shape == "triangle":
        tri = _regular(3, rng.uniform(0, 2 * math.pi)) * 1.12
        poly(tri)
    elif shape == "hexagon":
        poly(_regular(6, rng.uniform(0, math.pi / 3)))
    elif shape == "star":
        outer = _regular(5, rng.uniform(0, 2 * math.pi))
        inner = _rot(outer, -math.pi / 5) * 0.42
        pts = np.empty((10, 2))
        pts[0::2], pts[1::2] = outer, inner
        poly(pts)
    elif shape == "cross":
        t = rng.uniform(0.15, 0.2)
        arm = np.array([[-t, -0.5], [t, -0.5], [t, -t], [0.5, -t], [0.5, t], [t, t], [t, 0.5], [-t, 0.5],
                        [-t, t], [-0.5, t], [-0.5, -t], [-t, -t]])
        poly(_rot(arm, rng.uniform(-0.3, 0.3)))
    else:  # pragma: no cover
        raise ValueError(f"unknown shape {shape!r}")
    mask = np.asarray(img)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _overlap(box: Tuple[int, int, int, int], others: List[Tuple[int, int, int, int]], limit: float) -> bool:
    """True if ``box`` covers more than ``limit`` of itself or of any other box."""
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    for a0, b0, a1, b1 in others:
        iw, ih = min(x1, a1) - max(x0, a0), min(y1, b1) - max(y0, b0)
        if iw > 0 and ih > 0 and iw * ih > limit * min(area, (a1 - a0) * (b1 - b0)):
            return True
    return False


def render_image(
    rng: np.random.Generator, image_size: int, num_classes: int, *, empty_prob: float = 0.04,
    max_objects: int = 6, size_range: Tuple[float, float] = (0.1, 0.5),
) -> Tuple[np.ndarray, List[Tuple[int, List[int]]]]:
    """Render one image.

    Returns:
        image: (H, W, 3) uint8, each side in ``[0.8, 1.2] * image_size``.
        objects: ``[(shape_index, [x, y, w, h]), ...]`` tight integer boxes (COCO xywh pixels).
    """
    h = int(rng.integers(round(0.8 * image_size), round(1.2 * image_size) + 1))
    w = int(rng.integers(round(0.8 * image_size), round(1.2 * image_size) + 1))
    dark = bool(rng.random() < 0.5)
    canvas = _background(rng, h, w, dark)
    obj_lo, obj_hi = (150.0, 255.0) if dark else (0.0, 100.0)

    # distractors: thin lines and small dots in object-like colours (not annotated)
    clutter = Image.fromarray(np.zeros((h, w), np.uint8), mode="L")
    cd = ImageDraw.Draw(clutter)
    colours = []
    for k in range(int(rng.integers(0, 4))):
        if rng.random() < 0.5:
            pts = rng.uniform(0, 1, size=4) * [w, h, w, h]
            cd.line(pts.tolist(), fill=k + 1, width=1)
        else:
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.0, 2.5)
            cd.ellipse([x - r, y - r, x + r, y + r], fill=k + 1)
        colours.append(_colour(rng, obj_lo, obj_hi))
    lab = np.asarray(clutter)
    for k, col in enumerate(colours):
        canvas[lab == k + 1] = col

    objects: List[Tuple[int, List[int]]] = []
    boxes: List[Tuple[int, int, int, int]] = []
    n = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))
    lo, hi = size_range[0] * image_size, size_range[1] * image_size
    for _ in range(n):
        shape_idx = int(rng.integers(num_classes))
        size = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))  # log-uniform: balanced scales
        stretch = float(np.exp(rng.uniform(-0.2, 0.2)))
        mask = _draw_mask(SHAPES[shape_idx], rng, size, stretch)
        mh, mw = mask.shape
        if mh >= h or mw >= w:
            continue
        for _try in range(15):
            x0, y0 = int(rng.integers(0, w - mw + 1)), int(rng.integers(0, h - mh + 1))
            box = (x0, y0, x0 + mw, y0 + mh)
            if not _overlap(box, boxes, 0.2):
                break
        else:
            continue
        col = _colour(rng, obj_lo, obj_hi)
        region = canvas[y0:y0 + mh, x0:x0 + mw]
        region[mask > 0] = col
        boxes.append(box)
        objects.append((shape_idx, [x0, y0, mw, mh]))
    canvas += rng.normal(0.0, 3.0, size=(h, w, 1)).astype(np.float32)  # sensor-like grain over everything
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


# ----------------------------------------------------------------------------------------- splits
def _make_split(out_dir: Path, split: str, num: int, image_size: int, num_classes: int, seed: int,
                **render_kw) -> None:
    def samples():
        for i in range(num):
            rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], i]))
            arr, objects = render_image(rng, image_size, num_classes, **render_kw)
            yield (arr, [(x, y, x + w, y + h) for _, (x, y, w, h) in objects],
                   [category_id(shape_idx) for shape_idx, _ in objects], {})

    categories = [{"id": category_id(k), "name": SHAPES[k], "supercategory": "shape"} for k in range(num_classes)]
    write_coco_split(out_dir, split, samples(), categories,
                     {"description": "res_backbone synthetic shapes", "version": str(_FORMAT_VERSION), "seed": seed})


synthetic_paths = coco_layout_paths  # where make_synthetic_coco(out_dir) puts its files


def make_synthetic_coco(
    out_dir: os.PathLike | str,
    *,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 160,
    num_classes: int = 5,
    seed: int = 0,
    reuse: bool = True,
    object_size: Tuple[float, float] = (0.1, 0.5),
    max_objects: int = 6,
) -> Dict[str, str]:
    """Write a train and a held-out val split of synthetic shapes in COCO format.

    Layout: ``out_dir/{train,val}/NNNNNN.png`` and ``out_dir/annotations/instances_{train,val}.json``.

    Args:
        out_dir: output folder (created).
        num_train, num_val: images per split.
        image_size: nominal side; each image side is drawn from ``[0.8, 1.2] * image_size`` and
            objects span ``[0.1, 0.5] * image_size`` (16-80 px at 160).
        num_classes: 1..8; the first ``num_classes`` of ``SHAPES``, category ids ``3, 7, 11, ...``.
        seed: same seed and sizes -> byte-identical files.
        reuse: skip generation when ``out_dir`` already holds a complete set made with the same
            arguments (recorded in ``out_dir/synthetic_meta.json``).
        object_size: ``(lo, hi)`` object sides as fractions of ``image_size`` (log-uniform); e.g.
            ``(0.04, 0.15)`` for a small-object set (6-24 px at 160, what ``tools/studies/anchor_study.py`` uses).
        max_objects: at most this many objects per image (1..max_objects, uniformly).

    Returns:
        ``{"train_json", "train_images", "val_json", "val_images"}`` as path strings.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    lo, hi = (float(v) for v in object_size)
    if not 0 < lo <= hi <= 1 or max_objects < 1:
        raise ValueError(f"object_size must be 0 < lo <= hi <= 1 and max_objects >= 1, got {object_size}, {max_objects}")
    out = Path(out_dir)
    paths = synthetic_paths(out)
    meta = {"version": _FORMAT_VERSION, "num_train": num_train, "num_val": num_val, "image_size": image_size,
            "num_classes": num_classes, "seed": seed}
    render_kw = {}
    if (lo, hi) != (0.1, 0.5) or max_objects != 6:  # recorded only when set: older sets stay reusable
        render_kw = dict(size_range=(lo, hi), max_objects=int(max_objects))
        meta.update(object_size=[lo, hi], max_objects=int(max_objects))
    t0 = time.perf_counter()

    def write() -> None:
        _make_split(out, "train", num_train, image_size, num_classes, seed, **render_kw)
        _make_split(out, "val", num_val, image_size, num_classes, seed, **render_kw)

    if render_once(out / "synthetic_meta.json", meta, paths, write, reuse):
        log.info("synthetic shapes: %d train + %d val images in %s (%.1fs)", num_train, num_val, out,
                 time.perf_counter() - t0)
    return paths


make_synthetic_coco.paths = synthetic_paths  # type: ignore[attr-defined]  # discoverable from the function
