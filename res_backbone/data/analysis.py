"""What a COCO detection set holds, as the training run will see it: classes, boxes per image, box sizes
and shapes at the training size, objects at the borders, empty images, duplicated boxes, files whose size
differs from the json.

Everything is read through :class:`~.coco.CocoDetection` (pycocotools semantics, the same clear errors for
bad input): the boxes counted are the training targets (crowd boxes left out, boxes clipped to the image,
unusable ones dropped; the json-level counts are in ``reader``). Image files are opened for their header
only (PIL's lazy open), never decoded.

The training resize is the detection pipeline's (``transforms.py``): the longer side becomes
``image_size`` (``LongestMaxSize``, up or down), so a box scales by ``image_size / max(W, H)``. The
training-time scale jitter (0.8-1.2) is left out: sizes here are at the nominal ``image_size``.

    table = collect_boxes(CocoDetection("train.json", "train/"))
    stats = box_statistics(dataset, table, image_size=512)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .coco import CocoDetection
from .images import read_image_size

__all__ = ["AREA_SMALL", "AREA_MEDIUM", "BUCKETS", "SIZE_EDGES", "BoxTable", "box_statistics", "collect_boxes",
           "data_advice", "file_sizes", "log2_axis", "plot_aspect", "plot_sizes", "save_figure", "size_bucket", "suggest_image_size",
           "summary_lines", "training_scale"]

AREA_SMALL, AREA_MEDIUM = 32 ** 2, 96 ** 2  # COCO's small / medium / large area limits (px^2)
#: histogram edges of sqrt(area) in px at the training size (the last bin is open)
SIZE_EDGES = (0, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, math.inf)
BUCKETS = ("small", "medium", "large")
PathLike = Union[str, os.PathLike]


def training_scale(width: np.ndarray, height: np.ndarray, image_size: int) -> np.ndarray:
    """The factor the training resize applies to an image of ``width x height``: longer side -> ``image_size``."""
    return float(image_size) / np.maximum(np.asarray(width, np.float64), np.asarray(height, np.float64))


def size_bucket(area: np.ndarray) -> np.ndarray:
    """0 small (< 32^2), 1 medium (< 96^2), 2 large, by COCO's area limits."""
    area = np.asarray(area, np.float64)
    return (area >= AREA_SMALL).astype(np.int64) + (area >= AREA_MEDIUM).astype(np.int64)


@dataclass
class BoxTable:
    """Every training box of a set, one row each, with its image's facts.

    Attributes:
        boxes: ``(N, 4)`` float64 xyxy in original pixels (the training targets: crowd excluded, clipped).
        labels: ``(N,)`` contiguous labels ``1..K``.
        image_index: ``(N,)`` item index of the box's image in the dataset.
        image_wh: ``(M, 2)`` json ``(width, height)`` of each item, in item order.
        image_ids: ``(M,)`` COCO image ids in item order.
    """

    boxes: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray
    image_wh: np.ndarray
    image_ids: np.ndarray

    def at_size(self, image_size: int) -> Tuple[np.ndarray, np.ndarray]:
        """Boxes ``(N, 4)`` xyxy and their images' ``(h, w)`` ``(N, 2)`` after the training resize to ``image_size``."""
        wh = self.image_wh[self.image_index]
        scale = training_scale(wh[:, 0], wh[:, 1], image_size)
        hw = np.stack([np.rint(wh[:, 1] * scale), np.rint(wh[:, 0] * scale)], 1)  # albumentations rounds the sides
        return self.boxes * scale[:, None], np.maximum(hw, 1)

    def sqrt_area(self, image_size: Optional[int] = None) -> np.ndarray:
        """sqrt(w * h) of every box, in original pixels or at the training size ``image_size``."""
        boxes = self.boxes if image_size is None else self.at_size(image_size)[0]
        return np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))


def collect_boxes(dataset: CocoDetection) -> BoxTable:
    """The training boxes of every item of ``dataset`` (no image is read)."""
    boxes, labels, index = [], [], []
    for i in range(len(dataset)):
        b, lab = dataset.get_annotation(i)
        boxes.append(b.astype(np.float64))
        labels.append(lab)
        index.append(np.full(len(lab), i, np.int64))
    info = [dataset.coco.imgs[i] for i in dataset.ids]
    return BoxTable(
        boxes=np.concatenate(boxes).reshape(-1, 4) if boxes else np.zeros((0, 4)),
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        image_index=np.concatenate(index) if index else np.zeros(0, np.int64),
        image_wh=np.asarray([(d["width"], d["height"]) for d in info], np.float64).reshape(-1, 2),
        image_ids=np.asarray(dataset.ids, np.int64),
    )


