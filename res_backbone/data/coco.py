"""COCO-format detection dataset with pycocotools semantics.

The json is read through pycocotools' ``COCO`` index (after a structural check that names the file
and the offending key), so what the training targets see is what ``COCOeval`` will see:

* boxes are COCO ``[x, y, w, h]`` in pixel-edge coordinates (no ``+1``) -> ``xyxy = x, y, x+w, y+h``;
* ``iscrowd=1`` annotations are excluded from the training targets; the evaluator still reads them
  from the ground-truth json (they become "ignore" regions there);
* category ids, sorted ascending, map to contiguous labels ``1..K`` (0 is background);
* images are ordered by image id (as torchvision's ``CocoDetection``).

Image decoding follows the stored pixel layout: no EXIF rotation is applied, since COCO's
``width``/``height`` and boxes refer to the raw stored pixels.

Hostile or broken input ends in one of these exceptions, each naming the file and, for the
dataset, the image id (``tests/res_backbone/data/test_fuzz_coco.py`` fuzzes every case):

* :class:`CocoFormatError` (a ``ValueError``): json that is not UTF-8 JSON, or not COCO detection
  format: missing keys, wrong types, non-integer or duplicate ids, ids outside int64, sizes that are
  not integers in ``1..2**31-1``, annotations of unknown images or categories, bboxes that are not
  four numbers, file names that are absolute, empty, hold NUL or lone surrogates, or climb out of
  the image root;
* ``FileNotFoundError``: the json or an image file is missing;
* :class:`~.images.ImageDecodeError` (an ``OSError``): an image file that cannot be read or decoded
  (truncated, random bytes, empty, a format outside :data:`~.images.IMAGE_FORMATS`, zero-sized);
* :class:`~.images.ImageTooLargeError` (an :class:`~.images.ImageDecodeError`): more pixels than
  :data:`~.images.MAX_IMAGE_PIXELS`, refused from the header before any pixel memory is allocated
  (decompression-bomb guard);
* ``ValueError``: an image whose decoded size differs from the json's, or a file name that is a
  symbolic link leading outside the image root (nothing outside the root is ever opened).

Boxes that cannot be used (non-finite or too large for a float, ``w``/``h`` <= 0 or so small that
they vanish in float32, outside the image) are not errors: they are dropped and counted in
:attr:`CocoDetection.stats` and the log line.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pycocotools.coco import COCO

from .images import ImageDecodeError, ImageSizeMismatchError, load_rgb_image, read_image_size, safe_join
from .transforms import bboxes_to_tensor, labels_to_tensor

log = logging.getLogger(__name__)

__all__ = ["CocoDetection", "CocoFormatError"]

PathLike = Union[str, os.PathLike]

_INT64 = (-(2**63), 2**63 - 1)
_MAX_SIDE = 2**31 - 1


class CocoFormatError(ValueError):
    """The annotation json is not valid COCO detection format (message names file and key)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_id(v: Any) -> bool:
    return _is_int(v) and _INT64[0] <= v <= _INT64[1]


