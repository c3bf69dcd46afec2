"""Why AP is low: a TIDE-style error breakdown, a confusion matrix, per-class PR curves, the worst images.

Task-agnostic: it reads a COCO ground truth and a COCO results list, nothing of a model.

**Error breakdown** (TIDE, Bolya et al., ECCV 2020, sections 2.1-2.3). Detections are matched to the
ground truth as COCO does at IoU 0.5 (pycocotools' own ``evaluateImg``: greedy by score, crowd regions
ignored, up to 100 detections per image and class). Each false positive gets one error type, tested in
TIDE's order with foreground IoU ``fg`` = 0.5 and background IoU ``bg`` = 0.1 (IoUs with non-crowd ground
truth; "max" is over the boxes named):

* ``loc``: ``bg <= max IoU with a box of its own class < fg``;
* ``cls``: ``IoU >= fg`` with a box of another class;
* ``dupe``: ``IoU >= fg`` with a box of its own class that a higher-scoring detection already matched;
* ``bkg``: ``max IoU with every box <= bg``;
* ``both``: what is left with ``bg <= IoU < fg`` to a box of another class.

A ground-truth box that no detection matched and no ``cls`` or ``loc`` error points at is ``missed``. Each
type is then *fixed* in a copy of the detections and COCO evaluation is re-run at IoU 0.5; the AP50 gained
is that type's share of the missing AP (the types overlap, so the gains need not add up to ``1 - AP50``):
``cls`` takes the class of its box, ``loc`` takes its box's coordinates (a detection whose box is already
matched is removed instead, as TIDE), ``both``/``dupe``/``bkg`` detections are removed, and the ``missed``
boxes are taken out of the ground truth.

**Confusion matrix** at a score threshold: rows are the ground-truth class, columns the predicted class, the
last row and column the background. Per image, detections scoring at least the threshold (any class) and
non-crowd boxes are paired one to one, greedily by IoU (highest first, IoU >= 0.5): a pair counts at (true,
predicted); an unpaired box at (true, background); an unpaired detection at (background, predicted).
Detections lying inside a crowd region (half their area or more) are left out.
"""
from __future__ import annotations

import copy
import io
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from pycocotools.coco import COCO

from ..io import atomic_write_bytes, atomic_write_json
from .coco import _load_results, load_coco_gt, run_cocoeval

__all__ = ["ERROR_TYPES", "HOW_COMPUTED", "add_diagnostics_args", "box_iou_xywh", "coco_diagnostics", "confusion_matrix", "error_breakdown",
           "match_detections", "plot_confusion", "plot_pr_curves", "worst_images", "write_diagnostics"]

ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "missed")
FG_IOU, BG_IOU = 0.5, 0.1
HOW_COMPUTED = {
    "method": "TIDE (Bolya et al., ECCV 2020): detections matched as COCO does at IoU 0.5 (pycocotools' evaluateImg); "
              "every false positive gets one error type (tested in this order, fg IoU 0.5, bg IoU 0.1); each type is "
              "fixed in a copy of the detections and COCO eval is re-run at IoU 0.5: the value is the AP50 gained. "
              "The types overlap, so the gains need not add up to 1 - AP50.",
    "loc": "false positive with bg <= max IoU < fg to a box of its own class; fixed: it takes that box's coordinates "
           "(removed if the box is already matched)",
    "cls": "false positive with IoU >= fg to a box of another class; fixed: it takes that box's class (removed if "
           "the box is already matched)",
    "dupe": "false positive with IoU >= fg to a box of its own class that a higher-scoring detection matched; "
            "fixed: removed",
    "bkg": "false positive with IoU <= bg to every box; fixed: removed",
    "both": "false positive with bg <= IoU < fg to a box of another class (wrong class and box); fixed: removed",
    "missed": "ground-truth box that no detection matched and no cls or loc error points at; fixed: taken out of "
              "the ground truth",
}


