"""Box-safe albumentations pipelines for detection.

Every pipeline takes and returns albumentations' keyword protocol::

    out = transforms(image=uint8 HWC RGB, bboxes=(N, 4) xyxy pixels, labels=(N,) ints)
    out["image"]  -> float32 CHW tensor, normalised with the caller's mean/std
    out["bboxes"] -> (N', 4) xyxy in the transformed image's pixels
    out["labels"] -> the N' labels that survived (as floats: see ``labels_to_tensor``)

Mean and std come from the caller (the backbone weights' ``pretrained_cfg``), never from here;
resizing and normalisation live in the data pipeline, not in the model (STYLE.md, rule 6).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

__all__ = ["build_train_transforms", "build_eval_transforms", "bboxes_to_tensor", "labels_to_tensor", "worker_init_fn"]


def _bbox_params() -> A.BboxParams:
    # pascal_voc = absolute xyxy pixels, the library's box format. clip=True guards against the
    # float round-off of albumentations' normalised intermediate (x1 can come back as W + 1e-7).
    return A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, filter_invalid_bboxes=True)


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> Tuple[tuple, tuple]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean} std={std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    if max(mean) > 1.0 or max(std) > 1.0:
        # timm / torchvision configs are in [0, 1]; 0-255 values would normalise everything to ~0.
        raise ValueError(f"mean/std are expected in [0, 1] (timm's pretrained_cfg), got mean={mean} std={std}")
    return mean, std


def build_train_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    scale_jitter: Optional[Tuple[float, float]] = (0.8, 1.2),
    hflip: float = 0.5,
    photometric: bool = True,
    seed: Optional[int] = None,
) -> A.Compose:
    """Training pipeline: random-scale longest-side resize, horizontal flip, colour jitter, normalise.

    Args:
        image_size: target length of the longer image side before jitter.
        mean, std: per-channel RGB statistics in [0, 1] (the weights' ``pretrained_cfg``).
        scale_jitter: ``(lo, hi)``; the longer side becomes ``round(image_size * s)``, ``s`` drawn
            uniformly over the integers in that range. ``None`` or ``(1, 1)`` disables it.
        hflip: probability of a horizontal flip (boxes follow: ``x' = w - x``).
        photometric: brightness/contrast/saturation/hue jitter (boxes unaffected).
        seed: seed for albumentations' RNG (reproducible augmentation); ``None`` = fresh entropy.

    Returns:
        An ``A.Compose`` following the keyword protocol in the module docstring.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    mean, std = _check_stats(mean, std)
    if scale_jitter is None:
        sizes: Any = image_size
    else:
        lo, hi = sorted(scale_jitter)
        if lo <= 0:
            raise ValueError(f"scale_jitter must be positive, got {scale_jitter}")
        lo_px, hi_px = max(1, round(image_size * lo)), max(1, round(image_size * hi))
        sizes = list(range(lo_px, hi_px + 1)) if hi_px > lo_px else lo_px
    ops: list = [A.LongestMaxSize(max_size=sizes, p=1.0)]
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=hflip))
    if photometric:
        ops.append(A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.03, p=0.8))
    ops += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops, bbox_params=_bbox_params(), seed=seed)


def build_eval_transforms(image_size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Evaluation pipeline: longest side to ``image_size`` (aspect kept), normalise.

    Args:
        image_size: length of the longer side after resizing (images are scaled up or down).
        mean, std: per-channel RGB statistics in [0, 1].

    Returns:
        An ``A.Compose`` following the keyword protocol in the module docstring.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    mean, std = _check_stats(mean, std)
    ops = [A.LongestMaxSize(max_size=image_size, p=1.0), A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
           ToTensorV2()]
    return A.Compose(ops, bbox_params=_bbox_params())


def bboxes_to_tensor(bboxes: Any) -> torch.Tensor:
    """Albumentations' box output (list, tuple or array, possibly empty) -> FloatTensor (N, 4)."""
    arr = np.asarray(bboxes, dtype=np.float32)
    return torch.from_numpy(arr.reshape(-1, 4)[:, :4].copy())


def labels_to_tensor(labels: Any) -> torch.Tensor:
    """Labels back to LongTensor (N,).

    Albumentations returns integer labels passed as a list as floats (``[3] -> [3.0]``); rounding
    before the cast guards against ``2.9999999`` becoming 2.
    """
    arr = np.asarray(labels, dtype=np.float64).reshape(-1)
    return torch.from_numpy(np.rint(arr).astype(np.int64))


def worker_init_fn(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: give each worker's albumentations pipeline its own seed.

    albumentations 2.0 does not reseed in workers: every worker inherits an identical copy of the
    pipeline's RNG, so without this all workers (and, with non-persistent workers, all epochs) replay
    the same augmentation sequence. ``get_worker_info().seed`` differs per worker and per epoch and
    follows ``torch.manual_seed``, so runs stay reproducible.
    """
    import random

    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    seed = int(info.seed % 2**32)
    random.seed(seed)
    np.random.seed(seed)
    dataset = info.dataset
    while hasattr(dataset, "dataset") and not hasattr(dataset, "transforms"):  # Subset / wrappers
        dataset = dataset.dataset
    tf = getattr(dataset, "transforms", None)
    if hasattr(tf, "set_random_seed"):
        tf.set_random_seed(seed)
