"""Anchor coverage of the ground truth at the training size, and anchors fitted to the data.

A box is *covered* at IoU ``t`` when some anchor of the detector overlaps it with IoU >= ``t`` (0.7 is
the RPN's positive threshold; a box under it gets only its best anchor as a positive, a "low-quality
match", Faster R-CNN section 3.1.2). Coverage is computed exactly, without listing the image's anchors:
for an anchor of a fixed shape, the IoU with a box only falls as the anchor's centre moves away from the
box's centre (in x and in y separately), so of all the anchors of one shape on a level the best is the
one on the grid point nearest the box centre. The best IoU of a box is therefore the maximum, over
levels and anchor shapes, of its IoU with that shape centred on the nearest grid point of the level
(the grid of the image padded to a multiple of 32, as ``collate_detection`` pads). Anchor shapes come
from :func:`~.anchors.cell_anchors` (corners rounded as the detector rounds them); strides from the
detector itself, built on the ``meta`` device (no memory, no weights). ``tests`` check the shortcut
against the brute-force maximum over :class:`~.anchors.AnchorGenerator`'s anchors.

Fitting (``train_det.py --anchor-sizes auto --aspect-ratios auto``): one size per pyramid level (FPN;
C4's single level keeps its number of sizes) and one set of aspect ratios shared by the levels (the
count of the current set), chosen to maximise ``cov(0.5) + cov(0.7) + 0.1 * mean best IoU`` on the boxes
at the training size (at most 20,000 of them, a seeded sample). The sizes stay a doubling ladder, as the
FPN's defaults are (each level keeps the objects of its scale; free sizes crowd every level, the coarse
ones too, onto the few sizes the data holds, for no more coverage; docs/analysis.md): the best
ladder ``s * 2^level`` with ``s`` on a 2^(1/8) grid, then each size refined within 2^(+-1/4) of its rung,
and the ratios (1/8-8) by coordinate ascent, in rounds until nothing improves. Deterministic: every DDP rank finds the same anchors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from res_backbone.data.analysis import BUCKETS, SIZE_EDGES, BoxTable, log2_axis, save_figure, size_bucket

from .anchors import cell_anchors

__all__ = ["AnchorConfig", "add_anchor_args", "anchor_config", "anchor_kwargs", "anchor_report", "auto_choices",
           "best_anchor_iou", "coverage", "fit_anchors", "number_or_auto", "plot_coverage"]

THRESHOLDS = (0.5, 0.7)
SIZE_CANDIDATES = np.unique(np.rint(2.0 ** np.arange(1, 11.001, 1 / 8)))  # 2..2048 px, ~9% steps
RATIO_CANDIDATES = np.round(2.0 ** np.arange(-3, 3.001, 1 / 8), 3)  # h / w from 1/8 to 8
PAD_DIVISIBLE = 32  # collate_detection's default padding multiple


@dataclass
class AnchorConfig:
    """The anchors of a detector: per level its stride, sizes and ``h / w`` ratios."""

    strides: List[int]
    sizes: List[Tuple[float, ...]]
    ratios: List[Tuple[float, ...]]

    def flags(self) -> Dict[str, list]:
        """As ``train_det.py`` flags / ``build_detector`` kwargs: ``anchor_sizes`` per level, ``aspect_ratios`` shared."""
        return {"anchor_sizes": [[_plain(s) for s in level] for level in self.sizes],
                "aspect_ratios": [[_plain(r) for r in self.ratios[0]]]}

    def describe(self) -> str:
        sizes = [_plain(s) for level in self.sizes for s in level]
        return f"sizes {sizes}, ratios {[_plain(r) for r in self.ratios[0]]}"


def _plain(v: float):
    return int(v) if float(v).is_integer() else round(float(v), 3)


def anchor_config(*, backbone: str = "resnet50", arch: str = "fpn", anchor_sizes: Optional[Sequence] = None,
                  aspect_ratios: Optional[Sequence] = None) -> AnchorConfig:
    """The anchors of ``build_detector(backbone, arch=arch, anchor_sizes=..., aspect_ratios=...)``.

    Args:
        anchor_sizes: per level sizes (``[[32], [64], ...]``) or one number per level (``[32, 64, ...]``);
            None: the detector's default.
        aspect_ratios: ``h / w`` ratios shared by the levels (``[0.5, 1, 2]`` or ``[[0.5, 1, 2]]``); None: default.
    """
    from .faster_rcnn import build_detector

    kw: Dict[str, Any] = {}
    if anchor_sizes is not None:
        kw["anchor_sizes"] = tuple(tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in anchor_sizes)
    if aspect_ratios is not None:
        kw["aspect_ratios"] = (tuple(aspect_ratios[0]) if isinstance(aspect_ratios[0], (list, tuple))
                               else tuple(aspect_ratios),)
    with torch.device("meta"):  # strides and level count from the real model, nothing allocated
        gen = build_detector(backbone, num_classes=1, arch=arch, **kw).rpn.anchor_generator
    return AnchorConfig(list(gen.strides), list(gen.sizes), list(gen.aspect_ratios))


# ------------------------------------------------------------------------------------------ flags
def number_or_auto(value) -> Union[int, float, str]:
    """argparse type: ``auto``, or a number (an int when whole: ``16`` -> 16, ``0.5`` -> 0.5)."""
    if str(value).strip().lower() == "auto":
        return "auto"
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"expected a positive number or 'auto', got {value!r}")
    return int(v) if v.is_integer() else v


def add_anchor_args(group) -> None:
    """``--anchor-sizes`` and ``--aspect-ratios`` (``train_det.py`` and ``analyze_data.py`` share them)."""
    group.add_argument("--anchor-sizes", type=number_or_auto, nargs="+", default=None, metavar="PX|auto",
                       help="anchor sizes (sqrt of area, px at the training size): one per pyramid level with --arch "
                            "fpn (e.g. 16 32 64 128 256), all on the one level with c4; 'auto': one size per level "
                            "fitted to the training boxes (heads/detection/anchor_fit.py; default: 32 x 2^level)")
    group.add_argument("--aspect-ratios", type=number_or_auto, nargs="+", default=None, metavar="H/W|auto",
                       help="anchor height/width ratios shared by every level (default 0.5 1 2); 'auto': as many "
                            "ratios fitted to the training boxes")


def anchor_kwargs(anchor_sizes: Optional[Sequence], aspect_ratios: Optional[Sequence], arch: str = "fpn"
                  ) -> Dict[str, Any]:
    """The two flags' values as ``build_detector`` kwargs: ``anchor_sizes`` per level (``[[16], [32], ...]`` for
    FPN, ``[[32, 64, ...]]`` for C4's single level) and ``aspect_ratios`` ``[[...]]``; ``"auto"`` passes through,
    None means the default (left out).

    Raises:
        ValueError: ``auto`` mixed with numbers.
    """
    out: Dict[str, Any] = {}
    for name, values in (("anchor_sizes", anchor_sizes), ("aspect_ratios", aspect_ratios)):
        if values is None:
            continue
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if "auto" in values:
            if len(values) != 1:
                raise ValueError(f"--{name.replace('_', '-')}: 'auto' stands alone, got {values}")
            out[name] = "auto"
        elif name == "aspect_ratios":
            out[name] = [list(values[0])] if isinstance(values[0], (list, tuple)) else [values]
        elif isinstance(values[0], (list, tuple)):
            out[name] = [list(v) for v in values]  # already per level (a run's config / detector_kwargs)
        else:
            out[name] = [values] if arch == "c4" else [[v] for v in values]
    return out


# ------------------------------------------------------------------------------------------ IoU
def _relative(boxes: np.ndarray, image_hw: np.ndarray, stride: int) -> np.ndarray:
    """Boxes ``(N, 4)`` relative to the level's grid point nearest their centre (inside the padded grid)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    padded_wh = np.ceil(image_hw[:, ::-1] / PAD_DIVISIBLE) * PAD_DIVISIBLE
    last = np.ceil(padded_wh / stride) - 1
    grid = np.clip(np.rint(centre / stride), 0, last) * stride
    return (boxes - np.concatenate([grid, grid], 1)).astype(np.float32)


