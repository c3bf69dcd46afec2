"""Single-object localization data from COCO-format json: one class and one target box per image.

The json is read with :class:`~.coco.CocoDetection` (pycocotools semantics: crowd boxes excluded,
degenerate boxes dropped or clipped, category ids sorted and mapped to contiguous labels), then each
image is reduced to the ILSVRC localization setting:

* the **target** is the image's largest non-crowd box (by area after clipping; the first in json
  order on a tie) and its class is the image's label;
* the **ground truth** a prediction is scored against is that box alone, or with ``all_boxes=True``
  every non-crowd box of the image with its own class (a prediction is right when it matches any
  ground-truth box of the predicted class);
* images without any usable box are skipped and counted (``skipped_empty``, logged once).

Labels here are ``0..K-1`` (``cat_ids[label]`` is the COCO category id); there is no background.
Boxes in items are ``xyxy`` normalised by the transformed image's width and height, so they lie in
[0, 1]. The pipelines warp every image to a square ``image_size`` (no aspect-preserving padding), and
since IoU is unchanged by scaling x and y separately, IoUs computed on normalised boxes equal IoUs in
the original pixels.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .coco import CocoDetection
from .transforms import _check_stats, bboxes_to_tensor, labels_to_tensor

log = logging.getLogger(__name__)

__all__ = ["CocoLocalization", "LocTransforms", "build_loc_eval_transforms", "build_loc_train_transforms",
           "collate_localization", "largest_box_index"]

PathLike = Union[str, os.PathLike]


def largest_box_index(boxes: np.ndarray) -> int:
    """Index of the largest ``xyxy`` box by area (the first one on a tie). ``boxes`` must be non-empty."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        raise ValueError("largest_box_index needs at least one box")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(np.argmax(areas))  # argmax returns the first maximum


