"""Classifier loops: a training pass (the shared :func:`~.loop.train_one_epoch` with cross-entropy) and
the evaluation (top-1/top-5 error, per-class accuracy) of ``model(images (N, C, H, W)) -> logits (N, K)``.

Errors are reported in percent (the paper's tables): ``top1_err = 100 * (1 - top-1 accuracy)``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from res_backbone.engine import loop
from res_backbone.engine.loop import ClassificationLoss, WindowMeter
from res_backbone.engine.optim_step import autocast


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *, device: torch.device, amp: str = "none",
    channels_last: bool = False, label_smoothing: float = 0.0, log_every: int = 50, **kw,
) -> Tuple[int, Dict[str, float]]:
    """One pass of :func:`~.loop.train_one_epoch` over ``(images, labels)`` batches with the classifiers'
    loss (:class:`~.loop.ClassificationLoss`) and records (:class:`~.loop.WindowMeter`).

    Args:
        kw: ``start_iter``, ``max_iters``, ``lr_at``, ``scaler``, ``grad_clip``, ``logger``,
            ``on_iteration_end``, ``max_bad_steps``, ``progress`` (:func:`~.loop.train_pass`).
        max_iters: the iteration to stop at, or a callable returning it (read before every iteration).
        lr_at: sets the learning rate for an iteration and returns it (see :mod:`.optim`).
        amp: ``none``, ``bf16`` or ``fp16`` (fp16 wants a ``scaler``).
        label_smoothing: cross-entropy label smoothing (0 = plain cross-entropy).
        logger: a :class:`~.logger.RunLogger`; every ``log_every`` iterations it gets ``train/loss``,
            ``train/top1_err`` (of the augmented mini-batches since the last record), ``train/lr``
            and ``train/img_per_s``.
        on_iteration_end: called with the number of completed iterations (checkpointing, signals).
        max_bad_steps: consecutive non-finite losses/gradients tolerated (each step skipped) before
            :class:`~.optim_step.NonFiniteLossError`.
        progress: an optional tqdm bar, advanced by one per iteration (loss, img/s, lr; tqdm's ETA).

    Returns:
        ``(next iteration index, {"loss", "top1_err", "n"})`` over the iterations of this call.
    """
    loss_fn = ClassificationLoss(device, amp=amp, channels_last=channels_last, label_smoothing=label_smoothing)
    return loop.train_pass(model, loss_fn, loader, optimizer, meter=WindowMeter(device), log_every=log_every, **kw)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, *, amp: str = "none", channels_last: bool = False,
    num_classes: Optional[int] = None, progress=None,
) -> Dict[str, object]:
    """Top-1/top-5 error (percent), mean cross-entropy and per-class accuracy over ``loader``.

    Returns:
        ``{"top1_err", "top5_err" (None with fewer than 5 classes), "loss", "n",
        "per_class_acc" (list, percent, index = class; None for a class without images)}``.
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong1 = torch.zeros((), dtype=torch.int64, device=device)
    wrong5 = torch.zeros((), dtype=torch.int64, device=device)
    per_class_right = per_class_n = None
    n = 0
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        k = logits.shape[1]
        if per_class_right is None:
            k_total = max(k, num_classes or 0)
            per_class_right = torch.zeros(k_total, dtype=torch.int64, device=device)
            per_class_n = torch.zeros(k_total, dtype=torch.int64, device=device)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        top = logits.topk(min(5, k), dim=1).indices
        hit1 = top[:, 0] == labels
        wrong1 += (~hit1).sum()
        if k >= 5:
            wrong5 += (~(top == labels[:, None]).any(1)).sum()
        per_class_n += torch.bincount(labels, minlength=per_class_n.numel())
        per_class_right += torch.bincount(labels[hit1], minlength=per_class_n.numel())
        n += labels.shape[0]
        if progress is not None:
            progress.update(1)
    if n == 0:
        raise ValueError("evaluate: the loader yielded no images")
    counts, right = per_class_n.tolist(), per_class_right.tolist()
    return {
        "top1_err": 100.0 * float(wrong1) / n,
        "top5_err": 100.0 * float(wrong5) / n if k >= 5 else None,
        "loss": float(loss_sum) / n,
        "n": n,
        "per_class_acc": [100.0 * r / c if c else None for r, c in zip(right, counts)],
    }