def _intersection(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection areas ``(N, M)`` of ``xywh`` boxes and the areas ``(N, 1)``, ``(1, M)``."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    iy = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return ix.clip(0) * iy.clip(0), (a[:, 2] * a[:, 3])[:, None], (b[:, 2] * b[:, 3])[None, :]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def add_diagnostics_args(parser) -> None:
    """``--diagnostics`` and ``--diagnostics-score-thresh`` on an argparse parser (or group)."""
    parser.add_argument("--diagnostics", action="store_true",
                        help="also write pr_curves.png, confusion.png/.json, diagnostics.json (error breakdown: "
                             "AP50 gained per fixed error type; RPN recall) and worst/*.png (docs/diagnostics.md)")
    parser.add_argument("--diagnostics-score-thresh", type=float, default=0.5,
                        help="score threshold of the confusion matrix and the worst images (default 0.5)")


def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``(N, 4)`` and ``(M, 4)`` COCO ``xywh`` boxes -> ``(N, M)`` (areas ``w * h``, as pycocotools)."""
    inter, area_a, area_b = _intersection(a, b)
    return _ratio(inter, area_a + area_b - inter)


def _ap50(ev) -> float:
    """AP at the evaluator's first IoU threshold, all areas, 100 detections (pycocotools' mean; -1 undefined)."""
    p = ev.eval["precision"][0, :, :, 0, -1]
    return float(p[p > -1].mean()) if (p > -1).any() else -1.0


def match_detections(gt: COCO, results: Sequence[Mapping[str, Any]], img_ids: Sequence[int]):
    """COCO's matching at IoU 0.5 (and 0.75, for the PR curves), by pycocotools.

    Returns:
        ``(ev, status, matched)``: the evaluator (``eval["precision"]`` ``[2, 101, K, 4, 3]``); per detection
        (index into ``results``) ``status`` 1 true positive, 0 false positive, -1 ignored (matched a crowd
        region), -2 not evaluated (beyond 100 per image and class); ``matched`` the ground-truth id it
        matched at IoU 0.5 (0: none).
    """
    ev = run_cocoeval(gt, results, img_ids, iou_thrs=(0.5, 0.75), backend="pycocotools")
    status = np.full(len(results), -2, dtype=np.int64)
    matched = np.zeros(len(results), dtype=np.int64)
    all_area = list(ev.params.areaRng[0])
    for e in ev.evalImgs:
        if e is None or list(e["aRng"]) != all_area:
            continue
        idx = np.asarray(e["dtIds"], dtype=np.int64) - 1  # loadRes numbers the results 1..N in order
        m, ig = e["dtMatches"][0].astype(np.int64), e["dtIgnore"][0].astype(bool)
        status[idx] = np.where(ig, -1, (m > 0).astype(np.int64))
        matched[idx] = np.where(ig, 0, m)
    return ev, status, matched


def _by_image(gt: COCO, results: Sequence[Mapping[str, Any]], img_ids: Sequence[int]):
    """Per image: non-crowd annotations, crowd annotations, result indices best first."""
    dets: Dict[int, List[int]] = {}
    for i, r in enumerate(results):
        dets.setdefault(int(r["image_id"]), []).append(i)
    for img in img_ids:
        anns = gt.imgToAnns.get(img, [])
        order = sorted(dets.get(img, []), key=lambda i: -float(results[i]["score"]))
        yield img, [a for a in anns if not a.get("iscrowd", 0)], [a for a in anns if a.get("iscrowd", 0)], order


def error_breakdown(gt: COCO, results: Sequence[Mapping[str, Any]], img_ids: Sequence[int], status: np.ndarray,
                    matched: np.ndarray, *, backend: str = "pycocotools", fg: float = FG_IOU,
                    bg: float = BG_IOU) -> Dict[str, Any]:
    """The TIDE error types of ``results`` and the AP50 each would gain if fixed (module docstring).

    Args:
        gt, results, img_ids: as :func:`res_backbone.evaluation.coco.run_cocoeval` takes them.
        status, matched: :func:`match_detections`'s.
        backend: the COCO backend of the re-runs.

    Returns:
        ``{"AP50": base, "dAP50": {type: gain}, "AP50_fixed": {type: AP50}, "counts": {type: n},
        "how_computed": HOW_COMPUTED}``; per detection its type is in ``"error_of"`` (index -> type).
    """
    used = {int(g) for g, s in zip(matched, status) if s == 1}
    error_of: Dict[int, str] = {}
    target_of: Dict[int, int] = {}
    covered: set = set()
    missed: List[int] = []
    for _img, anns, _crowd, order in _by_image(gt, results, img_ids):
        fps = [i for i in order if status[i] == 0]
        if anns and fps:
            iou = box_iou_xywh([results[i]["bbox"] for i in fps], [a["bbox"] for a in anns])
            cats = np.asarray([a["category_id"] for a in anns])
            is_used = np.asarray([a["id"] in used for a in anns])
            for row, i in zip(iou, fps):
                same = cats == results[i]["category_id"]
                s_iou, o_iou = np.where(same, row, -1.0), np.where(same, -1.0, row)
                if bg <= s_iou.max() < fg:
                    kind, j = "loc", int(s_iou.argmax())
                elif o_iou.max() >= fg:
                    kind, j = "cls", int(o_iou.argmax())
                elif np.where(is_used, s_iou, -1.0).max() >= fg:
                    kind, j = "dupe", -1
                elif row.max() <= bg:
                    kind, j = "bkg", -1
                elif bg <= o_iou.max() < fg:
                    kind, j = "both", -1
                else:
                    kind, j = "other", -1
                error_of[i] = kind
                if j >= 0:
                    target_of[i] = int(anns[j]["id"])
                    covered.add(int(anns[j]["id"]))
        elif fps:
            error_of.update({i: "bkg" for i in fps})
        missed += [int(a["id"]) for a in anns if a["id"] not in used]
    missed = [g for g in missed if g not in covered]

    def fixed_results(kind: str) -> List[Dict[str, Any]]:
        taken, out = set(used), []
        for i in sorted(range(len(results)), key=lambda i: -float(results[i]["score"])):
            r = results[i]
            if error_of.get(i) != kind:
                out.append(r)
            elif kind in ("cls", "loc") and target_of[i] not in taken:
                taken.add(target_of[i])
                box = gt.anns[target_of[i]]
                out.append(dict(r, category_id=box["category_id"]) if kind == "cls" else dict(r, bbox=list(box["bbox"])))
        return out

    run = lambda g, res: _ap50(run_cocoeval(g, res, img_ids, iou_thrs=(0.5,), backend=backend))  # noqa: E731
    base = run(gt, results)
    fixed = {kind: run(gt, fixed_results(kind)) for kind in ERROR_TYPES if kind != "missed"}
    drop = set(missed)
    fixed["missed"] = run(load_coco_gt(dict(gt.dataset, annotations=[
        a for a in gt.dataset.get("annotations", []) if a["id"] not in drop])), results) if drop else base
    counts = {kind: sum(1 for v in error_of.values() if v == kind) for kind in ERROR_TYPES + ("other",)}
    counts["missed"] = len(missed)
    return {"AP50": base, "dAP50": {k: max(v, 0.0) - max(base, 0.0) for k, v in fixed.items()},
            "AP50_fixed": fixed, "counts": counts, "how_computed": dict(HOW_COMPUTED), "error_of": error_of}


def confusion_matrix(gt: COCO, results: Sequence[Mapping[str, Any]], img_ids: Sequence[int], *,
                     score_thresh: float = 0.5, iou_thresh: float = 0.5) -> Dict[str, Any]:
    """Counts ``[K + 1, K + 1]`` (rows true class, columns predicted, index ``K`` the background), module
    docstring; classes in sorted category-id order."""
    cat_ids = sorted(gt.cats)
    k_of = {c: k for k, c in enumerate(cat_ids)}
    K = len(cat_ids)
    m = np.zeros((K + 1, K + 1), dtype=np.int64)
    for _img, anns, crowd, order in _by_image(gt, results, img_ids):
        dets = [results[i] for i in order if float(results[i]["score"]) >= score_thresh]
        if crowd and dets:  # inside a crowd region: neither right nor wrong (COCO ignores it too)
            boxes = np.asarray([d["bbox"] for d in dets], np.float64)
            inside = _ioa(boxes, np.asarray([a["bbox"] for a in crowd], np.float64)).max(axis=1) >= 0.5
            dets = [d for d, out in zip(dets, inside) if not out]
        iou = box_iou_xywh([a["bbox"] for a in anns], [d["bbox"] for d in dets])
        free_g, free_d = set(range(len(anns))), set(range(len(dets)))
        for g, d in sorted(zip(*np.nonzero(iou >= iou_thresh)), key=lambda gd: -iou[gd]):
            if g in free_g and d in free_d:
                free_g.discard(g), free_d.discard(d)
                m[k_of[anns[g]["category_id"]], k_of[dets[d]["category_id"]]] += 1
        for g in free_g:
            m[k_of[anns[g]["category_id"]], K] += 1
        for d in free_d:
            m[K, k_of[dets[d]["category_id"]]] += 1
    return {"classes": [str(gt.cats[c].get("name", c)) for c in cat_ids] + ["background"], "category_ids": cat_ids,
            "matrix": m.tolist(), "rows": "true class", "columns": "predicted class", "score_thresh": score_thresh,
            "iou_thresh": iou_thresh}


def _ioa(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection of each ``a`` box with each ``b`` box over ``a``'s area (``xywh``)."""
    inter, area_a, _ = _intersection(a, b)
    return _ratio(inter, np.broadcast_to(area_a, inter.shape))