class LocTransforms:
    """Warp to a square, optional horizontal flip and colour jitter, normalise: albumentations' keyword
    protocol (``image`` uint8 HWC, ``bboxes`` xyxy pixels, ``labels``) in, ``image`` a normalised CHW
    float tensor and the boxes in the output's pixels out.

    Why not ``A.Compose`` with ``BboxParams``: a warp and a flip move boxes exactly, with nothing to
    clip or filter, and albumentations' box bookkeeping alone costs ~2.5 ms per image, about as much as
    a resnet18 training step spends on a 64 px image on one CPU core (measured); this costs ~0.1 ms.

    Args:
        image_size: output side (the image is resized to ``image_size`` x ``image_size``, aspect not kept).
        mean, std: per-channel RGB statistics in [0, 1].
        hflip: probability of a horizontal flip (``x' = size - x``).
        photometric: random brightness, contrast and saturation (each by a factor in [0.8, 1.2]).
        seed: seed of the generator (:meth:`set_random_seed` re-seeds it per item).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *, hflip: float = 0.0,
                 photometric: bool = False, seed: Optional[int] = None):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip is a probability, got {hflip}")
        mean, std = _check_stats(mean, std)
        self.image_size, self.hflip, self.photometric = int(image_size), float(hflip), bool(photometric)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.rng = np.random.default_rng(seed)

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def _jitter(self, image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32)
        b, c, s = self.rng.uniform(0.8, 1.2, size=3)
        x *= b
        x = (x - x.mean()) * c + x.mean()
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = (x - grey[..., None]) * s + grey[..., None]
        return np.clip(x, 0, 255)

    def __call__(self, *, image: np.ndarray, bboxes: Any, labels: Sequence) -> Dict[str, Any]:
        import cv2

        size = self.image_size
        h, w = image.shape[:2]
        boxes = np.asarray(bboxes, dtype=np.float32).reshape(-1, 4) * np.array([size / w, size / h] * 2, np.float32)
        if (h, w) != (size, size):
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
        if self.hflip and self.rng.random() < self.hflip:
            image = image[:, ::-1]
            boxes = np.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
        if self.photometric:
            image = self._jitter(image)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        return {"image": (tensor - self.mean) / self.std, "bboxes": boxes, "labels": list(labels)}


def build_loc_train_transforms(image_size: int, mean: Sequence[float], std: Sequence[float], *, hflip: float = 0.5,
                               photometric: bool = True, seed: Optional[int] = None) -> LocTransforms:
    """Training pipeline: warp to ``image_size`` x ``image_size``, horizontal flip, colour jitter, normalise.

    No crop, so no box is ever cut; see :class:`LocTransforms`.
    """
    return LocTransforms(image_size, mean, std, hflip=hflip, photometric=photometric, seed=seed)


def build_loc_eval_transforms(image_size: int, mean: Sequence[float], std: Sequence[float]) -> LocTransforms:
    """Evaluation pipeline: warp to ``image_size`` x ``image_size`` and normalise."""
    return LocTransforms(image_size, mean, std)


class CocoLocalization(torch.utils.data.Dataset):
    """COCO-format json as a single-object localization dataset.

    Args:
        ann_file, image_root: the COCO json and the folder its ``file_name`` entries are relative to.
        transforms: a pipeline with albumentations' keyword protocol (:func:`build_loc_train_transforms`,
            or an ``A.Compose`` with ``BboxParams`` for crops and other box-changing augmentation); ``None``
            returns the image at its original size, floats in [0, 1].
        all_boxes: keep every non-crowd box as ground truth (default: the largest one only).
        class_names: optional K names overriding the json's.
        cache_mb: megabytes of decoded images kept in memory (see :class:`~.coco.CocoDetection`).

    Attributes:
        detection: the underlying :class:`~.coco.CocoDetection` (``coco`` index, ``image_path``...).
        ids: COCO image ids of the kept images, in item order.
        cat_ids, class_names: ``cat_ids[label]``, ``class_names[label]`` for labels 0..K-1.
        skipped_empty: images dropped for having no usable (non-crowd, non-degenerate) box.

    Item:
        ``image`` FloatTensor (3, h, w); ``target`` dict: ``label`` int (0..K-1), ``box`` FloatTensor (4,)
        normalised xyxy of the target, ``gt_boxes`` (M, 4) normalised xyxy and ``gt_labels`` (M,) the
        ground truth (M = 1 unless ``all_boxes``; row 0 is the target), ``image_id`` int,
        ``orig_size`` (H, W).
    """

    def __init__(self, ann_file: PathLike, image_root: PathLike, transforms=None, *, all_boxes: bool = False,
                 class_names: Optional[Sequence[str]] = None, cache_mb: float = 0.0):
        self.detection = CocoDetection(ann_file, image_root, None, class_names=class_names, cache_mb=cache_mb)
        self.transforms, self.all_boxes = transforms, all_boxes
        self.cat_ids: List[int] = list(self.detection.cat_ids)
        self.class_names: List[str] = list(self.detection.class_names)
        self._items: List[Tuple[int, np.ndarray, np.ndarray]] = []  # (detection index, boxes, labels 0..K-1)
        self.skipped_empty = 0
        for index in range(len(self.detection)):
            boxes, labels = self.detection.get_annotation(index)
            if len(boxes) == 0:
                self.skipped_empty += 1
                continue
            order = [largest_box_index(boxes)]
            if all_boxes:
                order += [j for j in range(len(boxes)) if j != order[0]]
            self._items.append((index, boxes[order], labels[order] - 1))
        self.ids: List[int] = [self.detection.ids[i] for i, _, _ in self._items]
        log.log(logging.WARNING if self.skipped_empty else logging.INFO,
                "%s: %d localization images (%s as ground truth), %d skipped without a usable box",
                ann_file, len(self._items), "all boxes" if all_boxes else "largest box", self.skipped_empty)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self._items)

    def ground_truth(self, index: int) -> Tuple[int, np.ndarray, np.ndarray]:
        """``(label, gt_boxes (M, 4) xyxy original pixels, gt_labels (M,))`` of item ``index`` (row 0 = target)."""
        _, boxes, labels = self._items[index]
        return int(labels[0]), boxes.copy(), labels.copy()

    def image_files(self):
        """``(image id, path, (width, height), problem)`` of every image (see ``CocoDetection.image_files``)."""
        keep = set(self.ids)
        return [entry for entry in self.detection.image_files() if entry[0] in keep]

    def exclude(self, image_ids) -> None:
        """Leave these images out (the bad ones the pre-flight check found)."""
        drop = set(image_ids)
        self._items = [item for item in self._items if self.detection.ids[item[0]] not in drop]
        self.ids = [self.detection.ids[i] for i, _, _ in self._items]

    def image_path(self, index: int):
        """Path of item ``index``'s image file."""
        return self.detection.image_path(self.ids[index])

    def labels(self) -> List[int]:
        """The label of every item (no image is decoded)."""
        return [int(lab[0]) for _, _, lab in self._items]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        det_index, boxes, labels = self._items[index]
        image = self.detection.load_image(det_index)
        H, W = image.shape[:2]
        if self.transforms is None:
            tensor = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
            out_boxes, out_labels = torch.from_numpy(boxes.copy()), torch.from_numpy(labels.copy())
        else:
            # albumentations carries the row index as the label, so we can tell which box is which after it.
            out = self.transforms(image=image, bboxes=boxes, labels=list(range(len(boxes))))
            tensor = out["image"].float()
            rows = labels_to_tensor(out["labels"])
            out_boxes = bboxes_to_tensor(out["bboxes"])
            if len(rows) == 0 or int(rows[0]) != 0:
                raise ValueError(f"the transforms dropped the target box of image id {self.ids[index]}; "
                                 "localization pipelines must not crop it away")
            out_labels = torch.from_numpy(labels[rows.numpy()].copy())
        h, w = int(tensor.shape[-2]), int(tensor.shape[-1])
        norm = torch.tensor([w, h, w, h], dtype=torch.float32)
        out_boxes = (out_boxes / norm).clamp_(0.0, 1.0)
        target = {"label": int(out_labels[0]), "box": out_boxes[0], "gt_boxes": out_boxes, "gt_labels": out_labels,
                  "image_id": int(self.ids[index]), "orig_size": (int(H), int(W))}
        return tensor, target


def collate_localization(batch: Sequence[Tuple[torch.Tensor, Dict[str, Any]]]):
    """Stack equally sized images: ``(images (N, 3, h, w), image_sizes [(h, w)] * N, targets)``.

    The triple is the protocol of :func:`res_backbone.engine.loop.train_one_epoch`, so the
    localization run reuses that loop.
    """
    images = torch.stack([b[0] for b in batch])
    sizes = [tuple(b[0].shape[-2:]) for b in batch]
    return images, sizes, [b[1] for b in batch]