def _iou(rel: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of boxes ``rel (N, 4)`` with anchors ``(..., 4)`` (same frame); returns ``(N, ...)``."""
    a = anchors.reshape(-1, 4).astype(np.float32)
    lt = np.maximum(rel[:, None, :2], a[None, :, :2])
    rb = np.minimum(rel[:, None, 2:], a[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_b = np.prod(rel[:, 2:] - rel[:, :2], axis=1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    return (inter / (area_b[:, None] + area_a[None, :] - inter)).reshape(len(rel), *anchors.shape[:-1])


def _cells(sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """Cell anchors ``(len(ratios), len(sizes), 4)`` as the detector builds them."""
    return cell_anchors([float(s) for s in sizes], [float(r) for r in ratios]).numpy().reshape(len(ratios), len(sizes), 4)


def best_anchor_iou(boxes: np.ndarray, image_hw: np.ndarray, config: AnchorConfig) -> np.ndarray:
    """The best IoU of each box with any anchor of ``config`` (exact; see the module docstring).

    Args:
        boxes: ``(N, 4)`` xyxy at the training size.
        image_hw: ``(N, 2)`` the ``(h, w)`` of each box's image at the training size (before padding).

    Returns:
        ``(N,)`` float32.
    """
    best = np.zeros(len(boxes), np.float32)
    for stride, sizes, ratios in zip(config.strides, config.sizes, config.ratios):
        if len(boxes):
            best = np.maximum(best, _iou(_relative(boxes, image_hw, stride), _cells(sizes, ratios)).reshape(len(boxes), -1).max(1))
    return best


def coverage(best_iou: np.ndarray, sqrt_area: np.ndarray) -> Dict[str, Any]:
    """Shares of boxes covered at IoU 0.5 / 0.7, overall, per COCO size bucket (at the training size) and per
    bin of :data:`~res_backbone.data.analysis.SIZE_EDGES` (``by_size``)."""
    def shares(mask: np.ndarray) -> Dict[str, Any]:
        n = int(mask.sum())
        out: Dict[str, Any] = {"boxes": n}
        for t in THRESHOLDS:
            out[f"iou_{t}"] = round(float((best_iou[mask] >= t).mean()), 4) if n else None
        out["mean_best_iou"] = round(float(best_iou[mask].mean()), 4) if n else None
        return out

    bucket = size_bucket(sqrt_area ** 2)
    bins = np.digitize(sqrt_area, np.asarray(SIZE_EDGES[1:-1]))
    return {**shares(np.ones(len(best_iou), bool)),
            "per_bucket": {name: shares(bucket == i) for i, name in enumerate(BUCKETS)},
            "by_size": [shares(bins == i) for i in range(len(SIZE_EDGES) - 1)]}


# ------------------------------------------------------------------------------------------ fitting
def _objective(best: np.ndarray) -> np.ndarray:
    """Higher is better; ``best`` is ``(N, ...)`` best IoUs, reduced over the first axis."""
    return (best >= 0.5).mean(0) + (best >= 0.7).mean(0) + 0.1 * best.mean(0)


def _best_without(cols: np.ndarray, k: int, axis: int) -> np.ndarray:
    """The best IoU of each box over the anchor shapes of ``cols (N, slots, ratios)`` but slot/ratio ``k``."""
    rest = np.delete(cols, k, axis=axis).reshape(len(cols), -1)
    return rest.max(1) if rest.shape[1] else np.zeros(len(cols), np.float32)


def fit_anchors(boxes: np.ndarray, image_hw: np.ndarray, config: AnchorConfig, *, fit_sizes: bool = True,
                fit_ratios: bool = True, max_boxes: int = 20000, seed: int = 0, max_rounds: int = 4) -> AnchorConfig:
    """Anchors with ``config``'s strides and counts (sizes per level, number of ratios) that cover the boxes
    best (module docstring); the sizes and/or ratios not fitted stay as they are.

    Args:
        boxes, image_hw: as :func:`best_anchor_iou` (training size).
        fit_sizes, fit_ratios: what to choose.
        max_boxes: fit on a seeded sample of at most this many boxes.
    """
    if len(boxes) > max_boxes:
        pick = np.sort(np.random.default_rng(seed).choice(len(boxes), max_boxes, replace=False))
        boxes, image_hw = boxes[pick], image_hw[pick]
    if not len(boxes) or not (fit_sizes or fit_ratios):
        return config
    rel = [_relative(boxes, image_hw, s) for s in config.strides]
    slots = [(lv, j) for lv, level in enumerate(config.sizes) for j in range(len(level))]
    sizes = [float(config.sizes[lv][j]) for lv, j in slots]
    ratios = [float(r) for r in config.ratios[0]]

    def columns(sz: Sequence[float], rt: Sequence[float]) -> np.ndarray:
        """``(N, slots, ratios)`` IoU of every box with every anchor shape."""
        cols = np.zeros((len(boxes), len(slots), len(rt)), np.float32)
        for k, (lv, _) in enumerate(slots):
            cols[:, k, :] = _iou(rel[lv], _cells([sz[k]], rt)[:, 0])
        return cols

    def score(sz, rt) -> float:
        return float(_objective(columns(sz, rt).reshape(len(boxes), -1).max(1)))

    cols = columns(sizes, ratios)
    current = float(_objective(cols.reshape(len(boxes), -1).max(1)))
    ladder: List[float] = list(sizes)
    for round_ in range(max_rounds):
        changed = False
        if fit_sizes:  # the best doubling ladder (for these ratios), then each size within 2^(+-1/4) of its rung
            ladders = [[c * 2.0 ** k for k in range(len(slots))] for c in SIZE_CANDIDATES]
            scores = [score(lad, ratios) for lad in ladders]
            if round_ == 0 or max(scores) > current + 1e-9:
                ladder = ladders[int(np.argmax(scores))]
                changed = changed or sizes != ladder
                sizes, current = list(ladder), float(max(scores))
                cols = columns(sizes, ratios)
        for k in range(len(slots) if fit_sizes else 0):  # one size at a time, all its candidates at once
            band = (SIZE_CANDIDATES >= ladder[k] * 2 ** -0.25) & (SIZE_CANDIDATES <= ladder[k] * 2 ** 0.25)
            cand = SIZE_CANDIDATES[band]
            if not len(cand):
                continue
            others = _best_without(cols, k, axis=1)
            new = _iou(rel[slots[k][0]], _cells(cand, ratios)).max(1)  # (N, candidates)
            s = _objective(np.maximum(others[:, None], new))
            if s.max() > current + 1e-9:
                sizes[k], current, changed = float(cand[int(s.argmax())]), float(s.max()), True
                cols = columns(sizes, ratios)
        for r in range(len(ratios) if fit_ratios else 0):  # one ratio at a time, shared by every level
            cand = np.asarray([c for c in RATIO_CANDIDATES if c not in ratios], np.float64)
            others = _best_without(cols, r, axis=2)
            new = np.zeros((len(boxes), len(cand)), np.float32)
            for k, (lv, _) in enumerate(slots):
                new = np.maximum(new, _iou(rel[lv], _cells([sizes[k]], cand)[:, 0]))
            s = _objective(np.maximum(others[:, None], new))
            if s.max() > current + 1e-9:
                ratios[r], current, changed = float(cand[int(s.argmax())]), float(s.max()), True
                cols = columns(sizes, ratios)
        if not changed:
            break
    per_level: List[List[float]] = [[] for _ in config.sizes]
    for (lv, _), s in zip(slots, sizes):
        per_level[lv].append(s)
    ratios_t = tuple(sorted(ratios))
    return AnchorConfig(list(config.strides), [tuple(level) for level in per_level], [ratios_t] * len(config.strides))


# ------------------------------------------------------------------------------------------ report
def anchor_report(table: BoxTable, image_size: int, config: AnchorConfig, *, fit_sizes: bool = True,
                  fit_ratios: bool = True, seed: int = 0) -> Dict[str, Any]:
    """Coverage of ``table``'s boxes at ``image_size`` by ``config`` and by anchors fitted to them, with advice.

    Returns:
        ``{"image_size", "method", "current": {"anchors", "coverage"}, "fitted": {...}, "advice": [...]}``.
    """
    boxes, hw = table.at_size(image_size)
    side = table.sqrt_area(image_size)
    fitted = fit_anchors(boxes, hw, config, fit_sizes=fit_sizes, fit_ratios=fit_ratios, seed=seed)
    cur_cov = coverage(best_anchor_iou(boxes, hw, config), side)
    fit_cov = coverage(best_anchor_iou(boxes, hw, fitted), side)
    report = {
        "image_size": int(image_size),
        "method": "exact best IoU per box: each anchor shape of each level centred on the level's grid point "
                  "nearest the box centre (heads/detection/anchor_fit.py)",
        "current": {"anchors": _anchors_json(config), "coverage": cur_cov},
        "fitted": {"anchors": _anchors_json(fitted), "coverage": fit_cov},
    }
    report["advice"] = anchor_advice(report)
    return report


def _anchors_json(config: AnchorConfig) -> Dict[str, Any]:
    return {"strides": list(config.strides), **config.flags()}


def anchor_advice(report: Dict[str, Any]) -> List[str]:
    """The concrete sentence(s) a user acts on."""
    cur, fit = report["current"]["coverage"], report["fitted"]["coverage"]
    if not cur["boxes"]:
        return []
    flags = report["fitted"]["anchors"]
    sizes = " ".join(str(s) for level in flags["anchor_sizes"] for s in level)
    ratios = " ".join(str(r) for r in flags["aspect_ratios"][0])
    miss7, miss5 = 1 - cur["iou_0.7"], 1 - cur["iou_0.5"]
    out = []
    if fit["iou_0.7"] > cur["iou_0.7"] + 0.02 or fit["iou_0.5"] > cur["iou_0.5"] + 0.02:
        out.append(f"{miss7:.0%} of boxes have no anchor with IoU >= 0.7 ({miss5:.0%} none >= 0.5) at --image-size "
                   f"{report['image_size']}: --anchor-sizes {sizes} --aspect-ratios {ratios} would cover "
                   f"{fit['iou_0.7']:.0%} at 0.7 and {fit['iou_0.5']:.0%} at 0.5 (train_det.py --anchor-sizes auto "
                   "--aspect-ratios auto chooses them)")
    else:
        out.append(f"the anchors cover {cur['iou_0.5']:.0%} of boxes at IoU >= 0.5 and {cur['iou_0.7']:.0%} at 0.7; "
                   "fitting would not gain much")
    worst = min((b for b in BUCKETS if cur["per_bucket"][b]["boxes"]), key=lambda b: cur["per_bucket"][b]["iou_0.5"])
    if cur["per_bucket"][worst]["iou_0.5"] < 0.5:
        out.append(f"{worst} boxes are the least covered: {cur['per_bucket'][worst]['iou_0.5']:.0%} at IoU >= 0.5 "
                   f"({cur['per_bucket'][worst]['boxes']} boxes)")
    return out


def plot_coverage(report: Dict[str, Any], path) -> Path:
    """``coverage.png``: share of boxes covered at IoU 0.5 / 0.7 against box size, current vs fitted anchors."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.8))
    ax = fig.add_subplot()
    edges = np.asarray([e if math.isfinite(e) else 2 * SIZE_EDGES[-2] for e in SIZE_EDGES], np.float64)
    centres = np.sqrt(np.maximum(edges[:-1], 2) * edges[1:])
    for name, style in (("current", "-"), ("fitted", "--")):
        rows = report[name]["coverage"]["by_size"]
        keep = [i for i, r in enumerate(rows) if r["boxes"]]
        for t, colour in zip(THRESHOLDS, ("#4c72b0", "#c44e52")):
            ax.plot(centres[keep], [rows[i][f"iou_{t}"] for i in keep], style, marker="o", ms=3, color=colour,
                    label=f"{name}, IoU >= {t}: {report[name]['coverage'][f'iou_{t}'] or 0:.0%}")
    used = [centres[i] for i, r in enumerate(report["current"]["coverage"]["by_size"]) if r["boxes"]]
    log2_axis(ax, min(used, default=4) / 1.5, max(used, default=512) * 1.5)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"sqrt(box area), px at --image-size {report['image_size']}")
    ax.set_ylabel("share of boxes with an anchor at IoU >= t")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ training
