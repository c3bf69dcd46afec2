"""Evaluation of single-object localization: prediction over a split, the ILSVRC metrics and the pictures;
and :class:`LossAdapter`, the loss behind the detection loop's protocol.

The model is duck-typed: ``model(images) -> {"logits", "boxes"}`` and ``model.predict(images, k[, flip])
-> {"classes", "scores", "boxes", "class_boxes"}`` (``heads.localization``); batches are
``(images, image_sizes, targets)`` from :func:`~res_backbone.data.localization.collate_localization`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from res_backbone.data.localization import CocoLocalization, collate_localization
from res_backbone.evaluation.localization import localization_errors
from res_backbone.visualize import save_prediction_grid
from res_backbone.engine import checkpoint as ckpt_mod
from res_backbone.engine.det_loop import to_device
from res_backbone.engine.optim_step import autocast

__all__ = ["LossAdapter", "compute_metrics", "evaluate", "make_eval_loader", "predict_split", "top1_ious",
           "write_pictures"]


def make_eval_loader(dataset: CocoLocalization, batch_size: int, workers: int, seed: int = 0) -> DataLoader:
    """Batches of ``dataset`` in order (evaluation)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_localization, generator=torch.Generator().manual_seed(seed))


class LossAdapter(nn.Module):
    """``model`` + ``loss_fn`` behind the detection loop's protocol: ``(images, sizes, targets) -> losses``,
    so :func:`~.det_loop.train_one_epoch` (AMP, non-finite guard, logging, progress) trains localizers too."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Dict[str, torch.Tensor]]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, images: torch.Tensor, image_sizes, targets: Sequence[dict]) -> Dict[str, torch.Tensor]:
        labels = torch.tensor([t["label"] for t in targets], device=images.device)
        boxes = torch.stack([t["box"] for t in targets]).to(images.device)
        if getattr(self.model, "crop_size", 0):  # the crop pass trains on (jittered) ground-truth boxes
            return self.loss_fn(self.model(images, boxes), labels, boxes)
        return self.loss_fn(self.model(images), labels, boxes)


@torch.no_grad()
def predict_split(model: nn.Module, loader: DataLoader, *, device: torch.device, amp: str = "none",
                  channels_last: bool = False, k: int = 5, tta_flip: bool = False, progress=None) -> Dict[str, object]:
    """Run ``model.predict`` over ``loader`` (``tta_flip``: averaged with the mirrored images); return
    per-image predictions and ground truth on CPU.

    Returns:
        ``classes`` (N, k), ``scores`` (N, k), ``boxes`` (N, k, 4), ``known_boxes`` (N, 4) the box of the
        true class; ``labels`` (N,), ``gt_boxes`` / ``gt_labels`` (lists of N tensors), ``image_ids``;
        boxes normalised xyxy.
    """
    model.eval()
    parts: Dict[str, list] = {k_: [] for k_ in ("classes", "scores", "boxes", "known_boxes", "labels")}
    gt_boxes, gt_labels, image_ids = [], [], []
    for images, sizes, targets in loader:
        images, targets = to_device(images, targets, device, channels_last)
        with autocast(device, amp):
            pred = model.predict(images, k, flip=tta_flip) if tta_flip else model.predict(images, k)
        labels = torch.tensor([t["label"] for t in targets])
        parts["classes"].append(pred["classes"].cpu())
        parts["scores"].append(pred["scores"].float().cpu())
        parts["boxes"].append(pred["boxes"].float().cpu())
        parts["known_boxes"].append(pred["class_boxes"].float().cpu()[torch.arange(len(labels)), labels])
        parts["labels"].append(labels)
        gt_boxes += [t["gt_boxes"].cpu() for t in targets]
        gt_labels += [t["gt_labels"].cpu() for t in targets]
        image_ids += [t["image_id"] for t in targets]
        if progress is not None:
            progress.update(1)
    out: Dict[str, object] = {k_: torch.cat(v) for k_, v in parts.items()}
    out.update(gt_boxes=gt_boxes, gt_labels=gt_labels, image_ids=image_ids)
    return out


def compute_metrics(preds: Dict[str, object], class_names: Sequence[str]) -> Dict[str, object]:
    """:func:`~res_backbone.evaluation.localization.localization_errors` plus the top-1 localization
    error per class (percent)."""
    m = localization_errors(preds["classes"], preds["boxes"], preds["labels"], preds["gt_boxes"],
                            gt_box_labels_list=preds["gt_labels"], gt_known_boxes=preds["known_boxes"])
    labels = preds["labels"]
    per_class = {}
    for c, name in enumerate(class_names):
        sel = (labels == c).nonzero().flatten().tolist()
        if sel:
            per_class[name] = localization_errors(
                preds["classes"][sel, :1], preds["boxes"][sel, :1], labels[sel], [preds["gt_boxes"][i] for i in sel],
                k=(1,), gt_box_labels_list=[preds["gt_labels"][i] for i in sel])["top1_loc_err"]
    m["per_class_top1_loc_err"] = per_class
    return m


def top1_ious(preds: Dict[str, object]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image: the IoU of the top-1 box with the best ground-truth box of any class (what the pictures
    show), and whether the top-1 pair is correct by the ILSVRC rule (right class, IoU >= 0.5 with a box
    of that class)."""
    from torchvision.ops import box_iou

    n = len(preds["labels"])
    best, correct = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    for i, (gtb, gtl) in enumerate(zip(preds["gt_boxes"], preds["gt_labels"])):
        iou = box_iou(preds["boxes"][i, :1], gtb)[0]
        best[i] = iou.max()
        correct[i] = bool(((iou >= 0.5) & (gtl == preds["classes"][i, 0])).any())
    return best, correct


