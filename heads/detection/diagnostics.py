"""Detector diagnostics: RPN recall of the proposals, plus the task-agnostic report of
:mod:`res_backbone.evaluation.diagnostics` (error breakdown, confusion matrix, PR curves, worst images).

``tools/eval_det.py --diagnostics`` and ``tools/train_det.py --diagnostics`` call :func:`diagnose`, which
writes into the evaluation folder ``pr_curves.png``, ``confusion.png`` + ``confusion.json``,
``diagnostics.json`` (error breakdown with how each part was computed, RPN recall, worst images) and
``worst/*.png`` (ground truth dashed green, predictions coloured by class); ``docs/diagnostics.md``.

**RPN recall**: the share of non-crowd ground-truth boxes that the first ``n`` proposals of their image
(best first, the RPN's post-NMS order) cover at IoU >= ``t``, matched one to one, greedily (the best-covered
box first, as Detectron's proposal evaluation), for ``n`` in 100/300/1000 and ``t`` in 0.5/0.7, per COCO size
bucket (the annotation's ``area``: small < 32², medium < 96², large). The RPN runs as evaluation runs it,
except that it keeps ``max(n)`` proposals per image after NMS (the per-level pre-NMS count stays the model's).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from res_backbone.io import atomic_write_json
from res_backbone.evaluation.diagnostics import ERROR_TYPES, coco_diagnostics, write_diagnostics

__all__ = ["RPN_IOUS", "RPN_TOPS", "SIZE_BUCKETS", "diagnose", "diagnose_checkpoint", "greedy_covered", "proposal_recall",
           "report_text", "rpn_proposals", "rpn_recall"]

RPN_TOPS = (100, 300, 1000)
RPN_IOUS = (0.5, 0.7)
SIZE_BUCKETS = {"all": (0.0, math.inf), "small": (0.0, 32.0 ** 2), "medium": (32.0 ** 2, 96.0 ** 2),
                "large": (96.0 ** 2, math.inf)}  # COCO's area ranges


def greedy_covered(iou: torch.Tensor) -> torch.Tensor:
    """Per ground-truth box (rows of ``iou`` ``(G, P)``), the IoU of the proposal it gets in a one-to-one
    greedy matching: repeatedly the best-covered box takes its best proposal, and both leave."""
    iou = iou.clone().float()
    got = torch.zeros(iou.shape[0])
    for _ in range(min(iou.shape)):
        best, col = iou.max(dim=1)
        g = int(best.argmax())
        if best[g] < 0:
            break
        got[g] = best[g]
        iou[g, :], iou[:, col[g]] = -1.0, -1.0
    return got


def proposal_recall(proposals: Sequence[torch.Tensor], gt_boxes: Sequence[torch.Tensor],
                    gt_areas: Sequence[Sequence[float]], *, tops: Sequence[int] = RPN_TOPS,
                    ious: Sequence[float] = RPN_IOUS) -> Dict[str, Any]:
    """Recall of proposals against ground truth, per proposal count, IoU and size bucket.

    Args:
        proposals: per image ``(P, 4)`` ``xyxy`` best first; gt_boxes: per image ``(G, 4)`` ``xyxy``, same pixels.
        gt_areas: per image the ``G`` areas that choose the size bucket (COCO's ``area``).

    Returns:
        ``{"gt_boxes": {bucket: n}, "recall": {"100": {"0.5": {bucket: r}}, ...}}``; -1 where a bucket has no box.
    """
    found = {n: {t: dict.fromkeys(SIZE_BUCKETS, 0) for t in ious} for n in tops}
    total = dict.fromkeys(SIZE_BUCKETS, 0)
    for props, gts, areas in zip(proposals, gt_boxes, gt_areas):
        areas = np.asarray(areas, np.float64).reshape(-1)
        masks = {b: (areas >= lo) & (areas < hi) for b, (lo, hi) in SIZE_BUCKETS.items()}
        for b, m in masks.items():
            total[b] += int(m.sum())
        if not len(gts):
            continue
        iou_all = box_iou(gts.double().reshape(-1, 4), props.double().reshape(-1, 4))
        for n in tops:
            got = greedy_covered(iou_all[:, :n]).numpy()
            for t in ious:
                for b, m in masks.items():
                    found[n][t][b] += int(((got >= t) & m).sum())
    return {"gt_boxes": total,
            "recall": {str(n): {str(t): {b: found[n][t][b] / total[b] if total[b] else -1.0 for b in SIZE_BUCKETS}
                                for t in ious} for n in tops}}


def rpn_proposals(model, images: torch.Tensor, sizes: Sequence[Sequence[int]], top_n: int) -> List[torch.Tensor]:
    """The proposals of an eval-mode :class:`~heads.detection.faster_rcnn.FasterRCNN` on a preprocessed batch:
    per image ``(P <= top_n, 4)`` ``xyxy`` in the batch's pixels, best first (``top_n`` kept after NMS)."""
    rpn = model.rpn
    saved = rpn.post_nms_top_n["test"]
    rpn.post_nms_top_n["test"] = int(top_n)
    try:
        if model.input_memory_format is not None:
            images = images.contiguous(memory_format=model.input_memory_format)
        (boxes, index), _ = rpn(model.backbone(images), model._sizes_tensor(sizes, images.device))
    finally:
        rpn.post_nms_top_n["test"] = saved
    return [boxes[index == i].float().cpu() for i in range(images.shape[0])]


def rpn_recall(predictor, dataset, *, tops: Sequence[int] = RPN_TOPS, ious: Sequence[float] = RPN_IOUS,
               progress: bool = False) -> Dict[str, Any]:
    """RPN recall (module docstring) of the predictor's first model on a COCO dataset (a
    :class:`res_backbone.data.CocoDetection`), preprocessed as evaluation does.

    Returns:
        :func:`proposal_recall`'s dict plus ``"proposals_kept"`` (the model's own post-NMS count), or
        ``{"skipped": reason}`` for a model whose proposals cannot be read (an exported file).
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from res_backbone.data import build_eval_transforms, collate_detection

    model = predictor.models[0]
    if not hasattr(model, "rpn") or not hasattr(model, "backbone"):
        return {"skipped": f"{type(model).__name__}: an exported detector hides its proposals; pass a checkpoint"}
    transforms, dataset.transforms = dataset.transforms, build_eval_transforms(
        predictor.scales[0], predictor.meta["mean"], predictor.meta["std"])
    loader = DataLoader(dataset, batch_size=predictor.batch_size, num_workers=predictor.workers,
                        collate_fn=collate_detection)
    proposals, gt_boxes, gt_areas = [], [], []
    try:
        for images, sizes, targets in tqdm(loader, desc="rpn recall", unit="batch", disable=not progress,
                                           leave=False):
            props = predictor.forward(lambda x, s: rpn_proposals(model, x, s, max(tops)), images, list(sizes))
            for p, tgt in zip(props, targets):
                anns = [a for a in dataset.original_annotations(tgt["image_id"]) if not a.get("iscrowd", 0)]
                xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
                gt_boxes.append(torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), dim=1))
                gt_areas.append([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns])
                proposals.append(p.double() / float(tgt["scale"]))  # back to the json's pixels
    finally:
        dataset.transforms = transforms
    out = proposal_recall(proposals, gt_boxes, gt_areas, tops=tops, ious=ious)
    out["proposals_kept"] = int(model.rpn.post_nms_top_n["test"])
    out["how_computed"] = __doc__.split("**RPN recall**: ")[1].strip().replace("\n", " ")
    return out


def diagnose(predictor, dataset, results: List[Dict[str, Any]], val_json, out_dir, *, score_thresh: float = 0.5,
             backend: str = "pycocotools", num_worst: int = 8, per_class_ap: Optional[Mapping[str, float]] = None,
             progress: bool = False) -> Dict[str, Any]:
    """Every diagnostic of a detector's evaluation, written into ``out_dir`` (module docstring).

    Args:
        predictor: the :class:`~heads.detection.predictor.DetectionPredictor` that produced ``results``.
        dataset: the evaluated :class:`res_backbone.data.CocoDetection` (of ``val_json``).
        results: its detections (COCO results records, original pixels and category ids).
        score_thresh: of the confusion matrix and the worst images.
        backend: COCO backend of the error breakdown's re-runs.
        per_class_ap: class -> AP for the PR curves' titles (``coco_evaluate``'s ``per_class_AP``).

    Returns:
        :func:`res_backbone.evaluation.diagnostics.coco_diagnostics`'s dict plus ``"rpn_recall"`` and
        ``"pictures"`` (the worst images drawn).
    """
    from .train import DetData, write_pictures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not len(dataset) or not dataset.cat_ids:  # nothing to diagnose; the metrics said so already (all -1)
        reason = f"{val_json}: no images or no categories to diagnose"
        atomic_write_json({"skipped": reason}, out / "diagnostics.json", indent=2)
        return {"skipped": reason}
    diag = coco_diagnostics(val_json, results, score_thresh=score_thresh, backend=backend, num_worst=num_worst)
    diag["rpn_recall"] = rpn_recall(predictor, dataset, progress=progress)
    write_diagnostics(diag, out, per_class_ap, extra={"rpn_recall": diag["rpn_recall"]})
    data = DetData(dataset, dataset, None, None, None, str(val_json), list(dataset.cat_ids),
                   list(dataset.class_names))
    pictures = []
    for key, tag in (("missed", "missed"), ("false_positives", "fp")):
        rows = diag["worst"][key]
        pictures += write_pictures(data, results, out / "worst", len(rows), score_thresh,
                                   image_ids=[r["image_id"] for r in rows],
                                   names=[f"{tag}_{i + 1:02d}_{r['image_id']}" for i, r in enumerate(rows)])
    diag["pictures"] = [str(p) for p in pictures]
    return diag


def diagnose_checkpoint(checkpoint, val_json, val_images, detections_json, out_dir, *, device: str = "cpu",
                        amp: str = "none", batch_size: int = 4, workers: int = 2, **kwargs) -> Dict[str, Any]:
    """:func:`diagnose` of a finished run: the checkpoint, its validation data and the ``detections.json``
    its evaluation wrote (what ``tools/train_det.py --diagnostics`` calls); ``kwargs`` go to :func:`diagnose`."""
    import json

    from res_backbone.data import CocoDetection

    from .predictor import DetectionPredictor

    predictor = DetectionPredictor.from_files([checkpoint], device=device, amp=amp, batch_size=batch_size,
                                              workers=workers)
    with open(detections_json, "r", encoding="utf-8") as f:
        results = json.load(f)
    return diagnose(predictor, CocoDetection(val_json, val_images, None), results, val_json, out_dir, **kwargs)


def report_text(diag: Mapping[str, Any], out_dir) -> str:
    """The printed part of :func:`diagnose`: the error breakdown and the RPN recall as short tables."""
    if "skipped" in diag:
        return f"Diagnostics skipped: {diag['skipped']}"
    tide = diag["tide"]
    lines = [f"Error breakdown (TIDE, AP50 {tide['AP50']:.3f}; AP50 gained if each error type were fixed):",
             "  " + "  ".join(f"{k:>6}" for k in ERROR_TYPES),
             "  " + "  ".join(f"{tide['dAP50'][k]:6.3f}" for k in ERROR_TYPES),
             "  " + "  ".join(f"{tide['counts'][k]:6d}" for k in ERROR_TYPES) + "   (count)"]
    rpn = diag.get("rpn_recall", {})
    if "recall" in rpn:
        buckets = list(SIZE_BUCKETS)
        lines += ["", f"RPN recall ({rpn['gt_boxes']['all']} boxes; model keeps {rpn['proposals_kept']} proposals):",
                  f"  {'proposals':>9}  {'IoU':>4}  " + "  ".join(f"{b:>6}" for b in buckets)]
        for n, by_iou in rpn["recall"].items():
            for t, r in by_iou.items():
                lines.append(f"  {n:>9}  {t:>4}  " + "  ".join(f"{r[b]:6.3f}" if r[b] >= 0 else f"{'-':>6}"
                                                              for b in buckets))
    elif "skipped" in rpn:
        lines += ["", f"RPN recall skipped: {rpn['skipped']}"]
    lines += ["", f"confusion (score >= {diag['score_thresh']}): {Path(out_dir) / 'confusion.png'}; PR curves, "
                  f"diagnostics.json and worst/*.png in {out_dir}"]
    return "\n".join(lines)