def _as_float(v: Any) -> float:
    """A json number as float; integers too large for a float become ``inf`` (dropped as non-finite)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _validate(data: Any, src: str, image_root: PathLike) -> None:
    """Structural checks pycocotools does not do (it would KeyError or silently mis-index)."""
    if not isinstance(data, dict):
        raise CocoFormatError(f"{src}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(f"{src}: missing required key '{key}'")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{src}: '{key}' must be a list, got {type(data[key]).__name__}")
    img_ids, cat_ids, ann_ids = set(), set(), set()
    for i, img in enumerate(data["images"]):
        where = f"{src}: images[{i}]"
        if not isinstance(img, dict):
            raise CocoFormatError(f"{where} must be an object")
        for key, ok in (("id", _is_id), ("file_name", lambda v: isinstance(v, str) and v),
                        ("width", lambda v: _is_int(v) and 0 < v <= _MAX_SIDE),
                        ("height", lambda v: _is_int(v) and 0 < v <= _MAX_SIDE)):
            if key not in img:
                raise CocoFormatError(f"{where}: missing key '{key}'")
            if not ok(img[key]):
                raise CocoFormatError(f"{where}: invalid '{key}' = {img[key]!r}")
        if img["id"] in img_ids:
            raise CocoFormatError(f"{where}: duplicate image id {img['id']}")
        img_ids.add(img["id"])
        try:  # lexical only: links are resolved when the file is read
            safe_join(image_root, img["file_name"], resolve_links=False)
        except ValueError as e:
            raise CocoFormatError(f"{where} (image id {img['id']}): {e}") from None
    for i, cat in enumerate(data["categories"]):
        where = f"{src}: categories[{i}]"
        if not isinstance(cat, dict):
            raise CocoFormatError(f"{where} must be an object")
        if "id" not in cat or not _is_id(cat["id"]):
            raise CocoFormatError(f"{where}: missing or non-integer 'id' (got {cat.get('id')!r})")
        if cat["id"] in cat_ids:
            raise CocoFormatError(f"{where}: duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])
    for i, ann in enumerate(data["annotations"]):
        where = f"{src}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise CocoFormatError(f"{where} must be an object")
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                raise CocoFormatError(f"{where}: missing key '{key}'")
        for key in ("id", "image_id", "category_id"):
            if not _is_id(ann[key]):
                raise CocoFormatError(f"{where}: '{key}' must be an integer id, got {ann[key]!r}")
        if ann["id"] in ann_ids:
            raise CocoFormatError(f"{where}: duplicate annotation id {ann['id']}")
        ann_ids.add(ann["id"])
        if ann["image_id"] not in img_ids:
            raise CocoFormatError(f"{where} (id {ann['id']}): unknown image_id {ann['image_id']!r}")
        if ann["category_id"] not in cat_ids:
            raise CocoFormatError(f"{where} (id {ann['id']}): unknown category_id {ann['category_id']!r}")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
            raise CocoFormatError(f"{where} (id {ann['id']}): 'bbox' must be [x, y, w, h] numbers, got {bbox!r}")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise CocoFormatError(f"{where} (id {ann['id']}): 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset; items as in ``docs/detection_interfaces.md``.

    Args:
        ann_file: COCO instances json (``images``, ``annotations``, ``categories``).
        image_root: folder the images' ``file_name`` are relative to.
        transforms: an albumentations-style callable ``(image=, bboxes=, labels=) -> dict`` (see
            ``transforms.py``) that resizes, augments, normalises and returns a CHW tensor. ``None``:
            the image is returned at original size as floats in [0, 1] (not normalised), scale 1.
        filter_empty: drop images without any usable box (no annotation, or crowd/degenerate only).
            Default keeps them as negatives (``boxes`` of shape (0, 4)).
        class_names: optional K names overriding the json's category names (label order).
        max_image_pixels: refuse larger images (default :data:`~.images.MAX_IMAGE_PIXELS`).
        cache_mb: keep decoded images in memory, up to this many megabytes (the first ones read; 0, the
            default: none). For small sets read many times: a 64 px PNG costs ~0.8 ms to check, open and
            decode on one CPU core, about a tenth of a localization training step's time per image.
            Each DataLoader worker holds its own cache.

    Raises:
        FileNotFoundError: ``ann_file`` is missing.
        CocoFormatError: the json is not COCO detection format (message names the file, the list
            index and the key; see the module docstring for every check).

    Items raise ``FileNotFoundError``, :class:`~.images.ImageDecodeError` / :class:`~.images.ImageTooLargeError` or
    ``ValueError`` (size differs from the json's, symbolic link out of ``image_root``), naming the
    file and image id; nothing outside ``image_root`` is opened.

    Attributes:
        coco: the pycocotools ``COCO`` index of the json (what the evaluator uses).
        ids: the image ids, in item order.
        cat_ids: category ids sorted ascending; ``cat_ids[label - 1] == category_id``.
        class_names: K names, ``class_names[label - 1]``.
        cat_id_to_label, label_to_cat_id: the two maps.
        stats: counts of images, kept/clipped/dropped boxes (logged once at construction).

    Item:
        ``image`` FloatTensor (3, h, w); ``target`` dict with ``boxes`` FloatTensor (N, 4) xyxy in
        resized pixels, ``labels`` LongTensor (N,) in 1..K, ``image_id`` int, ``orig_size`` (H, W),
        ``size`` (h, w), ``scale`` float = h / H.
    """

    def __init__(
        self,
        ann_file: PathLike,
        image_root: PathLike,
        transforms: Optional[Callable[..., Dict[str, Any]]] = None,
        *,
        filter_empty: bool = False,
        class_names: Optional[Sequence[str]] = None,
        max_image_pixels: Optional[int] = None,
        cache_mb: float = 0.0,
    ) -> None:
        self.ann_file = str(ann_file)
        self.max_image_pixels = max_image_pixels
        if not cache_mb >= 0:
            raise ValueError(f"cache_mb must be >= 0 (megabytes of decoded images to keep), got {cache_mb}")
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: Dict[int, np.ndarray] = {}
        self._cached_bytes = 0
        self.image_root = Path(image_root)
        self.transforms = transforms
        try:
            with open(self.ann_file, "r", encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}") from None
        except json.JSONDecodeError as e:
            raise CocoFormatError(f"{self.ann_file}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise CocoFormatError(f"{self.ann_file}: not UTF-8 text ({e})") from None
        except RecursionError:
            raise CocoFormatError(f"{self.ann_file}: JSON nested too deeply to be COCO format") from None
        _validate(data, self.ann_file, self.image_root)

        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            self.coco.createIndex()

        self.cat_ids: List[int] = sorted(self.coco.cats)
        self.cat_id_to_label: Dict[int, int] = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id: Dict[int, int] = {i + 1: c for i, c in enumerate(self.cat_ids)}
        if class_names is not None:
            if len(class_names) != len(self.cat_ids):
                raise ValueError(f"class_names has {len(class_names)} names but {self.ann_file} has "
                                 f"{len(self.cat_ids)} categories")
            self.class_names = [str(n) for n in class_names]
        else:
            self.class_names = [str(self.coco.cats[c].get("name", c)) for c in self.cat_ids]

        self.stats: Dict[str, int] = dict.fromkeys(
            ("images", "annotations", "crowd", "boxes", "clipped", "dropped_nonfinite", "dropped_nonpositive",
             "dropped_outside", "empty_images", "filtered_empty_images"), 0)
        self._targets: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        ids = []
        for img_id in sorted(self.coco.imgs):
            boxes, labels = self._build_target(img_id)
            self._targets[img_id] = (boxes, labels)
            if len(boxes) == 0:
                self.stats["empty_images"] += 1
                if filter_empty:
                    self.stats["filtered_empty_images"] += 1
                    continue
            ids.append(img_id)
        self.ids: List[int] = ids
        self.stats["images"] = len(ids)
        self.stats["annotations"] = len(data["annotations"])
        dropped = sum(v for k, v in self.stats.items() if k.startswith("dropped"))
        level = logging.WARNING if dropped or self.stats["clipped"] else logging.INFO
        log.log(level, "%s: %d images (%d without boxes%s), %d boxes kept, %d crowd excluded, %d clipped, "
                "%d dropped (non-finite %d, w/h<=0 %d, outside image %d), %d categories",
                self.ann_file, len(ids), self.stats["empty_images"],
                ", filtered" if filter_empty else ", kept as negatives", self.stats["boxes"], self.stats["crowd"],
                self.stats["clipped"], dropped, self.stats["dropped_nonfinite"], self.stats["dropped_nonpositive"],
                self.stats["dropped_outside"], len(self.cat_ids))

    # ------------------------------------------------------------------ json side
    def _build_target(self, img_id: int) -> Tuple[np.ndarray, np.ndarray]:
        info = self.coco.imgs[img_id]
        W, H = info["width"], info["height"]
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(img_id, []):
            if ann.get("iscrowd", 0):
                self.stats["crowd"] += 1
                continue
            x, y, w, h = (_as_float(v) for v in ann["bbox"])
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                self.stats["dropped_nonfinite"] += 1
                continue
            if w <= 0 or h <= 0:
                self.stats["dropped_nonpositive"] += 1
                continue
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
            if x1 <= x0 or y1 <= y0:
                self.stats["dropped_outside"] += 1
                continue
            if np.float32(x1) <= np.float32(x0) or np.float32(y1) <= np.float32(y0):
                # thinner than float32 resolution (w = 1e-8 at x = 1): the stored box would have w = 0,
                # and a zero-width target makes the box-regression log(w) infinite
                self.stats["dropped_nonpositive"] += 1
                continue
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                self.stats["clipped"] += 1
            boxes.append((x0, y0, x1, y1))
            labels.append(self.cat_id_to_label[ann["category_id"]])
        self.stats["boxes"] += len(boxes)
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)

    @property
    def num_classes(self) -> int:
        """K, the number of object classes (labels 1..K; 0 is background)."""
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_ids(self) -> List[int]:
        """The COCO image ids in item order (same as ``ids``)."""
        return list(self.ids)

    def image_path(self, image_id: int) -> Path:
        """Absolute path of the image file of COCO image ``image_id`` (an id, not an item index)."""
        if image_id not in self.coco.imgs:
            raise KeyError(f"image id {image_id} is not in {self.ann_file}")
        return safe_join(self.image_root, self.coco.imgs[image_id]["file_name"])

    def original_annotations(self, image_id: int) -> List[Dict[str, Any]]:
        """The json's annotations of COCO image ``image_id`` as stored (crowd and degenerate included)."""
        if image_id not in self.coco.imgs:
            raise KeyError(f"image id {image_id} is not in {self.ann_file}")
        return [dict(a) for a in self.coco.imgToAnns.get(image_id, [])]

    def aspect_ratios(self) -> List[float]:
        """Width / height of every item, from the json (no decoding), in item order."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def get_annotation(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Cleaned training boxes (N, 4) xyxy original pixels and labels (N,) of item ``index``."""
        boxes, labels = self._targets[self.ids[index]]
        return boxes.copy(), labels.copy()

    # ------------------------------------------------------------------ pixel side
    def load_image(self, index: int) -> np.ndarray:
        """Decoded (H, W, 3) uint8 RGB image of item ``index``, checked against the json's size.

        Raises:
            FileNotFoundError / ImageDecodeError (ImageTooLargeError) / ValueError, naming the path and image id.
        """
        img_id = self.ids[index]
        cached = self._cache.get(img_id)
        if cached is not None:
            return cached.copy()  # callers may write into what they get
        info = self.coco.imgs[img_id]
        path = self._checked_path(img_id)
        try:
            image = load_rgb_image(path, max_pixels=self.max_image_pixels)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path} (image id {img_id}, from {self.ann_file})") from None
        except ImageDecodeError as e:  # keeps the subclass (ImageTooLargeError)
            raise type(e)(f"{e} (image id {img_id}, from {self.ann_file})") from e.__cause__
        if image.shape[:2] != (info["height"], info["width"]):
            # Boxes are in the json's pixel frame; a different decoded size would silently misplace them.
            raise ImageSizeMismatchError(f"image {path} (image id {img_id}) decodes to {image.shape[1]}x{image.shape[0]} "
                             f"(w x h) but {self.ann_file} says {info['width']}x{info['height']}")
        if self._cached_bytes + image.nbytes <= self.cache_bytes:
            self._cache[img_id] = image.copy()
            self._cached_bytes += image.nbytes
        return image

    def _checked_path(self, img_id: int) -> Path:
        """The image file of ``img_id`` with its links resolved inside the root (ValueError naming the id)."""
        try:
            return safe_join(self.image_root, self.coco.imgs[img_id]["file_name"])
        except ValueError as e:
            raise ValueError(f"{e} (image id {img_id}, from {self.ann_file})") from None

    def check_images(self, *, decode: bool = False, raise_on_error: bool = True) -> List[Tuple[int, str, str]]:
        """Scan every image file up front.

        Args:
            decode: fully decode each image (slow) instead of reading only its header.
            raise_on_error: raise ``RuntimeError`` listing the problems (first 20) if any.

        Returns:
            ``[(image_id, path, problem), ...]`` (empty when all files are fine).
        """
        problems: List[Tuple[int, str, str]] = []
        for index, img_id in enumerate(self.ids):
            info = self.coco.imgs[img_id]
            path = safe_join(self.image_root, info["file_name"], resolve_links=False)
            try:
                if decode:
                    self.load_image(index)
                    continue
                size = read_image_size(self._checked_path(img_id), max_pixels=self.max_image_pixels)
                if size != (info["width"], info["height"]):
                    problems.append((img_id, str(path), f"size {size[0]}x{size[1]} != json "
                                                        f"{info['width']}x{info['height']}"))
            except FileNotFoundError:
                problems.append((img_id, str(path), "missing"))
            except (OSError, ValueError) as e:  # ImageDecodeError is an OSError
                problems.append((img_id, str(path), f"undecodable, too large, outside the root or wrong size: {e}"))
        if problems and raise_on_error:
            lines = "\n".join(f"  image id {i}: {p}: {why}" for i, p, why in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise RuntimeError(f"{len(problems)} bad image file(s) for {self.ann_file} under {self.image_root}:\n"
                               f"{lines}{more}")
        return problems

    def image_files(self) -> List[Tuple[int, Optional[Path], Tuple[int, int], str]]:
        """``(image id, path, (width, height) from the json, problem)`` of every image, for the pre-flight check
        (:mod:`.preflight`); ``path`` is None, with the reason, for a name that cannot be joined to the root."""
        out = []
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            try:
                out.append((img_id, self._checked_path(img_id), (info["width"], info["height"]), ""))
            except ValueError as e:
                out.append((img_id, None, (info["width"], info["height"]), str(e)))
        return out

    def exclude(self, image_ids: Sequence[int]) -> None:
        """Leave these images (and their boxes) out, e.g. the bad ones the pre-flight check found."""
        drop = set(image_ids)
        self.ids = [i for i in self.ids if i not in drop]
        self.stats["images"] = len(self.ids)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        img_id = self.ids[index]
        image = self.load_image(index)
        boxes, labels = self._targets[img_id]
        H, W = image.shape[:2]
        if self.transforms is None:
            tensor = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
            boxes_t, labels_t = torch.from_numpy(boxes.copy()), torch.from_numpy(labels.copy())
        else:
            out = self.transforms(image=image, bboxes=boxes, labels=labels.tolist())
            tensor = out["image"]
            if isinstance(tensor, np.ndarray):  # a pipeline without ToTensorV2
                tensor = torch.from_numpy(np.ascontiguousarray(tensor.transpose(2, 0, 1)))
            tensor = tensor.float()
            boxes_t, labels_t = bboxes_to_tensor(out["bboxes"]), labels_to_tensor(out["labels"])
        h, w = int(tensor.shape[-2]), int(tensor.shape[-1])
        target = {
            "boxes": boxes_t,
            "labels": labels_t,
            "image_id": int(img_id),
            "orig_size": (int(H), int(W)),
            "size": (h, w),
            "scale": h / H,
        }
        return tensor, target