def worst_images(gt: COCO, results: Sequence[Mapping[str, Any]], img_ids: Sequence[int], status: np.ndarray,
                 matched: np.ndarray, *, score_thresh: float = 0.5, count: int = 8) -> Dict[str, List[Dict[str, int]]]:
    """The images with the most missed boxes and the most false positives at ``score_thresh`` (COCO's matching
    at IoU 0.5; greedy by score, so the matches among the detections above a threshold are the same as
    matching those alone). Returns ``{"missed": [...], "false_positives": [...]}`` of ``{"image_id",
    "ground_truth", "missed", "false_positives"}``, worst first, images with none left out."""
    found = {int(g) for g, s, r in zip(matched, status, results) if s == 1 and float(r["score"]) >= score_thresh}
    rows = []
    for img, anns, _crowd, order in _by_image(gt, results, img_ids):
        fp = sum(1 for i in order if status[i] == 0 and float(results[i]["score"]) >= score_thresh)
        rows.append({"image_id": int(img), "ground_truth": len(anns),
                     "missed": sum(1 for a in anns if a["id"] not in found), "false_positives": fp})
    out = {}
    for key in ("missed", "false_positives"):
        ranked = sorted((r for r in rows if r[key] > 0), key=lambda r: (-r[key], r["image_id"]))
        out[key] = ranked[:count]
    return out