def auto_choices(table: BoxTable, *, backbone: str, arch: str, image_size, anchor_sizes, aspect_ratios,
                 seed: int = 0) -> Dict[str, Any]:
    """Resolve ``train_det.py``'s ``auto`` values from the training boxes.

    Args:
        image_size: an int, or ``"auto"`` (:func:`~res_backbone.data.analysis.suggest_image_size`).
        anchor_sizes: None (default), per-level sizes, or ``"auto"`` (fitted, one size per level).
        aspect_ratios: None (default), ``[[h/w, ...]]`` or ``"auto"`` (fitted, as many as the current set).

    Returns:
        ``{"image_size", "anchor_sizes", "aspect_ratios", "notes": [lines to log], "coverage_before",
        "coverage_after"}``; anchors as ``build_detector`` kwargs (lists), unchanged values passed through.
    """
    from res_backbone.data.analysis import suggest_image_size

    notes: List[str] = []
    out: Dict[str, Any] = {"image_size": image_size, "anchor_sizes": anchor_sizes, "aspect_ratios": aspect_ratios}
    if image_size == "auto":
        out["image_size"], why = suggest_image_size(table)
        notes.append(f"--image-size auto: {out['image_size']} ({why})")
    fit_sizes, fit_ratios = anchor_sizes == "auto", aspect_ratios == "auto"
    if fit_sizes or fit_ratios:
        config = anchor_config(backbone=backbone, arch=arch, anchor_sizes=None if fit_sizes else anchor_sizes,
                               aspect_ratios=None if fit_ratios else aspect_ratios)
        report = anchor_report(table, int(out["image_size"]), config, fit_sizes=fit_sizes, fit_ratios=fit_ratios,
                               seed=seed)
        flags = report["fitted"]["anchors"]
        if fit_sizes:
            out["anchor_sizes"] = flags["anchor_sizes"]
        if fit_ratios:
            out["aspect_ratios"] = flags["aspect_ratios"]
        before, after = report["current"]["coverage"], report["fitted"]["coverage"]
        out["coverage_before"], out["coverage_after"] = before, after
        what = " and ".join(n for n, f in (("--anchor-sizes", fit_sizes), ("--aspect-ratios", fit_ratios)) if f)
        notes.append(f"{what} auto at --image-size {report['image_size']}: {config.describe()} -> "
                     f"{AnchorConfig([], [tuple(s) for s in flags['anchor_sizes']], [tuple(flags['aspect_ratios'][0])]).describe()}; "
                     f"boxes with an anchor at IoU >= 0.5: {before['iou_0.5']:.1%} -> {after['iou_0.5']:.1%}, "
                     f">= 0.7: {before['iou_0.7']:.1%} -> {after['iou_0.7']:.1%}")
    out["notes"] = notes
    return out
