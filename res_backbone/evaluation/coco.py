"""COCO box evaluation through pycocotools, plus the glue from model outputs to COCO results.

Two backends compute the same numbers: ``"pycocotools"`` (the default and the reference) and
``"faster"``, the C++ ``faster-coco-eval`` package (the ``eval`` extra), 5x faster on 5,000 images
with the 12 stats equal to 1e-6 (``docs/diagnostics.md``; ``tools/studies/bench_coco_eval.py``).

The 12 numbers are pycocotools' ``COCOeval.stats`` under readable names. **-1 convention**
(pycocotools'): a value is -1 when it is undefined -- no (non-crowd) ground truth in that
category / area range, so there is nothing to recall (e.g. ``APl`` on a set without large
objects, or every stat on an empty val set). A value of 0 means there was ground truth but
nothing was found. ``per_class_AP`` follows the same convention per category.

The edge cases are defined, never crashes: no detections at all (0 where there is ground truth),
a category without ground truth (its AP is -1 and it is left out of the mean, even when it has
detections), images whose only boxes are crowd (detections on them are ignored, neither true nor
false positives; a set of only such images is all -1), an empty validation set (all -1).
Detections naming an image or category id that is not in the ground truth are a ``ValueError``
listing the ids. ``metrics.json`` (``tools/train_det.py``, ``tools/eval_det.py``) keeps the -1 as
numbers (never ``null``) and carries :data:`UNDEFINED_NOTE` under ``"note"``; the printed table
ends with the same line.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..io import atomic_write_json

__all__ = ["COCO_BACKENDS", "CocoBackendMissing", "STAT_NAMES", "add_coco_backend_arg", "UNDEFINED", "UNDEFINED_NOTE", "coco_evaluate",
           "gather_results", "load_coco_gt", "require_backend", "run_cocoeval", "to_coco_results",
           "write_detections_json"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
UNDEFINED = -1.0  # pycocotools' value of a stat (or a precision entry) that is undefined
UNDEFINED_NOTE = ("-1 = undefined (pycocotools' convention): no non-crowd ground truth in that category or area "
                  "range, so there is nothing to find; 0 = there was ground truth and none of it was found")
# indices into COCOeval's precision array: area range "all" and the largest maxDets (100)
_AREA_ALL, _MAX_DETS_LARGEST = 0, -1
COCO_BACKENDS = ("pycocotools", "faster")
_FASTER_HINT = ("--coco-backend faster needs the faster-coco-eval package: pip install 'res-backbone[eval]' "
                "(the eval extra; or pip install faster-coco-eval==1.8.0)")


class CocoBackendMissing(ImportError, ValueError):
    """The chosen COCO backend's package is not installed (a ``ValueError`` too: the tools' bad-input exit 2)."""


def add_coco_backend_arg(parser) -> None:
    """``--coco-backend pycocotools|faster`` on an argparse parser (or group)."""
    parser.add_argument("--coco-backend", default="pycocotools", choices=COCO_BACKENDS,
                        help="COCO evaluation: pycocotools (default, the reference) or faster (faster-coco-eval, "
                             "same 12 numbers ~5x faster; pip install 'res-backbone[eval]')")


def require_backend(backend: str) -> None:
    """Check that ``backend`` is one of :data:`COCO_BACKENDS` and importable, before any work is done.

    Raises:
        ValueError: an unknown name. CocoBackendMissing: ``"faster"`` without faster-coco-eval (one line
        naming the ``eval`` extra).
    """
    if backend not in COCO_BACKENDS:
        raise ValueError(f"coco backend must be one of {', '.join(COCO_BACKENDS)}; got {backend!r}")
    if backend == "faster":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError as e:
            raise CocoBackendMissing(_FASTER_HINT) from e


def _as_float_list(t: Any) -> List[float]:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64).reshape(-1).tolist()


def to_coco_results(outputs: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]],
                    cat_ids: Sequence[int]) -> List[Dict[str, Any]]:
    """Model outputs -> the detection list pycocotools' ``loadRes`` takes.

    Args:
        outputs: per image ``{"boxes": (M, 4) xyxy resized pixels, "scores": (M,), "labels": (M,) in 1..K}``.
        targets: the matching dataset targets (``image_id``, ``scale``, ``orig_size``).
        cat_ids: ``cat_ids[label - 1]`` is the COCO category id (``CocoDetection.cat_ids``).

    Returns:
        ``[{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}, ...]`` with
        boxes in original-image pixels (``resized / scale``, clipped to ``orig_size``), python types.
    """
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
    cat_ids = [int(c) for c in cat_ids]
    results: List[Dict[str, Any]] = []
    for out, tgt in zip(outputs, targets):
        boxes = np.asarray(_as_float_list(out["boxes"]), dtype=np.float64).reshape(-1, 4)
        scores = _as_float_list(out["scores"])
        labels = [int(round(v)) for v in _as_float_list(out["labels"])]
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {tgt['image_id']}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        if not boxes.size:
            continue
        bad = [lab for lab in labels if not 1 <= lab <= len(cat_ids)]
        if bad:
            raise ValueError(f"image {tgt['image_id']}: labels {sorted(set(bad))} outside 1..{len(cat_ids)}")
        scale = float(tgt.get("scale", 1.0))
        boxes = boxes / scale
        if "orig_size" in tgt:
            H, W = (float(v) for v in tgt["orig_size"])
            # h/H and w/W differ by rounding; clip so x1 never exceeds the original width.
            boxes[:, 0::2] = boxes[:, 0::2].clip(0.0, W)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0.0, H)
        image_id = int(tgt["image_id"])
        for (x0, y0, x1, y1), s, lab in zip(boxes.tolist(), scores, labels):
            results.append({"image_id": image_id, "category_id": cat_ids[lab - 1],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(s)})
    return results


def load_coco_gt(coco_gt_or_json: Union[COCO, str, os.PathLike, Mapping[str, Any]]) -> COCO:
    """A pycocotools ``COCO`` from a ``COCO``, a json path or an already-loaded dict (quietly)."""
    if isinstance(coco_gt_or_json, COCO):
        return coco_gt_or_json
    gt = COCO()
    if isinstance(coco_gt_or_json, Mapping):
        gt.dataset = copy.deepcopy(dict(coco_gt_or_json))
    else:
        with open(coco_gt_or_json, "r", encoding="utf-8") as f:
            gt.dataset = json.load(f)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _load_results(gt: COCO, results: Union[Sequence[Mapping[str, Any]], str, os.PathLike]) -> List[Dict[str, Any]]:
    if isinstance(results, (str, os.PathLike)):
        with open(results, "r", encoding="utf-8") as f:
            results = json.load(f)
    if not isinstance(results, (list, tuple)):
        raise ValueError(f"results must be a list of detections, got {type(results).__name__}")
    for i, r in enumerate(results):  # what loadRes would otherwise meet as a KeyError or IndexError
        if not isinstance(r, Mapping) or not {"image_id", "category_id", "bbox", "score"} <= set(r):
            raise ValueError(f"detection {i} must be a dict with image_id, category_id, bbox, score; got {r!r}")
        ids = (r["image_id"], r["category_id"])
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in ids):
            raise ValueError(f"detection {i}: image_id and category_id must be integers, got {r['image_id']!r}, "
                             f"{r['category_id']!r}")
        if not isinstance(r["bbox"], (list, tuple)) or len(r["bbox"]) != 4:
            raise ValueError(f"detection {i} (image id {r['image_id']!r}): bbox must be [x, y, w, h], "
                             f"got {r['bbox']!r}")
    # loadRes writes area/id/iscrowd into the dicts it gets: hand it copies.
    res = [dict(r, bbox=list(r["bbox"])) for r in results]
    unknown_img = {r["image_id"] for r in res} - set(gt.imgs)
    if unknown_img:
        raise ValueError(f"{len(unknown_img)} result image id(s) are not in the ground truth "
                         f"({len(gt.imgs)} images): {sorted(unknown_img, key=repr)[:5]}")
    unknown_cat = {r["category_id"] for r in res} - set(gt.cats)
    if unknown_cat:
        raise ValueError(f"result category ids {sorted(unknown_cat)} are not in the ground truth "
                         f"(ids {sorted(gt.cats)}); were labels mapped back with cat_ids?")
    return res


def _empty_res(gt: COCO) -> COCO:
    """A result set with no detections (``loadRes([])`` crashes on ``anns[0]``)."""
    res = COCO()
    res.dataset = {"images": list(gt.dataset.get("images", [])),
                   "categories": copy.deepcopy(gt.dataset.get("categories", [])), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def run_cocoeval(gt: COCO, results: Sequence[Mapping[str, Any]], img_ids: Sequence[int], *, iou_type: str = "bbox",
                 backend: str = "pycocotools", iou_thrs: Optional[Sequence[float]] = None) -> Any:
    """``COCOeval`` evaluated and accumulated on ``img_ids`` by ``backend`` (quietly).

    Args:
        gt: the ground truth (never modified beyond pycocotools' own ``ignore`` flags).
        results: validated detections (``to_coco_results`` format; may be empty); copied, never modified.
        img_ids: the images to evaluate (non-empty).
        iou_thrs: IoU thresholds (default COCO's 0.50:0.05:0.95).

    Returns:
        The evaluator: ``.eval["precision"]`` ``[T iou, R=101 recall points, K categories, A=4 areas,
        M=3 maxDets]`` and ``.eval["recall"]`` ``[T, K, A, M]`` (-1 = undefined), ``.params``;
        ``summarize()`` prints pycocotools' table and sets ``.stats``.
    """
    require_backend(backend)
    res = [dict(r, bbox=list(r["bbox"])) for r in results]  # loadRes writes area/id/iscrowd into them
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster":
            from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster

            fgt = FasterCOCO()  # the same annotations, copied: its _prepare writes "ignore" into them
            fgt.dataset = dict(gt.dataset, annotations=[dict(a) for a in gt.dataset.get("annotations", [])])
            fgt.createIndex()
            ev = COCOeval_faster(fgt, fgt.loadRes(res), iouType=iou_type, print_function=print)
        else:
            ev = COCOeval(gt, gt.loadRes(res) if res else _empty_res(gt), iouType=iou_type)
        ev.params.imgIds = list(img_ids)
        if iou_thrs is not None:
            ev.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
    return ev


def coco_evaluate(
    coco_gt_or_json: Union[COCO, str, os.PathLike, Mapping[str, Any]],
    results: Union[Sequence[Mapping[str, Any]], str, os.PathLike],
    *,
    class_names: Optional[Sequence[str]] = None,
    iou_type: str = "bbox",
    img_ids: Optional[Iterable[int]] = None,
    backend: str = "pycocotools",
) -> Dict[str, Any]:
    """Run ``COCOeval`` (pycocotools', or faster-coco-eval's: ``backend``) and name its numbers.

    Args:
        coco_gt_or_json: ground truth as ``COCO``, json path or dict (crowd boxes included).
        results: ``to_coco_results`` output (or a path to such a json); may be empty.
        class_names: names in category-id order (default: the json's names).
        iou_type: ``"bbox"`` (or ``"segm"`` when results carry segmentations).
        img_ids: evaluate only these images (e.g. a subset run); default all images in the gt.
        backend: ``"pycocotools"`` (the reference) or ``"faster"`` (faster-coco-eval, the ``eval`` extra).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}``
        floats (-1 = undefined, see module docstring), ``"per_class_AP"`` ``{name: AP@[.5:.95]}``,
        ``"per_class_AP50"`` and ``"per_class_recall"`` (the share of the class's ground truth found at
        IoU 0.5 with up to 100 detections per image), ``"coco_backend"``, ``"note"``
        (:data:`UNDEFINED_NOTE`) and ``"summary"``, pycocotools' printed table plus a per-class table and
        the note, for the caller to print.

    Raises:
        ValueError: detections or ``img_ids`` naming images (or categories) not in the ground truth, an
            unknown backend. CocoBackendMissing: ``backend="faster"`` without its package.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    require_backend(backend)
    gt = load_coco_gt(coco_gt_or_json)
    cat_ids = sorted(gt.cats)
    if class_names is None:
        class_names = [str(gt.cats[c].get("name", c)) for c in cat_ids]
    elif len(class_names) != len(cat_ids):
        raise ValueError(f"{len(class_names)} class names for {len(cat_ids)} categories")
    res_list = _load_results(gt, results)
    eval_ids = sorted(gt.imgs) if img_ids is None else sorted({int(i) for i in img_ids})
    unknown = sorted(set(eval_ids) - set(gt.imgs))
    if unknown:
        raise ValueError(f"img_ids {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not in the ground truth")

    stats = dict.fromkeys(STAT_NAMES, UNDEFINED)
    per_class = {key: {str(n): UNDEFINED for n in class_names}
                 for key in ("per_class_AP", "per_class_AP50", "per_class_recall")}
    tail = {"coco_backend": backend, "note": UNDEFINED_NOTE}
    if not eval_ids or not cat_ids:
        summary = (f"COCO eval: no images or no categories to evaluate ({len(eval_ids)} images, {len(cat_ids)} "
                   f"categories); all stats -1\n{UNDEFINED_NOTE}")
        return {**stats, **per_class, **tail, "summary": summary}

    ev = run_cocoeval(gt, res_list, eval_ids, iou_type=iou_type, backend=backend)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}

    # precision: [T iou thresholds, R recall points, K categories, A area ranges, M max dets]; recall: [T, K, A, M]
    precision, recall = ev.eval["precision"], ev.eval["recall"]
    i50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    for k, name in enumerate(class_names):
        for key, p in (("per_class_AP", precision[:, :, k, _AREA_ALL, _MAX_DETS_LARGEST]),
                       ("per_class_AP50", precision[i50, :, k, _AREA_ALL, _MAX_DETS_LARGEST]),
                       ("per_class_recall", recall[i50, k, _AREA_ALL, _MAX_DETS_LARGEST])):
            per_class[key][str(name)] = float(p[p > UNDEFINED].mean()) if (p > UNDEFINED).any() else UNDEFINED
    width = max([len(str(n)) for n in class_names] + [5])
    lines = [buf.getvalue().rstrip(), "", f"{'class':<{width}}  AP@[.5:.95]   AP50  recall@.5"]
    for n, v in per_class["per_class_AP"].items():
        lines.append(f"{n:<{width}}  {v:11.3f}  {per_class['per_class_AP50'][n]:5.3f}  "
                     f"{per_class['per_class_recall'][n]:9.3f}" if v >= 0 else f"{n:<{width}}  -1 (no ground truth)")
    lines += ["", f"(COCO backend: {backend})", UNDEFINED_NOTE]
    return {**stats, **per_class, **tail, "summary": "\n".join(lines)}


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_detections_json(results: Sequence[Mapping[str, Any]], path: Union[str, os.PathLike]) -> Path:
    """Write detections (``to_coco_results`` format) to ``path`` atomically (temp file + rename).

    A reader never sees a half-written file, and a crash leaves the previous file intact. Tensor and
    numpy scalars are converted to python numbers. Note that pycocotools' ``loadRes`` cannot read an
    empty list (``anns[0]``); ``coco_evaluate`` accepts one.
    """
    return atomic_write_json(list(results), path, default=_jsonable)


def gather_results(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Collect detections from every DDP rank (all ranks get the full list); no-op when not distributed.

    A ``DistributedSampler`` pads the last shard by repeating images, so the same image can be
    evaluated on two ranks; its detections are kept from the first rank only (duplicates would
    count as false positives).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(results)
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(results))
    merged: List[Dict[str, Any]] = []
    seen: set = set()
    for rank_results in gathered:
        ids = {r["image_id"] for r in rank_results}
        new = ids - seen
        merged.extend(r for r in rank_results if r["image_id"] in new)
        seen |= ids
    return merged