def coco_diagnostics(coco_gt_or_json: Union[COCO, str, os.PathLike, Mapping[str, Any]],
                     results: Union[Sequence[Mapping[str, Any]], str, os.PathLike], *, score_thresh: float = 0.5,
                     backend: str = "pycocotools", num_worst: int = 8) -> Dict[str, Any]:
    """Everything above on one ground truth and result list.

    Args:
        coco_gt_or_json: ground truth (``COCO``, json path or dict).
        results: detections (``to_coco_results`` format or a json path of them).
        score_thresh: the confusion matrix's and the worst images' threshold.
        backend: the COCO backend of the error breakdown's re-runs (the matching is pycocotools').

    Returns:
        ``{"tide": error_breakdown(...), "confusion": confusion_matrix(...), "pr": {"recall": [101],
        "precision": {"0.50": {class: [101]}, "0.75": {...}}}, "worst": worst_images(...)}`` (precision -1
        where undefined).
    """
    gt = load_coco_gt(coco_gt_or_json)
    res = _load_results(gt, results)
    img_ids = sorted(gt.imgs)
    names = [str(gt.cats[c].get("name", c)) for c in sorted(gt.cats)]
    if not img_ids or not names:
        raise ValueError("diagnostics need at least one image and one category in the ground truth")
    ev, status, matched = match_detections(gt, res, img_ids)
    tide = error_breakdown(gt, res, img_ids, status, matched, backend=backend)
    tide.pop("error_of")
    prec = ev.eval["precision"]
    pr = {"recall": [float(v) for v in ev.params.recThrs],
          "precision": {f"{t:.2f}": {n: prec[ti, :, k, 0, -1].tolist() for k, n in enumerate(names)}
                        for ti, t in enumerate(ev.params.iouThrs)}}
    return {"tide": tide, "confusion": confusion_matrix(gt, res, img_ids, score_thresh=score_thresh),
            "pr": pr, "worst": worst_images(gt, res, img_ids, status, matched, score_thresh=score_thresh,
                                            count=num_worst), "score_thresh": score_thresh}