def write_pictures(dataset: CocoLocalization, preds: Dict[str, object], folder: Path, count: int) -> List[Path]:
    """``predictions/val.png`` (the first ``count`` val images) and ``predictions/errors.png`` (the first
    ``count`` top-1 localization errors): ground truth dashed green with its class, the top-1 prediction
    solid with class, score and IoU (with the best-matching ground-truth box, whatever its class)."""
    if count <= 0 or not preds["image_ids"]:
        return []
    ious, correct = top1_ious(preds)
    wrong = (~correct).nonzero().flatten().tolist()
    index_of = {image_id: i for i, image_id in enumerate(dataset.ids)}
    written = []
    for name, rows in (("val.png", list(range(len(ious)))[:count]), ("errors.png", wrong[:count])):
        if not rows:
            continue
        images, pred_dicts, gt_dicts = [], [], []
        for i in rows:
            image_id = preds["image_ids"][i]
            info = dataset.detection.coco.imgs[image_id]
            # Drawn on a copy enlarged to ~288 px (captions at the library's font size stay readable).
            zoom = max(1, round(288 / max(info["width"], info["height"])))
            with Image.open(dataset.image_path(index_of[image_id])) as im:
                images.append(im.convert("RGB").resize((info["width"] * zoom, info["height"] * zoom), Image.NEAREST))
            scale = torch.tensor([info["width"], info["height"]] * 2, dtype=torch.float32) * zoom
            c = int(preds["classes"][i, 0])
            pred_dicts.append({"boxes": preds["boxes"][i, :1] * scale, "labels": [c + 1],
                               "scores": preds["scores"][i, :1],
                               "captions": [f"{dataset.class_names[c]} {float(preds['scores'][i, 0]):.2f} "
                                            f"IoU {float(ious[i]):.2f}"]})
            gt_dicts.append({"boxes": preds["gt_boxes"][i] * scale, "labels": (preds["gt_labels"][i] + 1).tolist(),
                             "captions": [dataset.class_names[int(c_)] for c_ in preds["gt_labels"][i]]})
        written.append(save_prediction_grid(images, pred_dicts, gt_dicts, dataset.class_names, folder / name,
                                            score_thresh=0.0, ncols=4))
    return written


def evaluate(model: nn.Module, loader: DataLoader, dataset: CocoLocalization, *, device: torch.device,
             amp: str = "none", channels_last: bool = False, tta_flip: bool = False, metrics_path: Optional[Path] = None,
             pictures_dir: Optional[Path] = None, num_pictures: int = 16, progress: bool = True,
             extra: Optional[dict] = None) -> Dict[str, object]:
    """Predict on ``loader`` and compute the metrics (``extra`` entries added); write them to
    ``metrics_path`` and the pictures (:func:`write_pictures`) into ``pictures_dir`` when given."""
    from tqdm import tqdm

    bar = tqdm(total=len(loader), desc="eval", unit="batch", disable=not progress, leave=False)
    t0 = time.perf_counter()
    preds = predict_split(model, loader, device=device, amp=amp, channels_last=channels_last, tta_flip=tta_flip,
                          progress=bar)
    bar.close()
    metrics = compute_metrics(preds, dataset.class_names)
    metrics.update(eval_time_s=round(time.perf_counter() - t0, 2), skipped_empty=dataset.skipped_empty,
                   all_boxes=dataset.all_boxes, tta_flip=tta_flip, **(extra or {}))
    if metrics_path is not None:
        ckpt_mod.atomic_write_text(json.dumps(metrics, indent=2) + "\n", Path(metrics_path))
    if pictures_dir is not None:
        write_pictures(dataset, preds, Path(pictures_dir), num_pictures)
    return metrics