def _histogram(values: np.ndarray, edges: Sequence[float]) -> Dict[str, Any]:
    counts = np.histogram(np.clip(values, edges[0], 1e300), bins=np.asarray(edges, np.float64))[0]
    return {"edges": [e if math.isfinite(e) else None for e in edges], "counts": counts.tolist()}


def _quantiles(values: np.ndarray) -> Dict[str, float]:
    if not len(values):
        return {}
    qs = np.percentile(values, [0, 5, 10, 25, 50, 75, 90, 95, 100])
    return {k: round(float(v), 3) for k, v in zip(("min", "p5", "p10", "p25", "median", "p75", "p90", "p95", "max"), qs)}


def _duplicates(table: BoxTable, iou_thresh: float) -> Tuple[int, int, List[dict]]:
    """``(exact, near, examples)``: pairs of same-class boxes of one image that are identical / overlap at
    IoU >= ``iou_thresh`` (exact ones excluded)."""
    exact = near = 0
    examples: List[dict] = []
    order = np.argsort(table.image_index, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(table.image_index[order]) != 0])
    for s, e in zip(starts, np.r_[starts[1:], len(order)]):
        rows = order[s:e]
        if len(rows) < 2:
            continue
        b, lab = table.boxes[rows], table.labels[rows]
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        lt, rb = np.maximum(b[:, None, :2], b[None, :, :2]), np.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
        iou = inter / (area[:, None] + area[None, :] - inter)
        same = (lab[:, None] == lab[None, :]) & np.triu(np.ones_like(iou, bool), 1)
        is_exact = same & np.all(b[:, None, :] == b[None, :, :], axis=2)
        is_near = same & ~is_exact & (iou >= iou_thresh)
        exact, near = exact + int(is_exact.sum()), near + int(is_near.sum())
        for i, j in zip(*np.nonzero(is_exact | is_near)):
            if len(examples) < 20:
                examples.append({"image_id": int(table.image_ids[table.image_index[rows[i]]]),
                                 "boxes_xyxy": [b[i].round(2).tolist(), b[j].round(2).tolist()],
                                 "iou": round(float(iou[i, j]), 4)})
    return exact, near, examples


def file_sizes(dataset: CocoDetection, progress: bool = False) -> Dict[str, Any]:
    """Every image file's size from its header (lazy open, no decoding) against the json's.

    Returns:
        ``{"checked", "size_mismatch": [{image_id, path, file_wh, json_wh}], "unreadable": [{image_id, path,
        problem}]}`` (missing, undecodable or outside the root files are ``unreadable``; lists capped at 100).
    """
    from tqdm import tqdm

    mismatch, unreadable, n_mismatch, n_bad = [], [], 0, 0
    files = dataset.image_files()
    for img_id, path, json_wh, problem in tqdm(files, desc="headers", unit="img", disable=not progress, leave=False):
        try:
            if path is None:
                raise ValueError(problem)
            wh = read_image_size(path, max_pixels=dataset.max_image_pixels)
        except (OSError, ValueError) as e:  # FileNotFoundError and ImageDecodeError are OSErrors
            n_bad += 1
            if len(unreadable) < 100:
                unreadable.append({"image_id": img_id, "path": str(path), "problem": f"{type(e).__name__}: {e}"})
            continue
        if tuple(wh) != tuple(json_wh):
            n_mismatch += 1
            if len(mismatch) < 100:
                mismatch.append({"image_id": img_id, "path": str(path), "file_wh": list(wh), "json_wh": list(json_wh)})
    return {"checked": len(files), "num_size_mismatch": n_mismatch, "num_unreadable": n_bad,
            "size_mismatch": mismatch, "unreadable": unreadable}


