"""What a trained model needs to be used on its own: the one description shared by checkpoints and exported files.

A ``train_*.py`` checkpoint and every file ``tools/export.py`` writes carry the same facts (task, classes, mean/std,
training size), so a predictor built from either prepares images the same way and reports the same category ids::

    meta = model_meta(torch.load("runs/demo/checkpoint_best.pt", weights_only=True), source="checkpoint_best.pt")
    meta["task"], meta["cat_ids"], meta["class_names"], meta["mean"], meta["image_size"]

Keys (all JSON-serialisable, so they fit ONNX ``metadata_props`` and TorchScript extra files as one JSON string):

* ``task``: ``"detection"``, ``"classification"`` or ``"localization"``.
* ``arch``: the backbone name (``"resnet50"``).
* ``num_classes``: foreground classes (detection: labels are ``1..num_classes``, 0 is background;
  classification and localization: logits index ``0..num_classes-1``).
* ``cat_ids``: the dataset's own category id of each class in label order (COCO ids for detection and
  localization; ``None`` for classification folders, whose classes are the folder names).
* ``class_names``: a name per class, in label order.
* ``mean``, ``std``: RGB statistics in [0, 1] that images are normalised with.
* ``image_size``: detection and localization: the longer side (detection) or side (localization) images are
  resized to; classification: the square input side.
* ``library_version``: the version that trained the model.
* ``crop_pct``, ``interpolation``: classification only (else None): evaluation resizes the shorter side to
  ``image_size / crop_pct`` with this interpolation, then crops the centre.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

from res_backbone.weights.catalogue import IMAGENET_MEAN, IMAGENET_STD

TASKS = ("detection", "classification", "localization")
FILE_TASKS = TASKS + ("backbone",)  # an exported file may also hold a task model's backbone
META_KEY = "res_backbone_meta"  # the key under which exported files store json.dumps(model_meta(...))


class MetaError(ValueError):
    """A checkpoint or exported file lacks what prediction needs, or describes another task."""


def model_meta(ckpt: Dict[str, Any], *, source: str = "checkpoint") -> Dict[str, Any]:
    """The prediction facts of a training checkpoint dict (``train_det.py``, ``train_cls.py``, ``train_loc.py``).

    Args:
        ckpt: the loaded checkpoint (``torch.load(path, weights_only=True)``).
        source: the file name, for error messages.

    Returns:
        The dict described in the module docstring.

    Raises:
        MetaError: the checkpoint names no task, or a field prediction needs is missing.
    """
    task = ckpt.get("task")
    if task not in TASKS:
        raise MetaError(f"{source}: not a train_det/train_cls/train_loc checkpoint (its 'task' is {task!r}; "
                        f"expected one of {', '.join(TASKS)})")
    cfg = ckpt.get("config") or {}
    pcfg = ckpt.get("pretrained_cfg") or {}
    if task == "detection":
        names, cat_ids = ckpt.get("class_names"), ckpt.get("cat_ids")
        arch = ckpt.get("arch") or (ckpt.get("detector_kwargs") or {}).get("backbone")
        image_size = cfg.get("image_size")
    elif task == "classification":
        names, cat_ids = ckpt.get("classes"), None
        arch = ckpt.get("model_name")
        input_size = pcfg.get("input_size") or [None, cfg.get("image_size")]
        image_size = input_size[-1]
    else:
        names, cat_ids = ckpt.get("classes"), ckpt.get("cat_ids")
        arch, image_size = ckpt.get("model_name"), ckpt.get("image_size")
    missing = [k for k, v in (("class names", names), ("backbone name", arch), ("image size", image_size)) if not v]
    if task != "classification" and not cat_ids:
        missing.append("cat_ids")
    if missing:
        raise MetaError(f"{source}: {task} checkpoint lacks {', '.join(missing)}")
    if cat_ids is not None and len(cat_ids) != len(names):
        raise MetaError(f"{source}: {len(cat_ids)} category ids but {len(names)} class names")
    return {
        "task": task,
        "arch": str(arch),
        "num_classes": len(names),
        "cat_ids": None if cat_ids is None else [int(c) for c in cat_ids],
        "class_names": [str(n) for n in names],
        "mean": [float(v) for v in pcfg.get("mean", IMAGENET_MEAN)],
        "std": [float(v) for v in pcfg.get("std", IMAGENET_STD)],
        "image_size": int(image_size),
        "library_version": str(ckpt.get("library_version", "unknown")),
        # how a classifier's evaluation resized before cropping (None elsewhere): exported files keep it too
        "crop_pct": pcfg.get("crop_pct") if task == "classification" else None,
        "interpolation": pcfg.get("interpolation") if task == "classification" else None,
    }


def dumps(meta: Dict[str, Any]) -> str:
    """``meta`` as the JSON string exported files store under :data:`META_KEY`."""
    return json.dumps(meta, sort_keys=True)


def loads(text: Optional[str], *, source: str, expect_task: Optional[str] = None) -> Dict[str, Any]:
    """Parse and check the JSON an exported file stores; ``expect_task`` rejects a model of another task.

    Raises:
        MetaError: ``text`` is missing or malformed, a key is missing, or the task differs.
    """
    if not text:
        raise MetaError(f"{source}: no '{META_KEY}' metadata (export the model with tools/export.py)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetaError(f"{source}: '{META_KEY}' metadata is not JSON ({e})") from None
    required = ("task", "arch", "num_classes", "class_names", "mean", "std", "image_size")
    missing = [k for k in required if k not in meta]
    if missing:
        raise MetaError(f"{source}: '{META_KEY}' metadata lacks {', '.join(missing)}")
    if meta["task"] not in FILE_TASKS:
        raise MetaError(f"{source}: unknown task {meta['task']!r} in its metadata")
    if len(meta["class_names"]) != meta["num_classes"]:
        raise MetaError(f"{source}: metadata lists {len(meta['class_names'])} class names for "
                        f"{meta['num_classes']} classes")
    check_task(meta, expect_task, source=source)
    return meta


def check_task(meta: Dict[str, Any], expect_task: Optional[str], *, source: str) -> None:
    """Raise :class:`MetaError` when ``meta`` is of another task than ``expect_task`` (None: any)."""
    if expect_task is not None and meta["task"] != expect_task:
        raise MetaError(f"{source}: a {meta['task']} model, but a {expect_task} model is expected here")