# ---------------------------------------------------------------------------------------------- pictures
def _save_figure(fig, path: Union[str, os.PathLike], tight: bool = True) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, **({"bbox_inches": "tight"} if tight else {}))
    atomic_write_bytes(buf.getvalue(), path)


def plot_pr_curves(pr: Mapping[str, Any], path: Union[str, os.PathLike], ap: Optional[Mapping[str, float]] = None) -> None:
    """One panel per class: precision against recall at each IoU of ``pr`` (:func:`coco_diagnostics`'s
    ``"pr"``); ``ap`` (class -> AP) goes into the titles."""
    from matplotlib.figure import Figure

    recall = np.asarray(pr["recall"])
    ious = list(pr["precision"])
    names = list(pr["precision"][ious[0]])
    cols = int(np.ceil(np.sqrt(len(names))))
    rows = int(np.ceil(len(names) / cols))
    fig = Figure(figsize=(2.6 * cols, 2.3 * rows))
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        for iou in ious:
            p = np.asarray(pr["precision"][iou][name], dtype=np.float64)
            ax.plot(recall, np.where(p < 0, np.nan, p), label=f"IoU {iou}")
        title = name if not ap or ap.get(name, -1) < 0 else f"{name}  AP {ap[name]:.3f}"
        ax.set_title(title if any(np.asarray(pr["precision"][i][name]).max() >= 0 for i in ious) else f"{name} (no GT)",
                     fontsize=9)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1.02), ax.tick_params(labelsize=7), ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7, loc="lower left")
        if k % cols == 0:
            ax.set_ylabel("precision", fontsize=8)
        if k >= len(names) - cols:
            ax.set_xlabel("recall", fontsize=8)
    w, h = fig.get_size_inches()  # margins in inches: tight_layout would draw the figure twice more
    fig.subplots_adjust(left=0.6 / w, right=1 - 0.1 / w, bottom=0.5 / h, top=1 - 0.3 / h, wspace=0.3, hspace=0.45)
    _save_figure(fig, path, tight=False)


def plot_confusion(conf: Mapping[str, Any], path: Union[str, os.PathLike]) -> None:
    """The confusion matrix as a picture: counts in the cells, colour = share of the row."""
    from matplotlib.figure import Figure

    m = np.asarray(conf["matrix"], dtype=np.float64)
    names = conf["classes"]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.45 * len(names) + 2)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 30:
        for (i, j), v in np.ndenumerate(m):
            if v:
                ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted class"), ax.set_ylabel("true class")
    ax.set_title(f"confusion at score >= {conf['score_thresh']}, IoU >= {conf['iou_thresh']} (colour: share of row)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save_figure(fig, path)


def write_diagnostics(diag: Mapping[str, Any], out_dir: Union[str, os.PathLike],
                      per_class_ap: Optional[Mapping[str, float]] = None, extra: Optional[Mapping[str, Any]] = None):
    """``pr_curves.png``, ``confusion.png``, ``confusion.json`` and ``diagnostics.json`` (the error breakdown,
    the worst images, ``extra``) into ``out_dir``. Returns the paths written."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_pr_curves(diag["pr"], out / "pr_curves.png", per_class_ap)
    plot_confusion(diag["confusion"], out / "confusion.png")
    atomic_write_json(diag["confusion"], out / "confusion.json", indent=1)
    body = {"score_thresh": diag["score_thresh"], "error_breakdown": diag["tide"], "worst_images": diag["worst"],
            **copy.deepcopy(dict(extra or {}))}
    atomic_write_json(body, out / "diagnostics.json", indent=2)
    return [out / n for n in ("pr_curves.png", "confusion.png", "confusion.json", "diagnostics.json")]