def suggest_image_size(table: BoxTable, *, small_px: float = 16.0, quantile: float = 0.10, max_size: int = 1333,
                       multiple: int = 32) -> Tuple[int, str]:
    """A training ``--image-size`` (longer side) for the box sizes of ``table``, and why.

    Small objects need upscaling: the size at which the ``quantile``-th smallest box (sqrt of area, relative to
    its image's longer side) reaches ``small_px`` pixels (about two cells of the finest FPN level, stride 4).
    When the images' median native longer side already gets there, that native size is kept (no needless
    upscaling, no downscaling that would lose detail). Rounded up to ``multiple``, at most ``max_size``.
    """
    if not len(table.boxes):
        return 512, "no boxes: the default 512"
    longer = table.image_wh.max(axis=1)
    native = float(np.median(longer))
    rel = table.sqrt_area() / longer[table.image_index]
    q = float(np.quantile(rel, quantile))
    needed = small_px / max(q, 1e-9)
    size = int(min(max_size, multiple * math.ceil(max(needed, min(native, max_size)) / multiple)))
    at_native = q * native
    if needed > native:
        why = (f"{quantile:.0%} of boxes are below {at_native:.1f} px at the native {native:.0f} px; {size} brings "
               f"them to {q * size:.1f} px (target {small_px:.0f})" + (" (capped)" if size == max_size else ""))
    else:
        why = (f"the native size {native:.0f} px already gives {quantile:.0%} of boxes >= {at_native:.1f} px "
               f"(target {small_px:.0f})")
    return size, why


def box_statistics(dataset: CocoDetection, table: BoxTable, image_size: int, *, border_px: float = 2.0,
                   duplicate_iou: float = 0.9, check_files: bool = True, progress: bool = False) -> Dict[str, Any]:
    """The statistics of a set (every number of ``analysis.json`` but the anchors').

    Args:
        dataset: the reader (its json-level counts go into ``reader``).
        table: :func:`collect_boxes` of ``dataset``.
        image_size: the training size (longer side) at which sizes are measured.
        border_px: a box whose edge lies within this many original pixels of the image edge is "at the border".
        duplicate_iou: same-class boxes of one image overlapping at least this much are near-duplicates.
        check_files: read every file's header and compare its size with the json's.
    """
    n_img, n_box = len(table.image_wh), len(table.boxes)
    k = dataset.num_classes
    per_image = np.bincount(table.image_index, minlength=n_img)
    boxes_per_class = np.bincount(table.labels, minlength=k + 1)[1:]
    images_per_class = np.zeros(k, np.int64)
    if n_box:
        pairs = np.unique(np.stack([table.image_index, table.labels], 1), axis=0)
        images_per_class = np.bincount(pairs[:, 1], minlength=k + 1)[1:]
    classes = [{"category_id": int(c), "name": n, "images": int(i), "boxes": int(b)}
               for c, n, i, b in zip(dataset.cat_ids, dataset.class_names, images_per_class, boxes_per_class)]
    w, h = table.boxes[:, 2] - table.boxes[:, 0], table.boxes[:, 3] - table.boxes[:, 1]
    side_train = table.sqrt_area(image_size)
    wh = table.image_wh[table.image_index]
    at_border = ((table.boxes[:, 0] <= border_px) | (table.boxes[:, 1] <= border_px)
                 | (table.boxes[:, 2] >= wh[:, 0] - border_px) | (table.boxes[:, 3] >= wh[:, 1] - border_px))
    log2_ratio = np.log2(h / w) if n_box else np.zeros(0)
    exact, near, dup_examples = _duplicates(table, duplicate_iou)
    size, why = suggest_image_size(table)
    out: Dict[str, Any] = {
        "json": dataset.ann_file, "images_root": str(dataset.image_root), "image_size": int(image_size),
        "num_images": n_img, "num_boxes": n_box, "num_classes": k,
        "reader": dict(dataset.stats),
        "classes": classes,
        "empty_images": int((per_image == 0).sum()),
        "boxes_per_image": {**_quantiles(per_image.astype(np.float64)), "mean": round(float(per_image.mean()), 3)
                            if n_img else 0.0, "histogram": _histogram(per_image, (0, 1, 2, 3, 5, 10, 20, 50, 100, math.inf))},
        "image_wh": {"width": _quantiles(table.image_wh[:, 0]), "height": _quantiles(table.image_wh[:, 1])},
        "sizes_original": {
            "sqrt_area_px": _quantiles(np.sqrt(w * h)),
            "coco_buckets": dict(zip(BUCKETS, np.bincount(size_bucket(w * h), minlength=3).tolist())),
        },
        "sizes_train": {
            "sqrt_area_px": _quantiles(side_train),
            "buckets": dict(zip(BUCKETS, np.bincount(size_bucket(side_train ** 2), minlength=3).tolist())),
            "histogram": _histogram(side_train, SIZE_EDGES),
        },
        "aspect_ratio_h_over_w": {**_quantiles(np.exp2(log2_ratio)),
                                  "histogram_log2": _histogram(log2_ratio, tuple(np.arange(-4, 4.01, 0.5)))},
        "at_border": {"boxes": int(at_border.sum()), "share": round(float(at_border.mean()), 4) if n_box else 0.0,
                      "border_px": border_px},
        "duplicates": {"exact_pairs": exact, "near_pairs": near, "iou": duplicate_iou, "examples": dup_examples},
        "suggested_image_size": {"image_size": size, "why": why},
    }
    if check_files:
        out["files"] = file_sizes(dataset, progress)
    return out


