"""The built-in single-object localization set: Fashion-MNIST items pasted on textured canvases.

Each image is one Fashion-MNIST item (Xiao et al., 2017), scaled to a random size and aspect, tinted
with a random colour that contrasts with the background, and pasted at a random position on a
textured RGB canvas (noise, stripes, gradients or blotches, from :mod:`.synthetic`). The item's grey
level is the paste's alpha, so the item keeps its own silhouette and inner detail, and its box is
the tight extent of the pixels it changed - not the 28x28 square it came in.

* ``train`` images use items of Fashion-MNIST's *train* split; ``val`` and ``test`` use items of its
  *test* split (even and odd indices, so the two never share an item), never seen in training.
* Every image draws from its own ``SeedSequence([seed, split, index])``, and the item order from
  ``SeedSequence([seed, split])``: same arguments -> byte-identical images, and image ``i`` does not
  depend on ``num_images``.

    arrays = make_fmnist_localization("val", num_images=500)     # in memory, uint8
    paths = write_fmnist_localization("data/fmnist_loc")         # COCO layout (PNG + json)
    python tools/make_data.py fmnist-loc --out data/fmnist_loc

The COCO layout is what ``tools/train_loc.py`` reads (the same code path as real COCO data):
``out/{train,val}/NNNNNN.png`` and ``out/annotations/instances_{train,val}.json`` with category ids
1..10 in Fashion-MNIST's label order.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .coco_writer import Sample, coco_layout_paths, write_splits_once
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from .synthetic import _background, _colour

log = logging.getLogger(__name__)

__all__ = ["FASHION_CATEGORIES", "LocalizationArrays", "fmnist_localization_paths", "item_colour",
           "iter_fmnist_localization", "make_fmnist_localization", "paste_item", "render_background",
           "render_localization_image", "sample_item_alpha", "write_fmnist_localization"]

PathLike = Union[str, os.PathLike]
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_FORMAT_VERSION = 1  # bump when the rendering changes, so cached sets are regenerated
ALPHA_FLOOR = 16  # scaled grey levels below this are dropped: invisible on a texture, they would loosen the box


@dataclass
class LocalizationArrays:
    """A rendered split held in memory.

    Attributes:
        images: uint8 ``(N, H, W, 3)`` RGB canvases.
        boxes: float32 ``(N, 4)`` tight boxes, ``xyxy`` in pixel-edge coordinates (``x1`` exclusive).
        labels: int64 ``(N,)`` Fashion-MNIST labels 0..9.
        item_indices: int64 ``(N,)`` index of each pasted item in its Fashion-MNIST split.
        class_names: the 10 class names, ``class_names[label]``.
    """

    images: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    item_indices: np.ndarray
    class_names: Tuple[str, ...] = FASHION_MNIST_CLASSES


def _item_pool(split: str, num_items: int) -> np.ndarray:
    """Indices into the Fashion-MNIST split that ``split`` draws its items from."""
    if split == "train":
        return np.arange(num_items)
    return np.arange(0 if split == "val" else 1, num_items, 2)  # val: even test items, test: odd ones


def _scaled_alpha(item: np.ndarray, width: int, height: int) -> np.ndarray:
    """The item resized to ``(height, width)`` as uint8 alpha, faint pixels zeroed, cropped to its content."""
    alpha = np.asarray(Image.fromarray(np.ascontiguousarray(item, dtype=np.uint8)).resize((width, height),
                                                                                         Image.BILINEAR))
    alpha = np.where(alpha >= ALPHA_FLOOR, alpha, 0).astype(np.uint8)
    if not alpha.any():  # an almost blank item: keep whatever is non-zero rather than nothing
        alpha = np.asarray(Image.fromarray(np.ascontiguousarray(item, dtype=np.uint8)).resize((width, height),
                                                                                             Image.NEAREST))
    if not alpha.any():
        raise ValueError("cannot paste a blank Fashion-MNIST item (all pixels are 0)")
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    return alpha[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def render_background(rng: np.random.Generator, canvas: int, dark_prob: float = 0.5) -> Tuple[np.ndarray, bool]:
    """A textured ``(canvas, canvas, 3)`` float32 background (grain included) and whether it is dark
    (probability ``dark_prob``; items are then pasted bright, as Fashion-MNIST's white-on-black).

    It is the first thing :func:`render_localization_image` draws from ``rng``, so a generator in the
    same state reproduces the background of an image exactly (what the tightness tests use).
    """
    dark = bool(rng.random() < dark_prob)
    bg = _background(rng, canvas, canvas, dark)
    bg += rng.normal(0.0, 3.0, size=(canvas, canvas, 1)).astype(np.float32)  # sensor-like grain
    return np.clip(bg, 0, 255), dark


def sample_item_alpha(rng: np.random.Generator, item: np.ndarray, *, canvas: int,
                      scale: Tuple[float, float] = (28.0, 56.0), aspect: float = 0.15) -> np.ndarray:
    """Draw an item's size and aspect from ``rng`` and return its scaled alpha (uint8, cropped to content).

    The 28 px frame's side is log-uniform in ``scale`` (pixels), its width/height ratio ``exp(u)``,
    ``u ~ U(-aspect, aspect)``; both sides are capped at ``canvas``.
    """
    lo, hi = float(scale[0]), float(scale[1])
    if not 0 < lo <= hi:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
    side = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
    ratio = float(np.exp(rng.uniform(-aspect, aspect)))
    width = int(min(canvas, max(2, round(side * ratio))))
    height = int(min(canvas, max(2, round(side / ratio))))
    return _scaled_alpha(item, width, height)


def item_colour(rng: np.random.Generator, dark: bool) -> np.ndarray:
    """A random RGB colour contrasting with a dark (bright colour) or light (dark colour) background."""
    return _colour(rng, 150.0, 255.0) if dark else _colour(rng, 0.0, 100.0)


def paste_item(bg: np.ndarray, alpha: np.ndarray, colour: np.ndarray, x0: int, y0: int) -> Tuple[int, int, int, int]:
    """Blend ``colour`` into the float canvas ``bg`` in place with ``alpha`` at ``(x0, y0)``; return the box
    ``(x0, y0, x1, y1)`` (pixel edges, ``x1``/``y1`` exclusive)."""
    bh, bw = alpha.shape
    a = (alpha.astype(np.float32) / 255.0)[..., None]
    region = bg[y0:y0 + bh, x0:x0 + bw]
    bg[y0:y0 + bh, x0:x0 + bw] = region * (1.0 - a) + colour.astype(np.float32) * a
    return x0, y0, x0 + bw, y0 + bh


def render_localization_image(
    rng: np.random.Generator, item: np.ndarray, *, canvas: int = 64, scale: Tuple[float, float] = (28.0, 56.0),
    aspect: float = 0.15,
) -> Tuple[np.ndarray, Tuple[int, int, int, int]]:
    """Paste one item on a textured canvas.

    Args:
        rng: the image's generator (background first, then size, aspect, colour and position).
        item: uint8 ``(h, w)`` grey item (a Fashion-MNIST image: white object on black).
        canvas: side of the square canvas in pixels.
        scale: the item's full frame (28 px for Fashion-MNIST) is scaled to a side drawn
            log-uniformly from this range (pixels); the object inside is usually ~80% of it.
        aspect: the frame's width/height ratio is ``exp(u)``, ``u ~ U(-aspect, aspect)``.

    Returns:
        ``(image, box)``: uint8 ``(canvas, canvas, 3)`` RGB and the tight box ``(x0, y0, x1, y1)``
        of the pixels the paste changed (pixel edges, ``x1``/``y1`` exclusive).
    """
    lo, hi = float(scale[0]), float(scale[1])
    if not 0 < lo <= hi:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
    bg, dark = render_background(rng, canvas)
    alpha = sample_item_alpha(rng, item, canvas=canvas, scale=(lo, hi), aspect=aspect)
    colour = item_colour(rng, dark)
    bh, bw = alpha.shape
    x0, y0 = int(rng.integers(0, canvas - bw + 1)), int(rng.integers(0, canvas - bh + 1))
    box = paste_item(bg, alpha, colour, x0, y0)
    return np.clip(np.rint(bg), 0, 255).astype(np.uint8), box


def iter_fmnist_localization(
    split: str, root: Optional[PathLike] = None, *, num_images: int = 1000, canvas: int = 64,
    scale: Tuple[float, float] = (28.0, 56.0), aspect: float = 0.15, seed: int = 0,
    items: Optional[Tuple[np.ndarray, np.ndarray]] = None,
) -> Iterator[Tuple[np.ndarray, Tuple[int, int, int, int], int, int]]:
    """Yield ``(image, box_xyxy, label, item_index)`` for the images of ``split`` one at a time.

    Args:
        split: ``"train"`` (Fashion-MNIST train items) or ``"val"`` / ``"test"`` (test items).
        root: Fashion-MNIST folder (see :func:`~.fashion_mnist.load_fashion_mnist`).
        num_images: images to render; items are reused (with other placements) when there are fewer.
        canvas, scale, aspect: see :func:`render_localization_image`.
        seed: same seed and arguments -> byte-identical images.
        items: ``(images uint8 (M, 28, 28), labels (M,))`` of the source split, instead of reading ``root``.
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {list(_SPLIT_CODE)}, got {split!r}")
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if canvas < 16:
        raise ValueError(f"canvas must be at least 16 px, got {canvas}")
    if items is None:
        imgs, lbls = load_fashion_mnist("train" if split == "train" else "test", root)
        items = (imgs.numpy(), lbls.numpy())
    src_images, src_labels = np.asarray(items[0]), np.asarray(items[1])
    pool = _item_pool(split, len(src_images))
    if len(pool) == 0:
        raise ValueError(f"no Fashion-MNIST items for split {split!r} ({len(src_images)} in the source split)")
    order = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split]])).permutation(pool)
    for i in range(num_images):
        idx = int(order[i % len(order)])
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], i + 1]))
        image, box = render_localization_image(rng, src_images[idx], canvas=canvas, scale=scale, aspect=aspect)
        yield image, box, int(src_labels[idx]), idx


