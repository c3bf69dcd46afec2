"""Localization prediction: an image in, the top-k classes each with its box in original pixels out.

    pred = LocalizationPredictor.from_files("runs/loc/checkpoint_best.pt", topk=1)
    r = pred("bird.jpg")
    r.names[0], r.scores[0], r.boxes[0]      # 'bird', 0.87, tensor([x1, y1, x2, y2]) in the image's pixels

Preprocessing is evaluation's (:func:`res_backbone.data.localization.build_loc_eval_transforms`: the image
warped to ``image_size`` x ``image_size``, normalised). An eager localizer answers through its own
``predict`` (the crop pass included); an exported one through its outputs ``{"logits", "boxes"}``
(:func:`heads.localization.model.topk_predictions`). Several models average their class probabilities and
per-class boxes. Boxes come back normalised and are scaled by the image's width and height.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch

from res_backbone.data.localization import build_loc_eval_transforms
from res_backbone.engine.optim_step import autocast

from ..classification.predictor import ClassificationResult
from ..predictor import Item, Predictor
from .model import topk_predictions

__all__ = ["LocalizationPredictor"]


class LocalizationPredictor(Predictor):
    """Top-k classes and their boxes of a localizer (or an ensemble) on any image.

    Results are :class:`~heads.classification.predictor.ClassificationResult` with ``boxes`` ``(k, 4)``
    float64 xyxy original pixels.

    Args:
        models, meta, device, amp, batch_size, workers, fast, eager, channels_last: see
            :class:`heads.predictor.Predictor`.
        topk: classes per image (capped at K); image_size: the square side (default ``meta["image_size"]``).
    """

    task = "localization"

    def __init__(self, models, meta: Dict[str, Any], *, topk: int = 5, image_size: Optional[int] = None, **kwargs):
        super().__init__(models, meta, **kwargs)
        self.topk = max(1, min(int(topk), int(meta["num_classes"])))
        self.pipeline = build_loc_eval_transforms(int(image_size or meta["image_size"]), meta["mean"], meta["std"])

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        return self.pipeline(image=image, bboxes=np.zeros((0, 4), np.float32), labels=[])["image"]

    def class_outputs(self, batch: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``probs`` ``(B, K)`` and ``class_boxes`` ``(B, K, 4)`` normalised xyxy, averaged over the models."""
        probs, boxes = [], []
        k = int(self.meta["num_classes"])
        for model, eager in zip(self.models, self.eager):
            if eager and hasattr(model, "predict"):
                with torch.no_grad(), autocast(self.device, self.amp):
                    out = model.predict(batch.to(self.device), k)  # its own scores (crop pass included)
            else:
                raw = self.forward(model, batch)
                out = topk_predictions({"logits": raw["logits"].float(), "boxes": raw["boxes"]}, k)
            p = torch.zeros(out["scores"].shape, dtype=torch.float32).scatter_(1, out["classes"].cpu(),
                                                                                out["scores"].float().cpu())
            probs.append(p)
            boxes.append(out["class_boxes"].float().cpu())
        return {"probs": torch.stack(probs).mean(0), "class_boxes": torch.stack(boxes).mean(0)}

    def run_batch(self, prepared: List[torch.Tensor], items: List[Item], images) -> List[ClassificationResult]:
        out = self.class_outputs(torch.stack(prepared))
        scores, labels = out["probs"].topk(self.topk, dim=-1)
        results = []
        for i, (lab, s, im, it) in enumerate(zip(labels, scores, images, items)):
            H, W = im.shape[:2]
            boxes = out["class_boxes"][i, lab].double() * torch.tensor([W, H, W, H], dtype=torch.float64)
            results.append(ClassificationResult(lab, s, self.meta["class_names"], self.meta.get("cat_ids"), (H, W),
                                                it.path, it.frame, boxes=boxes))
        return results
