"""Detection prediction: an image in, boxes in its own pixels with the dataset's category ids and names out.

The one path from a batch to detections that training-time evaluation (``heads.detection.train.evaluate``),
``tools/eval_det.py`` and ``tools/predict.py`` share, so they cannot disagree::

    pred = DetectionPredictor.from_files(["runs/demo/checkpoint_best.pt"], score_thresh=0.3)
    det = pred("street.jpg")
    det.boxes, det.scores, det.category_ids, det.names     # (N, 4) xyxy original pixels, (N,), [N], [N]
    det.to_coco(image_id=42); det.save("street_boxes.png")

Preprocessing is evaluation's: :func:`res_backbone.data.build_eval_transforms` (longer side to ``image_size``,
normalise with the model's mean/std) and :func:`res_backbone.data.collate.pad_images` (zero-pad bottom/right to
a multiple of 32). Boxes go back to original pixels by the resize scale (``h / H``, as the COCO reader records it)
and are clipped to the image. Test-time augmentation (several ``tta_scales``, ``tta_flip``) and ensembles (several
models) give several detection sets per image, merged per class by NMS or weighted box fusion
(:func:`~heads.detection.ensemble.merge_detections`). ``slice_size`` turns on sliced prediction
(:mod:`heads.detection.slicing`) for images far larger than the training size.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from res_backbone.data import build_eval_transforms
from res_backbone.data.collate import pad_images

from ..predictor import Item, Predictor
from .ensemble import flip_batch, merge_detections, unflip_boxes

__all__ = ["DetectionPredictor", "DetectionResult", "predict_coco", "resolve_classes", "to_original"]

Part = Dict[str, torch.Tensor]  # {"boxes": (N, 4) xyxy, "scores": (N,), "labels": (N,) in 1..K}


@dataclass
class DetectionResult:
    """The detections of one image, best first.

    Attributes:
        boxes: ``(N, 4)`` float64 ``xyxy`` in the original image's pixels.
        scores: ``(N,)`` float32.
        labels: ``(N,)`` int64 in ``1..K`` (the model's classes).
        cat_ids, class_names: the model's category ids and names in label order (``cat_ids[label - 1]``).
        orig_size: ``(H, W)`` of the image.
        path, frame: where the image came from (a file, a video frame), when known.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    cat_ids: List[int]
    class_names: List[str]
    orig_size: Tuple[int, int]
    path: Optional[str] = None
    frame: Optional[int] = None
    image: Optional[np.ndarray] = field(default=None, repr=False)  # the decoded image (predictor calls set it)

    def __len__(self) -> int:
        return int(self.scores.numel())

    @property
    def category_ids(self) -> List[int]:
        """The dataset's category id of each detection."""
        return [self.cat_ids[int(lab) - 1] for lab in self.labels]

    @property
    def names(self) -> List[str]:
        """The class name of each detection."""
        return [self.class_names[int(lab) - 1] for lab in self.labels]

    def to_coco(self, image_id: int) -> List[Dict[str, Any]]:
        """COCO results records (``image_id``, ``category_id``, ``bbox`` ``xywh``, ``score``) for ``loadRes``."""
        from res_backbone.evaluation.coco import to_coco_results

        out = {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}
        return to_coco_results([out], [{"image_id": int(image_id)}], self.cat_ids)

    def to_records(self, image_id: Optional[int] = None) -> List[Dict[str, Any]]:
        """One JSON record per detection: ``file_name``, ``frame`` (videos), ``category_id``, ``category_name``,
        ``bbox`` (COCO ``xywh`` original pixels), ``score``; ``image_id`` when given (COCO files)."""
        records = []
        for (x0, y0, x1, y1), s, cat, name in zip(self.boxes.tolist(), self.scores.tolist(), self.category_ids,
                                                  self.names):
            r: Dict[str, Any] = {"file_name": self.path}
            if self.frame is not None:
                r["frame"] = self.frame
            if image_id is not None:
                r["image_id"] = int(image_id)
            r.update(category_id=cat, category_name=name, bbox=[x0, y0, x1 - x0, y1 - y0], score=float(s))
            records.append(r)
        return records

    def to_txt(self) -> str:
        """One line per detection: ``category_id x1 y1 x2 y2 score`` (original pixels)."""
        return "".join(f"{cat} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f} {s:.4f}\n"
                       for cat, b, s in zip(self.category_ids, self.boxes.tolist(), self.scores.tolist()))

    def save(self, out_path, image: Optional[np.ndarray] = None, score_thresh: float = 0.0):
        """Draw the boxes scoring ``score_thresh`` or more (coloured by class, with names and scores) on ``image``
        (default: the decoded image kept by the predictor call; small images magnified) and write a PNG to
        ``out_path``."""
        from res_backbone.visualize import draw_detections

        image = self.image if image is None else image
        if image is None:
            raise ValueError("no image to draw on: pass image= (the stream yields the decoded image)")
        return draw_detections(image, self.boxes.tolist(), self.labels.tolist(), self.scores.tolist(), [], [],
                               self.class_names, out_path, score_thresh=score_thresh,
                               upscale=max(1, round(480 / max(self.orig_size))))  # small images stay readable


def to_original(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, scale: float,
                orig_size: Sequence[int]) -> Part:
    """Boxes in resized pixels -> original pixels (``/ scale``, float64, clipped to ``orig_size`` ``(H, W)``),
    the arithmetic of :func:`res_backbone.evaluation.coco.to_coco_results`."""
    b = boxes.double().reshape(-1, 4) / float(scale)
    H, W = (float(v) for v in orig_size)
    b[:, 0::2] = b[:, 0::2].clip(0.0, W)
    b[:, 1::2] = b[:, 1::2].clip(0.0, H)
    return {"boxes": b, "scores": scores.float().reshape(-1), "labels": labels.long().reshape(-1)}


def resolve_classes(classes: Optional[Sequence[Union[int, str]]], cat_ids: Sequence[int],
                    class_names: Sequence[str]) -> Optional[List[int]]:
    """Class names or category ids -> the model labels to keep (None: all).

    Raises:
        ValueError: naming an unknown class and listing the known ones.
    """
    if not classes:
        return None
    labels = []
    for c in classes:
        s = str(c)
        if s in class_names:
            labels.append(list(class_names).index(s) + 1)
        elif s.lstrip("-").isdigit() and int(s) in list(cat_ids):
            labels.append(list(cat_ids).index(int(s)) + 1)
        else:
            known = ", ".join(f"{n} ({i})" for n, i in zip(class_names, cat_ids))
            raise ValueError(f"unknown class {s!r}; the model's classes (category id) are: {known}")
    return sorted(set(labels))


class DetectionPredictor(Predictor):
    """Detections of a detector (or an ensemble) on any image, in original pixels and category ids.

    Args:
        models, meta, device, amp, batch_size, workers, fast, eager, channels_last: see
            :class:`heads.predictor.Predictor`.
        image_size: the longer side images are resized to (default: the training size, ``meta["image_size"]``).
        tta_scales: several longer sides to predict at (test-time augmentation; overrides ``image_size``).
        tta_flip: also predict the mirrored images.
        merge, merge_iou: how several variants' detections are merged (``"nms"`` or ``"wbf"``) and at what IoU.
        score_thresh: drop detections scoring below (the model's own threshold applies first).
        classes: keep only these classes (names or category ids).
        max_dets: keep the best ``max_dets`` per image (default: all the model returns; 100 after merging
            several variants, as :func:`~heads.detection.ensemble.merge_detections`).
        slice_size, slice_overlap, slice_full: sliced prediction (:mod:`heads.detection.slicing`): square tiles
            of ``slice_size`` original pixels overlapping by the fraction ``slice_overlap``, plus one pass over
            the whole image when ``slice_full``.
    """

    task = "detection"

    def __init__(self, models, meta: Dict[str, Any], *, image_size: Optional[int] = None,
                 tta_scales: Optional[Sequence[int]] = None, tta_flip: bool = False, merge: str = "nms",
                 merge_iou: float = 0.55, score_thresh: float = 0.0, classes: Optional[Sequence] = None,
                 max_dets: Optional[int] = None, slice_size: Optional[int] = None, slice_overlap: float = 0.2,
                 slice_full: bool = False, **kwargs):
        super().__init__(models, meta, **kwargs)
        if merge not in ("nms", "wbf"):
            raise ValueError(f"merge must be 'nms' or 'wbf', got {merge!r}")
        self.scales = [int(s) for s in (tta_scales or [image_size or meta["image_size"]])]
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"image sizes must be positive, got {self.scales}")
        self.flips = (False, True) if tta_flip else (False,)
        self.merge, self.merge_iou = merge, float(merge_iou)
        self.score_thresh = float(score_thresh)
        self.cat_ids = [int(c) for c in meta["cat_ids"]]
        self.class_names = [str(n) for n in meta["class_names"]]
        self.keep_labels = resolve_classes(classes, self.cat_ids, self.class_names)
        self.max_dets = max_dets
        self.slicer = None
        if slice_size and len(self.scales) > 1:
            raise ValueError("sliced prediction predicts every tile at one size: give --slice without --tta-scales "
                             "(--tta-flip and ensembles work with it)")
        if slice_size:
            from .slicing import Slicer

            self.slicer = Slicer(int(slice_size), float(slice_overlap), full=slice_full)
        self._local = threading.local()  # one albumentations pipeline per decoding thread

    @property
    def n_variants(self) -> int:
        return len(self.models) * len(self.scales) * len(self.flips)

    # ------------------------------------------------------------------ preprocessing (decoding threads)
    def transform(self, image: np.ndarray, size: int) -> Tuple[torch.Tensor, float]:
        """``(H, W, 3)`` uint8 RGB -> ``((3, h, w)`` normalised float tensor, ``h / H``) at longer side ``size``."""
        cache = getattr(self._local, "transforms", None)
        if cache is None:
            cache = self._local.transforms = {}
        if size not in cache:
            cache[size] = build_eval_transforms(size, self.meta["mean"], self.meta["std"])
        tensor = cache[size](image=image, bboxes=np.zeros((0, 4), np.float32), labels=[])["image"]
        if isinstance(tensor, np.ndarray):
            tensor = torch.from_numpy(np.ascontiguousarray(tensor.transpose(2, 0, 1)))
        return tensor.float(), int(tensor.shape[-2]) / image.shape[0]

    def prepare(self, image: np.ndarray) -> Any:
        if self.slicer is not None:
            return self.slicer.prepare(self, image)
        return [self.transform(image, s) for s in self.scales]

    def batch_cost(self, prepared: Any) -> int:
        return self.slicer.cost(prepared) if self.slicer is not None else 1

    # ------------------------------------------------------------------ the model
    def run_variants(self, images: torch.Tensor, sizes: Sequence[Tuple[int, int]], scales: Sequence[float],
                     orig_sizes: Sequence[Sequence[int]]) -> List[List[Part]]:
        """Every model and flip on one preprocessed batch.

        Args:
            images: ``(B, 3, Hp, Wp)`` normalised, zero-padded bottom/right.
            sizes: ``(h, w)`` of each image before padding.
            scales: ``h / H`` of each image; orig_sizes: ``(H, W)`` of each original image.

        Returns:
            Per image, one detection set per (model, flip), boxes in original pixels.
        """
        parts: List[List[Part]] = [[] for _ in sizes]
        for model in self.models:
            for flip in self.flips:
                outs = self.forward(model, flip_batch(images, sizes) if flip else images, list(sizes))
                for i, out in enumerate(outs):
                    boxes = out["boxes"].float().cpu()
                    if flip:
                        boxes = unflip_boxes(boxes, sizes[i][1])
                    parts[i].append(to_original(boxes, out["scores"].cpu(), out["labels"].cpu(), scales[i],
                                                orig_sizes[i]))
        return parts

    def merge_parts(self, parts: List[Part], max_dets: Optional[int] = None) -> Part:
        """One detection set from several variants' (the only one when there is one)."""
        if len(parts) == 1:
            return parts[0]
        # boxes are float64 (original pixels); NMS wants scores of the same dtype
        merged = merge_detections([dict(p, scores=p["scores"].double()) for p in parts], method=self.merge,
                                  iou_thresh=self.merge_iou, max_dets=max_dets or 100)
        return dict(merged, scores=merged["scores"].float())

    def finish(self, det: Part, orig_size: Sequence[int], item: Optional[Item] = None,
               max_dets: Optional[int] = None) -> DetectionResult:
        """Score threshold, class filter, best-first order (stable) and ``max_dets`` -> a :class:`DetectionResult`."""
        keep = det["scores"] >= self.score_thresh
        if self.keep_labels is not None:
            keep &= torch.isin(det["labels"], torch.tensor(self.keep_labels))
        b, s, lab = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
        order = torch.sort(s, descending=True, stable=True).indices[:max_dets]
        return DetectionResult(b[order], s[order], lab[order], self.cat_ids, self.class_names,
                               (int(orig_size[0]), int(orig_size[1])), item.path if item else None,
                               item.frame if item else None)

    def predict_batch(self, images: torch.Tensor, sizes: Sequence[Tuple[int, int]], scales: Sequence[float],
                      orig_sizes: Sequence[Sequence[int]]) -> List[DetectionResult]:
        """Detections of a batch preprocessed as :meth:`transform` does (a ``collate_detection`` batch of the
        evaluation pipeline): what training-time evaluation calls, with the DataLoader's ``scale`` and
        ``orig_size``. Several models or flips are merged; ``tta_scales`` need :meth:`stream` or ``__call__``."""
        return [self.finish(self.merge_parts(p, self.max_dets), o, max_dets=self.max_dets)
                for p, o in zip(self.run_variants(images, sizes, scales, orig_sizes), orig_sizes)]

    def run_batch(self, prepared: List[Any], items: List[Item], images: List[np.ndarray]) -> List[DetectionResult]:
        if self.slicer is not None:
            return self.slicer.run(self, prepared, items, images)
        orig = [im.shape[:2] for im in images]
        per_image: List[List[Part]] = [[] for _ in prepared]
        for si in range(len(self.scales)):
            tensors = [p[si][0] for p in prepared]
            sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
            parts = self.run_variants(pad_images(tensors, 32), sizes, [p[si][1] for p in prepared], orig)
            for acc, ps in zip(per_image, parts):
                acc.extend(ps)
        return [self.finish(self.merge_parts(ps, self.max_dets), o, it, max_dets=self.max_dets)
                for ps, o, it in zip(per_image, orig, items)]


def predict_coco(predictor: DetectionPredictor, dataset, *, progress=None, on_skip=None) -> List[Dict[str, Any]]:
    """Predict every image of a COCO dataset (a :class:`res_backbone.data.CocoDetection`, in its item order) as
    ``tools/eval_det.py`` does; return the COCO results records (pycocotools' ``loadRes`` format).

    Images are decoded as stored (no EXIF rotation: COCO boxes refer to the stored pixels). An undecodable image
    raises (``on_skip(item, error)`` instead, when given).
    """
    items = [Item(str(dataset.image_path(i)), image_id=i) for i in dataset.image_ids]

    def fail(item: Item, err: BaseException) -> None:
        raise err

    results: List[Dict[str, Any]] = []
    for item, det, _ in predictor.stream(items, exif=False, on_skip=on_skip or fail, progress=progress):
        results.extend(det.to_coco(item.image_id))
    return results