def make_fmnist_localization(
    split: str, root: Optional[PathLike] = None, *, num_images: int = 1000, canvas: int = 64,
    scale: Tuple[float, float] = (28.0, 56.0), aspect: float = 0.15, seed: int = 0,
) -> LocalizationArrays:
    """Render a whole split into memory (see :func:`iter_fmnist_localization` for the arguments).

    ``num_images * canvas**2 * 3`` bytes: 1000 images of 64 px take 12 MB; write large sets with
    :func:`write_fmnist_localization` instead.
    """
    images = np.zeros((num_images, canvas, canvas, 3), np.uint8)
    boxes = np.zeros((num_images, 4), np.float32)
    labels = np.zeros(num_images, np.int64)
    item_indices = np.zeros(num_images, np.int64)
    for i, (image, box, label, idx) in enumerate(iter_fmnist_localization(
            split, root, num_images=num_images, canvas=canvas, scale=scale, aspect=aspect, seed=seed)):
        images[i], boxes[i], labels[i], item_indices[i] = image, box, label, idx
    return LocalizationArrays(images, boxes, labels, item_indices)


fmnist_localization_paths = coco_layout_paths  # where write_fmnist_localization puts its files
#: the 10 Fashion-MNIST categories, ids 1..10 in label order
FASHION_CATEGORIES = [{"id": k + 1, "name": name, "supercategory": "fashion"} for k, name in enumerate(FASHION_MNIST_CLASSES)]


