"""Writing a rendered set in COCO layout, once: what the built-in generators share.

Layout: ``out/{train,val}/NNNNNN.png`` and ``out/annotations/instances_{train,val}.json`` (what
``tools/train_det.py --train-json ... --train-images ...`` and ``tools/train_loc.py`` read).
:func:`render_once` keeps a finished set and regenerates one made with other arguments.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..io import atomic_write_json

__all__ = ["Sample", "coco_layout_paths", "render_once", "write_coco_split", "write_splits_once"]

PathLike = Union[str, os.PathLike]
#: one rendered image: uint8 ``(H, W, 3)``, its boxes ``(x0, y0, x1, y1)`` (pixel edges, ``x1``/``y1``
#: exclusive), their COCO category ids, and extra fields for the image's COCO record
Sample = Tuple[np.ndarray, Sequence[Tuple[int, int, int, int]], Sequence[int], Mapping]


def _write_json(obj: dict, path: Path) -> None:
    atomic_write_json(obj, path, separators=(",", ":"))  # compact: the sets' json files are large


def coco_layout_paths(out_dir: PathLike) -> Dict[str, str]:
    """Where a set written into ``out_dir`` keeps its files (nothing is generated or checked)."""
    out = Path(out_dir)
    return {"train_json": str(out / "annotations" / "instances_train.json"), "train_images": str(out / "train"),
            "val_json": str(out / "annotations" / "instances_val.json"), "val_images": str(out / "val")}


def write_coco_split(out: Path, split: str, samples: Iterable[Sample], categories: List[dict], info: dict) -> None:
    """Save each sample as ``out/split/NNNNNN.png`` (ids from 1) and the split's COCO json, atomically."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (image, boxes, category_ids, extra) in enumerate(samples):
        image_id = i + 1
        name = f"{image_id:06d}.png"
        Image.fromarray(image).save(folder / name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": name, "height": image.shape[0], "width": image.shape[1], **extra})
        for (x0, y0, x1, y1), cat in zip(boxes, category_ids):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)),
                                "iscrowd": 0})
    path = out / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json({"info": info, "licenses": [], "images": images, "annotations": annotations,
                 "categories": categories}, path)


def render_once(meta_path: Path, meta: dict, paths: Dict[str, str], write: Callable[[], None],
                reuse: bool = True) -> bool:
    """Call ``write()`` unless a complete set made with ``meta`` is already there; return whether it wrote.

    ``meta_path`` (next to the set) records the arguments; it is removed while writing and written last,
    so an interrupted rendering is never mistaken for a complete one.
    """
    if reuse and meta_path.is_file() and all(Path(p).exists() for p in paths.values()):
        try:
            if json.loads(meta_path.read_text()) == meta:
                return False
        except (OSError, ValueError):
            pass
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    if meta_path.exists():
        meta_path.unlink()  # incomplete while (re)generating
    write()
    _write_json(meta, meta_path)
    return True


def write_splits_once(out: Path, meta_file: str, meta: dict, categories: List[dict], counts: Mapping[str, int],
                      samples: Callable[[str, int], Iterable[Sample]], description: str, reuse: bool = True) -> bool:
    """The Fashion-MNIST generators' common end: unless ``out`` holds a complete set made with ``meta``
    (:func:`render_once`, recorded in ``out/meta_file``), write each ``split`` of ``counts`` from
    ``samples(split, num)``, its COCO ``info`` saying ``"{description}, {split}"`` and ``meta``'s version and
    seed. Returns whether it wrote."""
    def write() -> None:
        for split, num in counts.items():
            write_coco_split(out, split, samples(split, num), categories,
                             {"description": f"{description}, {split}", "version": str(meta["version"]),
                              "seed": meta["seed"]})

    return render_once(out / meta_file, meta, coco_layout_paths(out), write, reuse)
