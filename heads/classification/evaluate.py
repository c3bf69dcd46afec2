"""Top-1/top-5 error of classification checkpoints under the ResNet paper's testing protocols (``tools/eval_cls.py``).

    report = evaluate_checkpoints(["runs/cls/checkpoint_best.pt"], protocols=["center", "10crop"])
    print(report["table"])

Protocols and their default sizes are :mod:`res_backbone.evaluation.classification`'s: sizes follow the paper's,
scaled to the checkpoint's training size. Several checkpoints also give an "ensemble" row (mean softmax).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from res_backbone.data.classification import build_cls_datasets
from res_backbone.data.fashion_mnist import FashionMNISTNotFoundError
from res_backbone.data.preflight import preflight
from res_backbone.evaluation.classification import (
    collect_protocol_probs, default_protocol_sizes, errors_from_probs, markdown_table,
)

from .build import load_classifier

__all__ = ["ProtocolOptions", "evaluate_checkpoints", "row_names"]


@dataclass
class ProtocolOptions:
    """How the protocols see the data (None: the paper's default for the checkpoint's training size)."""

    protocols: Sequence[str] = ("center", "10crop", "multiscale")
    scales: Optional[Sequence[int]] = None
    crop: Optional[int] = None
    resize: Optional[int] = None
    resize_mode: Optional[str] = None  # "pad" (default for Fashion-MNIST) or "resize" (default for a val folder)
    average: str = "probs"


def row_names(paths: Sequence[str]) -> List[str]:
    """Short unique names for the table: file names, with parent folders added until unique."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _check_compatible(paths: Sequence[str], models) -> None:
    """Raise ValueError when the checkpoints cannot share one data pipeline / ensemble."""
    ref = models[0].pretrained_cfg
    for path, m in zip(paths[1:], models[1:]):
        cfg = m.pretrained_cfg
        for key in ("mean", "std"):
            if [float(v) for v in cfg.get(key, ())] != [float(v) for v in ref.get(key, ())]:
                problem = f"{path} normalises with {key}={cfg.get(key)}, {paths[0]} with {ref.get(key)}"
                raise ValueError(f"checkpoints cannot be evaluated together: {problem}")
        for attr, what in (("num_classes", "classes"), ("in_chans", "input channels")):
            if getattr(m, attr) != getattr(models[0], attr):
                raise ValueError(f"checkpoints cannot be evaluated together: {path} has {getattr(m, attr)} {what}, "
                                 f"{paths[0]} has {getattr(models[0], attr)} {what}")


def evaluate_checkpoints(paths: Sequence[str], options: ProtocolOptions = ProtocolOptions(), *,
                         data_dir: Optional[str] = None, val_dir: Optional[str] = None, limit: Optional[int] = None,
                         batch_size: int = 256, workers: int = 0, device: str = "cpu", ensemble: bool = True,
                         progress: bool = True, check_images: str = "header", on_bad_image: str = "error",
                         output: Optional[str] = None) -> dict:
    """Evaluate ``paths`` (``train_cls.py`` checkpoints) on the Fashion-MNIST test split or an ImageFolder tree.

    Fashion-MNIST's 10-crop source is the image zero-padded like the training crops; ImageFolder images are
    resized and centre-cropped to a square of the largest size any protocol needs, then resized per protocol.

    An image folder is checked first (:func:`res_backbone.data.preflight.preflight` with ``check_images`` and
    ``on_bad_image``; ``bad_images.json`` goes to ``output``).

    Returns:
        ``{"checkpoints", "data", "protocols", "results", "table"}`` (what ``eval_cls.json`` holds).

    Raises:
        ValueError / OSError: unreadable or incompatible checkpoints, missing data, or data whose classes differ.
    """
    dev = torch.device(device)
    try:
        loaded = [load_classifier(p, map_location=dev) for p in paths]
    except RuntimeError as e:  # a state dict that does not fit its own architecture
        raise ValueError(str(e)) from None
    models = [m for m, _ in loaded]
    _check_compatible(paths, models)
    cfg, meta = models[0].pretrained_cfg, loaded[0][1]
    train_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    defaults = default_protocol_sizes(train_size)
    crop, resize = options.crop or defaults["crop"], options.resize or defaults["resize"]
    scales = options.scales or defaults["scales"]
    mode = options.resize_mode or ("resize" if val_dir else "pad")
    interpolation = cfg.get("interpolation", "bilinear")
    # The largest image any protocol cuts or resizes from: ImageFolder images are loaded at that square size.
    load_size = max([resize, crop] + (list(scales) if "multiscale" in options.protocols else []))
    try:
        data = build_cls_datasets(data_dir=data_dir, val_dir=val_dir, in_chans=models[0].in_chans, train=False,
                                  limit_val=limit, mean=[float(v) for v in cfg["mean"]],
                                  std=[float(v) for v in cfg["std"]], resize=load_size, crop=load_size,
                                  classes=meta.get("classes") if val_dir else None, interpolation=interpolation)
    except FashionMNISTNotFoundError as e:
        raise FashionMNISTNotFoundError(f"{e} (or pass --val-dir)") from None
    left_out = 0
    if hasattr(data.val, "image_files"):  # an image folder (Fashion-MNIST is in memory)
        left_out = len(preflight({"val": data.val}, mode=check_images, policy=on_bad_image, output=output,
                                 progress=progress).bad)
    if len(data.classes) != models[0].num_classes:
        raise ValueError(
            f"the data has {len(data.classes)} classes ({val_dir or 'Fashion-MNIST'}) but the classifier of {paths[0]} "
            f"has num_classes={models[0].num_classes}: evaluate it on data with its classes, or fine-tune it first "
            f"(tools/train_cls.py --pretrained {paths[0]}, which starts a new {len(data.classes)}-class classifier)")
    loader = torch.utils.data.DataLoader(data.val, batch_size=batch_size, shuffle=False, num_workers=workers)
    names = row_names(paths)
    fill = [(0.0 - m) / s for m, s in zip(data.mean, data.std)]  # a black pixel, as the training padding
    probs, labels, sizes = collect_protocol_probs(
        dict(zip(names, models)), loader, options.protocols, crop=crop, resize=resize, scales=scales,
        source_mode=mode, fill=fill, average=options.average, interpolation=interpolation, device=dev,
        progress=progress,
    )
    results = errors_from_probs(probs, labels, ensemble=ensemble)
    return {
        "checkpoints": {name: {"path": str(path), "model_name": m.get("model_name"), "epoch": m.get("epoch"),
                               "iter": m.get("iter"), "train_metrics": m.get("metrics")}
                        for name, path, (_, m) in zip(names, paths, loaded)},
        "data": {"source": val_dir or "fashion_mnist_test", "n_images": int(labels.numel()),
                 "classes": data.classes, "mean": list(data.mean), "std": list(data.std),
                 "bad_images_left_out": left_out},
        "protocols": {"names": list(options.protocols), "train_size": train_size, **sizes,
                      "interpolation": interpolation, "fill": fill, "load_size": load_size},
        "results": results,
        "table": markdown_table(results),
    }
