"""Classification prediction: an image in, the top-k classes with their probabilities out.

    pred = ClassificationPredictor.from_files("runs/cls/checkpoint_best.pt", topk=3)
    r = pred("shoe.png")
    r.names, r.scores.tolist()          # ['Sneaker', 'Sandal', 'Ankle boot'], [0.91, 0.06, 0.01]

Preprocessing is evaluation's (:func:`res_backbone.data.cls_transforms.build_cls_transforms` with
``train=False``): the shorter side resized to ``image_size / crop_pct``, the centre ``image_size`` square cropped,
normalised with the model's mean/std; RGB turned into BT.601 luma for a one-channel model (its mean has one
value). Several models (an ensemble) average their softmax probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from res_backbone.data.classification import _to_channels
from res_backbone.data.cls_transforms import build_cls_transforms

from ..predictor import Item, Predictor

__all__ = ["ClassificationPredictor", "ClassificationResult"]


@dataclass
class ClassificationResult:
    """The top-k classes of one image, best first.

    Attributes:
        labels: ``(k,)`` int64 class indices ``0..K-1``; scores: ``(k,)`` float32 probabilities.
        class_names: the model's K names; cat_ids: their dataset ids (None for folder datasets).
        orig_size: ``(H, W)``; path, frame: where the image came from.
        boxes: ``(k, 4)`` float64 xyxy original pixels, the box of each class (localizers only).
    """

    labels: torch.Tensor
    scores: torch.Tensor
    class_names: List[str]
    cat_ids: Optional[List[int]]
    orig_size: tuple
    path: Optional[str] = None
    frame: Optional[int] = None
    boxes: Optional[torch.Tensor] = None
    image: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def names(self) -> List[str]:
        return [self.class_names[int(i)] for i in self.labels]

    @property
    def category_ids(self) -> List[int]:
        """Dataset category ids (COCO-trained models) or class indices (folder datasets)."""
        return [int(i) if self.cat_ids is None else self.cat_ids[int(i)] for i in self.labels]

    def to_records(self, image_id: Optional[int] = None) -> List[Dict[str, Any]]:
        """One record per image: ``file_name``, ``frame``, ``image_id`` (when known), the top class
        (``category_id``, ``category_name``, ``score``, ``bbox`` xywh for localizers) and ``topk``."""
        top = []
        for k, (cat, name, s) in enumerate(zip(self.category_ids, self.names, self.scores.tolist())):
            entry: Dict[str, Any] = {"category_id": cat, "category_name": name, "score": float(s)}
            if self.boxes is not None:
                x0, y0, x1, y1 = self.boxes[k].tolist()
                entry["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            top.append(entry)
        r: Dict[str, Any] = {"file_name": self.path}
        if self.frame is not None:
            r["frame"] = self.frame
        if image_id is not None:
            r["image_id"] = int(image_id)
        r.update(top[0] if top else {})
        r["topk"] = top
        return [r]

    def to_txt(self) -> str:
        """One line per class: ``category_id score name`` (plus ``x1 y1 x2 y2`` for localizers)."""
        lines = []
        for k, (cat, name, s) in enumerate(zip(self.category_ids, self.names, self.scores.tolist())):
            box = "" if self.boxes is None else " " + " ".join(f"{v:.2f}" for v in self.boxes[k].tolist())
            lines.append(f"{cat} {s:.4f}{box} {name}\n")
        return "".join(lines)

    def save(self, out_path, image: Optional[np.ndarray] = None):
        """Write ``image`` (default: the kept decoded image) as a PNG with the top classes written on it, in a frame
        around the image (classifiers) or on the top class's box (localizers)."""
        from pathlib import Path

        from res_backbone.visualize import render_detections

        image = self.image if image is None else image
        if image is None:
            raise ValueError("no image to draw on: pass image= (the stream yields the decoded image)")
        H, W = self.orig_size
        box = [0.0, 0.0, float(W - 1), float(H - 1)] if self.boxes is None else self.boxes[0].tolist()
        caption = ", ".join(f"{n} {s:.2f}" for n, s in zip(self.names[:3], self.scores.tolist()))
        pil = render_detections(image, [box], [int(self.labels[0]) + 1], [float(self.scores[0])], [], [],
                                self.class_names, score_thresh=0.0, upscale=max(1, round(480 / max(H, W))),
                                pred_captions=[caption])
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        pil.save(out, format="PNG")
        return out


class ClassificationPredictor(Predictor):
    """Top-k classes of a classifier (or an ensemble) on any image.

    Args:
        models, meta, device, amp, batch_size, workers, fast, eager, channels_last: see
            :class:`heads.predictor.Predictor`.
        topk: how many classes per image (capped at K).
        image_size: the crop side (default ``meta["image_size"]``); crop_pct: crop / resize (default: the
            checkpoint's ``pretrained_cfg``, else 0.875); the resize interpolation is the checkpoint's too.
    """

    task = "classification"

    def __init__(self, models, meta: Dict[str, Any], *, topk: int = 5, image_size: Optional[int] = None,
                 crop_pct: Optional[float] = None, **kwargs):
        super().__init__(models, meta, **kwargs)
        self.topk = max(1, min(int(topk), int(meta["num_classes"])))
        crop = int(image_size or meta["image_size"])
        pct = float(crop_pct or meta.get("crop_pct") or 0.875)
        self.in_chans = len(meta["mean"])
        self.pipeline = build_cls_transforms(train=False, mean=meta["mean"], std=meta["std"],
                                             resize=int(round(crop / pct)), crop=crop,
                                             interpolation=meta.get("interpolation") or "bilinear")

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        x = _to_channels(torch.from_numpy(image).permute(2, 0, 1), self.in_chans, "image")
        return self.pipeline(x)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` softmax probabilities, averaged over the ensemble."""
        return torch.stack([self.forward(m, batch).float().softmax(-1).cpu() for m in self.models]).mean(0)

    def run_batch(self, prepared: List[torch.Tensor], items: List[Item], images) -> List[ClassificationResult]:
        probs = self.probabilities(torch.stack(prepared))
        scores, labels = probs.topk(self.topk, dim=-1)
        return [ClassificationResult(lab, s, self.meta["class_names"], self.meta.get("cat_ids"), im.shape[:2],
                                     it.path, it.frame) for lab, s, im, it in zip(labels, scores, images, items)]