# ------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float):
    """A matplotlib ``Figure`` outside pyplot (Agg on save, no global state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_figure(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def log2_axis(ax, lo: float, hi: float) -> None:
    """A log-2 x axis labelled with plain pixel values (4, 8, 16, ...)."""
    ax.set_xscale("log", base=2)
    ticks = [2.0 ** k for k in range(int(math.floor(math.log2(max(lo, 1)))), int(math.ceil(math.log2(hi))) + 1)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlim(max(lo, 1), hi)


def plot_sizes(stats: Dict[str, Any], path: PathLike, anchor_sizes: Sequence[float] = (),
               fitted_sizes: Sequence[float] = ()) -> Path:
    """``sizes.png``: the histogram of sqrt(area) at the training size, COCO's 32/96 px limits and the anchor
    sizes (current, and fitted to the data)."""
    hist = stats["sizes_train"]["histogram"]
    edges = [e if e is not None else 2 * hist["edges"][-2] for e in hist["edges"]]
    edges[0] = max(edges[0], 1.0)
    fig = _figure(7, 3.6)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="white")
    used = [i for i, c in enumerate(hist["counts"]) if c]
    lo = min([edges[used[0]] if used else 4, *anchor_sizes, *fitted_sizes]) / 1.5
    hi = max([edges[used[-1] + 1] if used else 512, *anchor_sizes, *fitted_sizes]) * 1.5
    log2_axis(ax, lo, hi)
    for x, name in ((32, "small | medium"), (96, "medium | large")):
        ax.axvline(x, color="grey", ls=":", lw=1)
        ax.text(x, ax.get_ylim()[1] * 0.97, name, fontsize=7, ha="center", va="top", color="grey",
                bbox=dict(facecolor="white", edgecolor="none", pad=1))
    for sizes, colour, ls, label in ((anchor_sizes, "#dd8452", "-", "anchor sizes"),
                                     (fitted_sizes, "#55a868", "--", "fitted anchor sizes")):
        for i, s in enumerate(sizes):
            ax.axvline(s, color=colour, ls=ls, lw=1.3, label=label if i == 0 else None)
    ax.set_xlabel(f"sqrt(box area), px at --image-size {stats['image_size']}")
    ax.set_ylabel("boxes")
    ax.set_title(f"{stats['num_boxes']} boxes in {stats['num_images']} images")
    if anchor_sizes or fitted_sizes:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_aspect(stats: Dict[str, Any], path: PathLike, aspect_ratios: Sequence[float] = (),
                fitted_ratios: Sequence[float] = ()) -> Path:
    """``aspect.png``: the histogram of log2(h / w) of the boxes, with the anchors' ratios (h / w; current and fitted)."""
    hist = stats["aspect_ratio_h_over_w"]["histogram_log2"]
    edges = np.asarray(hist["edges"], np.float64)
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#55a868", edgecolor="white")
    for ratios, colour, ls, label in ((aspect_ratios, "#dd8452", "-", "anchor ratios"),
                                      (fitted_ratios, "#4c72b0", "--", "fitted anchor ratios")):
        for i, r in enumerate(ratios):
            ax.axvline(math.log2(r), color=colour, ls=ls, lw=1.3, label=label if i == 0 else None)
    ticks = np.arange(-4, 5, 1)
    ax.set_xticks(ticks, [f"{2.0 ** t:g}" for t in ticks])
    ax.set_xlabel("box height / width (log scale)")
    ax.set_ylabel("boxes")
    if aspect_ratios or fitted_ratios:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def summary_lines(stats: Dict[str, Any]) -> List[str]:
    """A short text table of ``stats`` (what the tool prints)."""
    tr, orig = stats["sizes_train"], stats["sizes_original"]
    q = tr["sqrt_area_px"]
    lines = [f"{stats['json']}: {stats['num_images']} images, {stats['num_boxes']} boxes, {stats['num_classes']} classes, "
             f"{stats['empty_images']} empty images",
             f"{'class':<20}{'images':>8}{'boxes':>8}"]
    lines += [f"{c['name'][:19]:<20}{c['images']:>8}{c['boxes']:>8}" for c in stats["classes"][:30]]
    if len(stats["classes"]) > 30:
        lines.append(f"... {len(stats['classes']) - 30} more classes in analysis.json")
    bpi = stats["boxes_per_image"]
    lines.append(f"boxes per image: mean {bpi.get('mean', 0)}, median {bpi.get('median', 0)}, max {bpi.get('max', 0)}")
    if q:
        lines.append(f"box size sqrt(area) at --image-size {stats['image_size']}: p10 {q['p10']:.1f}, median {q['median']:.1f}, "
                     f"p90 {q['p90']:.1f} px; small/medium/large {tr['buckets']['small']}/{tr['buckets']['medium']}/"
                     f"{tr['buckets']['large']} (original: {orig['coco_buckets']['small']}/{orig['coco_buckets']['medium']}/"
                     f"{orig['coco_buckets']['large']})")
    lines.append(f"at the border (<= {stats['at_border']['border_px']:g} px): {stats['at_border']['share']:.1%}; "
                 f"duplicated boxes: {stats['duplicates']['exact_pairs']} exact, {stats['duplicates']['near_pairs']} "
                 f"near (IoU >= {stats['duplicates']['iou']})")
    files = stats.get("files")
    if files is not None:
        lines.append(f"image files: {files['checked']} checked, {files['num_size_mismatch']} with another size than "
                     f"the json's, {files['num_unreadable']} missing or unreadable")
    return lines