def write_fmnist_localization(
    out_dir: PathLike, *, root: Optional[PathLike] = None, num_train: int = 30000, num_val: int = 2000,
    canvas: int = 64, scale: Sequence[float] = (28.0, 56.0), aspect: float = 0.15, seed: int = 0,
    reuse: bool = True,
) -> Dict[str, str]:
    """Render the train and val splits into ``out_dir`` in COCO format (category ids 1..10).

    Args:
        out_dir: output folder (created).
        root: Fashion-MNIST folder (default: ``$RB_FASHION_MNIST`` or the Debian package's).
        num_train, num_val: images per split.
        canvas, scale, aspect, seed: see :func:`render_localization_image` / :func:`iter_fmnist_localization`.
        reuse: skip rendering when ``out_dir`` already holds a complete set made with the same
            arguments and the same source items (recorded in ``out_dir/fmnist_loc_meta.json``).

    Returns:
        ``{"train_json", "train_images", "val_json", "val_images"}`` as path strings.
    """
    out = Path(out_dir)
    paths = fmnist_localization_paths(out)
    scale = (float(scale[0]), float(scale[1]))
    train_items = tuple(t.numpy() for t in load_fashion_mnist("train", root))
    test_items = tuple(t.numpy() for t in load_fashion_mnist("test", root))
    fingerprint = [int(len(train_items[0])), int(train_items[0][:64].sum()), int(len(test_items[0])),
                   int(test_items[0][:64].sum())]  # a different Fashion-MNIST folder -> regenerate
    meta = {"version": _FORMAT_VERSION, "num_train": num_train, "num_val": num_val, "canvas": canvas,
            "scale": list(scale), "aspect": aspect, "seed": seed, "items": fingerprint}
    t0 = time.perf_counter()
    items = {"train": train_items, "val": test_items}

    def samples(split: str, num: int) -> Iterator[Sample]:
        return ((image, [box], [label + 1], {"fmnist_index": idx}) for image, box, label, idx in
                iter_fmnist_localization(split, num_images=num, items=items[split], canvas=canvas, scale=scale,
                                         aspect=aspect, seed=seed))

    if write_splits_once(out, "fmnist_loc_meta.json", meta, FASHION_CATEGORIES, {"train": num_train, "val": num_val},
                         samples, "res_backbone Fashion-MNIST localization", reuse):
        log.info("Fashion-MNIST localization: %d train + %d val images of %d px in %s (%.1fs)", num_train, num_val,
                 canvas, out, time.perf_counter() - t0)
    return paths
