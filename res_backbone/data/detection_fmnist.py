"""A multi-object detection set composed of Fashion-MNIST *test-split* items on textured canvases.

Each canvas holds 1..``max_items`` Fashion-MNIST items (Xiao et al., 2017), each scaled to a random
size and aspect, tinted with a colour that contrasts with the background and pasted at a random
position (the item rendering of :mod:`.localization_fmnist`); a new item may not cover more than
``max_overlap`` of its own box or of a box already placed (an item that finds no such place within
20 tries is left out). Boxes are the tight extents of the pixels each paste changed.

Only items of Fashion-MNIST's **test** split are used, so a classifier pre-trained on the train
split has never seen any of them (the transfer study, ``tools/transfer_study.py``). The test items
are shuffled once by ``seed``: the first ``val_fraction`` of them feed the ``val`` canvases, the
rest the ``train`` canvases, so the two splits never share an item.

Every canvas draws from its own ``SeedSequence([seed, split, index])``: same arguments ->
byte-identical images, and image ``i`` does not depend on ``num_images``.

    paths = write_fmnist_detection("data/fmnist_det", num_train=2000, num_val=150)
    python tools/make_data.py fmnist-det --out data/fmnist_det

Layout (what ``tools/train_det.py --train-json ... --train-images ...`` reads):
``out/{train,val}/NNNNNN.png`` and ``out/annotations/instances_{train,val}.json``, category ids 1..10
in Fashion-MNIST's label order, each image recording the ``fmnist_indices`` of its items.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .coco_writer import Sample, coco_layout_paths, write_splits_once
from .fashion_mnist import load_fashion_mnist
from .localization_fmnist import FASHION_CATEGORIES, item_colour, paste_item, render_background, sample_item_alpha
from .synthetic import _overlap

log = logging.getLogger(__name__)

__all__ = ["detection_item_pools", "fmnist_detection_paths", "iter_fmnist_detection", "render_detection_image",
           "write_fmnist_detection"]

PathLike = Union[str, os.PathLike]
_SPLIT_CODE = {"train": 0, "val": 1}
_FORMAT_VERSION = 1  # bump when the rendering changes, so cached sets are regenerated
_PLACEMENT_TRIES = 20
Box = Tuple[int, int, int, int]


def detection_item_pools(num_items: int, seed: int = 0, val_fraction: float = 0.2) -> Dict[str, np.ndarray]:
    """Disjoint item indices (into Fashion-MNIST's test split) for the ``train`` and ``val`` canvases.

    Args:
        num_items: items in the source split (10,000 for Fashion-MNIST's test split).
        seed: shuffles the items before the cut.
        val_fraction: share of the items reserved for ``val`` (at least one item each side).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if num_items < 2:
        raise ValueError(f"need at least 2 source items to make disjoint train and val pools, got {num_items}")
    order = np.random.default_rng(np.random.SeedSequence([seed, 7919])).permutation(num_items)
    n_val = min(num_items - 1, max(1, round(val_fraction * num_items)))
    return {"val": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}


def render_detection_image(
    rng: np.random.Generator, items: Sequence[np.ndarray], *, canvas: int = 128,
    scale: Tuple[float, float] = (24.0, 56.0), aspect: float = 0.15, max_overlap: float = 0.1, dark_prob: float = 0.5,
) -> Tuple[np.ndarray, List[Box], List[int]]:
    """Paste several items on one textured canvas.

    Args:
        rng: the image's generator (background first, then per item: size, aspect, colour, positions).
        items: uint8 ``(h, w)`` grey items (white object on black), pasted in this order.
        canvas: side of the square canvas in pixels.
        scale, aspect: see :func:`~.localization_fmnist.sample_item_alpha`.
        max_overlap: largest share of a box (the new one's or a placed one's) that boxes may cover.
        dark_prob: probability of a dark background with bright items (Fashion-MNIST's own polarity);
            otherwise a light background with dark items.

    Returns:
        ``(image, boxes, kept)``: uint8 ``(canvas, canvas, 3)`` RGB, the tight boxes ``(x0, y0, x1, y1)``
        (pixel edges, ``x1``/``y1`` exclusive) of the items placed, and their positions in ``items``.
    """
    bg, dark = render_background(rng, canvas, dark_prob)
    boxes: List[Box] = []
    kept: List[int] = []
    for k, item in enumerate(items):
        alpha = sample_item_alpha(rng, item, canvas=canvas, scale=scale, aspect=aspect)
        colour = item_colour(rng, dark)
        bh, bw = alpha.shape
        for _ in range(_PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(0, canvas - bw + 1)), int(rng.integers(0, canvas - bh + 1))
            if not _overlap((x0, y0, x0 + bw, y0 + bh), boxes, max_overlap):
                boxes.append(paste_item(bg, alpha, colour, x0, y0))
                kept.append(k)
                break
    return np.clip(np.rint(bg), 0, 255).astype(np.uint8), boxes, kept


def iter_fmnist_detection(
    split: str, items: Tuple[np.ndarray, np.ndarray], *, num_images: int = 1000, canvas: int = 128,
    scale: Tuple[float, float] = (24.0, 56.0), aspect: float = 0.15, max_items: int = 4, max_overlap: float = 0.1,
    dark_prob: float = 0.5, val_fraction: float = 0.2, seed: int = 0,
) -> Iterator[Tuple[np.ndarray, List[Box], List[int], List[int]]]:
    """Yield ``(image, boxes_xyxy, labels 0..9, item_indices)`` for the canvases of ``split``.

    Args:
        split: ``"train"`` or ``"val"`` (disjoint item pools, :func:`detection_item_pools`).
        items: ``(images uint8 (M, 28, 28), labels (M,))`` of Fashion-MNIST's test split.
        num_images: canvases to render.
        max_items: each canvas draws 1..max_items items (uniformly) from its split's pool.
        canvas, scale, aspect, max_overlap, dark_prob: see :func:`render_detection_image`.
        val_fraction, seed: see :func:`detection_item_pools`; same seed -> byte-identical images.
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {list(_SPLIT_CODE)}, got {split!r}")
    if num_images < 0 or max_items < 1 or canvas < 32:
        raise ValueError(f"need num_images >= 0, max_items >= 1 and canvas >= 32; got {num_images}, {max_items}, "
                         f"{canvas}")
    src_images, src_labels = np.asarray(items[0]), np.asarray(items[1])
    pool = detection_item_pools(len(src_images), seed, val_fraction)[split]
    for i in range(num_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], i + 1]))
        n = int(rng.integers(1, min(max_items, len(pool)) + 1))
        chosen = rng.choice(pool, size=n, replace=False)
        image, boxes, kept = render_detection_image(rng, [src_images[j] for j in chosen], canvas=canvas,
                                                    scale=scale, aspect=aspect, max_overlap=max_overlap,
                                                    dark_prob=dark_prob)
        picked = [int(chosen[k]) for k in kept]
        yield image, boxes, [int(src_labels[j]) for j in picked], picked


fmnist_detection_paths = coco_layout_paths  # where write_fmnist_detection puts its files


def write_fmnist_detection(
    out_dir: PathLike, *, root: Optional[PathLike] = None, num_train: int = 2000, num_val: int = 200,
    canvas: int = 128, scale: Sequence[float] = (24.0, 56.0), aspect: float = 0.15, max_items: int = 4,
    max_overlap: float = 0.1, dark_prob: float = 0.5, val_fraction: float = 0.2, seed: int = 0, reuse: bool = True,
) -> Dict[str, str]:
    """Render the train and val canvases into ``out_dir`` in COCO format (category ids 1..10).

    Args:
        out_dir: output folder (created).
        root: Fashion-MNIST folder (default ``$RB_FASHION_MNIST`` or the Debian package's).
        num_train, num_val: canvases per split.
        canvas, scale, aspect, max_items, max_overlap, dark_prob, val_fraction, seed: see
            :func:`iter_fmnist_detection`.
        reuse: skip rendering when ``out_dir`` already holds a complete set made with the same arguments
            and the same source items (recorded in ``out_dir/fmnist_det_meta.json``).

    Returns:
        ``{"train_json", "train_images", "val_json", "val_images"}`` as path strings.
    """
    out = Path(out_dir)
    paths = fmnist_detection_paths(out)
    items = tuple(t.numpy() for t in load_fashion_mnist("test", root))
    render = dict(canvas=int(canvas), scale=(float(scale[0]), float(scale[1])), aspect=float(aspect),
                  max_items=int(max_items), max_overlap=float(max_overlap), dark_prob=float(dark_prob),
                  val_fraction=float(val_fraction),
                  seed=int(seed))
    meta = {"version": _FORMAT_VERSION, "num_train": num_train, "num_val": num_val, **render,
            "scale": list(render["scale"]), "items": [int(len(items[0])), int(items[0][:64].sum())]}
    t0 = time.perf_counter()

    def samples(split: str, num: int) -> Iterator[Sample]:
        return ((image, boxes, [label + 1 for label in labels], {"fmnist_indices": picked})
                for image, boxes, labels, picked in iter_fmnist_detection(split, items, num_images=num, **render))

    if write_splits_once(out, "fmnist_det_meta.json", meta, FASHION_CATEGORIES, {"train": num_train, "val": num_val},
                         samples, "res_backbone Fashion-MNIST detection (test-split items)", reuse):
        log.info("Fashion-MNIST detection: %d train + %d val canvases of %d px in %s (%.1fs)", num_train, num_val,
                 canvas, out, time.perf_counter() - t0)
    return paths