def data_advice(stats: Dict[str, Any]) -> List[str]:
    """Concrete advice from the statistics alone (the anchors' advice is :mod:`heads.detection.anchor_fit`'s)."""
    out = []
    sug = stats["suggested_image_size"]
    if sug["image_size"] > stats["image_size"] * 1.25:
        out.append(f"small objects: train at --image-size {sug['image_size']} (or auto): {sug['why']}")
    if stats["empty_images"]:
        out.append(f"{stats['empty_images']} images have no box: kept as negatives (--filter-empty drops them)")
    dup = stats["duplicates"]
    if dup["exact_pairs"] or dup["near_pairs"]:
        out.append(f"{dup['exact_pairs'] + dup['near_pairs']} pairs of duplicated boxes (same class, IoU >= "
                   f"{dup['iou']}): check the labelling (examples in analysis.json)")
    files = stats.get("files") or {}
    if files.get("num_size_mismatch"):
        out.append(f"{files['num_size_mismatch']} image files differ in size from the json (EXIF-rotated or "
                   "re-saved?): training refuses them; fix the json or the files")
    if files.get("num_unreadable"):
        out.append(f"{files['num_unreadable']} image files are missing or unreadable (listed in analysis.json)")
    counts = [c["images"] for c in stats["classes"] if c["images"]]
    if counts and max(counts) >= 10 * min(counts):
        rare = min(stats["classes"], key=lambda c: c["images"] or math.inf)
        out.append(f"rare classes ('{rare['name']}' in {rare['images']} of {stats['num_images']} images): try "
                   f"--sampler repeat_factor --repeat-thresh {_repeat_thresh_hint(stats):g}")
    missing = [c["name"] for c in stats["classes"] if not c["boxes"]]
    if missing:
        out.append(f"classes without any box: {missing[:10]}")
    return out


def _repeat_thresh_hint(stats: Dict[str, Any]) -> float:
    """A threshold that repeats the rarer classes: the median class image frequency, to one significant digit."""
    freqs = sorted(c["images"] / max(stats["num_images"], 1) for c in stats["classes"] if c["images"])
    f = freqs[len(freqs) // 2]
    return float(f"{f:.1g}")

