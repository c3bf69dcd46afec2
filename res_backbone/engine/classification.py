"""Training and evaluation loops for image classifiers: ``model(images (N, C, H, W)) -> logits (N, K)``.

Errors are reported in percent (the paper's tables): ``top1_err = 100 * (1 - top-1 accuracy)``.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .faults import fault_point
from .step import OptimizerStep, autocast


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    start_iter: int,
    max_iters: Union[int, Callable[[], int]],
    lr_at: Callable[[int], float],
    amp: str = "none",
    scaler: Optional[torch.amp.GradScaler] = None,
    grad_clip: Optional[float] = None,
    channels_last: bool = False,
    label_smoothing: float = 0.0,
    logger=None,
    log_every: int = 50,
    on_iteration_end: Optional[Callable[[int], None]] = None,
    max_bad_steps: int = 5,
    progress=None,
) -> Tuple[int, Dict[str, float]]:
    """One pass over ``loader`` of ``(images, labels)`` batches (or until ``max_iters``).

    Args:
        max_iters: the iteration to stop at, or a callable returning it (read before every iteration,
            so a time budget can re-size the run while it goes).
        lr_at: sets the learning rate for an iteration and returns it (see :mod:`.optim`).
        amp: ``none``, ``bf16`` or ``fp16`` (fp16 wants a ``scaler``).
        label_smoothing: cross-entropy label smoothing (0 = plain cross-entropy).
        logger: a :class:`~.logger.RunLogger`; every ``log_every`` iterations it gets ``train/loss``,
            ``train/top1_err`` (of the augmented mini-batches since the last record), ``train/lr``
            and ``train/img_per_s``.
        on_iteration_end: called with the number of completed iterations (checkpointing, signals).
        max_bad_steps: consecutive non-finite losses/gradients tolerated (each step skipped) before
            :class:`~.step.NonFiniteLossError`.
        progress: an optional tqdm bar, advanced by one per iteration (loss, img/s, lr; tqdm's ETA).

    Returns:
        ``(next iteration index, {"loss", "top1_err", "n"})`` over the iterations of this call.
    """
    model.train()
    it = start_iter
    step = OptimizerStep(optimizer, model.parameters(), scaler=scaler, grad_clip=grad_clip,
                         max_bad_steps=max_bad_steps, logger=logger)
    # Running sums stay on the device; they are read (a sync) only when logging.
    win_loss = torch.zeros((), device=device)
    win_wrong = torch.zeros((), device=device)
    tot_loss, tot_wrong, tot_n, win_n = 0.0, 0.0, 0, 0
    t_last = time.perf_counter()

    def stop_at() -> int:
        return int(max_iters()) if callable(max_iters) else int(max_iters)

    for images, labels in loader:
        if it >= stop_at():
            break
        fault_point("batch", it)
        lr = lr_at(it)
        images, labels = _to_device(images, labels, device, channels_last)
        with autocast(device, amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
        step(loss, it, lambda: {"loss": float(loss.detach())})
        n = labels.shape[0]
        win_loss += loss.detach() * n
        win_wrong += (logits.detach().argmax(1) != labels).sum()
        win_n += n
        it += 1
        if it % log_every == 0 or it == stop_at():
            now = time.perf_counter()
            wl, ww = float(win_loss), float(win_wrong)
            record = {"loss": wl / win_n, "top1_err": 100.0 * ww / win_n, "lr": lr,
                      "img_per_s": win_n / max(now - t_last, 1e-9)}
            if logger is not None:
                logger.log(record, step=it, prefix="train/")
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}", err=f"{record['top1_err']:.1f}%",
                                     img_s=f"{record['img_per_s']:.0f}", lr=f"{lr:.3g}")
            tot_loss, tot_wrong, tot_n = tot_loss + wl, tot_wrong + ww, tot_n + win_n
            win_loss.zero_()
            win_wrong.zero_()
            t_last, win_n = now, 0
        if progress is not None:
            progress.update(1)
        if on_iteration_end is not None:
            on_iteration_end(it)
    if win_n:
        tot_loss, tot_wrong, tot_n = tot_loss + float(win_loss), tot_wrong + float(win_wrong), tot_n + win_n
    stats = {"loss": tot_loss / tot_n, "top1_err": 100.0 * tot_wrong / tot_n, "n": tot_n} if tot_n else {"n": 0}
    return it, stats


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
