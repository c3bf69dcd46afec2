"""Training and evaluation loops for detectors that follow docs/detection_interfaces.md.

``model(images, image_sizes, targets)`` returns a dict of losses in train mode and a list of
``{"boxes", "scores", "labels"}`` in eval mode; the loops know nothing else about the model.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .distributed import all_reduce_mean
from .faults import fault_point
from .step import AMP_DTYPES, NonFiniteLossError, OptimizerStep, autocast  # noqa: F401  (re-exported)


def to_device(images: torch.Tensor, targets: Sequence[dict], device: torch.device, channels_last: bool = False):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    moved = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
             for t in targets]
    return images, moved


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
    logger=None,
    log_every: int = 20,
    on_iteration_end: Optional[Callable[[int], None]] = None,
    max_bad_steps: int = 5,
    progress=None,
) -> int:
    """Run one pass over ``loader`` (or until ``max_iters``); return the next iteration index.

    Args:
        max_iters: the iteration to stop at, or a callable returning it (read before every iteration,
            so a time budget can re-size the run while it trains).
        lr_at: sets the learning rate for an iteration and returns it (see :mod:`.optim`).
        amp: ``none``, ``bf16`` or ``fp16`` (fp16 wants a ``scaler``).
        on_iteration_end: called with the number of completed iterations (checkpointing, unfreezing).
        max_bad_steps: consecutive non-finite losses/gradients tolerated (each step skipped) before
            :class:`NonFiniteLossError`; with fp16 the scaler's own skip logic applies instead.
        progress: an optional tqdm bar, advanced by one per iteration with loss and img/s.
    """
    model.train()
    it = start_iter
    step = OptimizerStep(optimizer, model.parameters(), scaler=scaler, grad_clip=grad_clip,
                         max_bad_steps=max_bad_steps, logger=logger)
    t_last, n_imgs = time.perf_counter(), 0
    def limit() -> int:
        return int(max_iters()) if callable(max_iters) else int(max_iters)

    for images, image_sizes, targets in loader:
        if it >= limit():
            break
        fault_point("batch", it)
        lr = lr_at(it)
        images, targets = to_device(images, targets, device, channels_last)
        with autocast(device, amp):
            losses: Dict[str, torch.Tensor] = model(images, image_sizes, targets)
        loss = sum(losses.values())
        step(loss, it, lambda: {k: float(v.detach()) for k, v in losses.items()})
        it += 1
        n_imgs += images.shape[0]
        if it % log_every == 0 or it == limit():
            now = time.perf_counter()
            record = {k: float(all_reduce_mean(v.detach())) for k, v in losses.items()}
            record.update(loss=sum(record.values()), lr=lr, img_per_s=n_imgs / max(now - t_last, 1e-9))
            if logger is not None:
                logger.log(record, step=it, prefix="train/")
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.1f}", lr=f"{lr:.2g}")
            t_last, n_imgs = now, 0
        if progress is not None:
            progress.update(1)
        if on_iteration_end is not None:
            on_iteration_end(it)
    return it


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, *, device: torch.device, amp: str = "none", channels_last: bool = False,
    progress=None,
) -> List[tuple]:
    """Run the detector over ``loader``; return ``[(output, target), ...]`` on CPU for this rank."""
    model.eval()
    pairs = []
    for images, image_sizes, targets in loader:
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            outputs = model(images, image_sizes)
        for out, tgt in zip(outputs, targets):
            pairs.append(({k: v.float().cpu() for k, v in out.items()}, tgt))
        if progress is not None:
            progress.update(1)
    return pairs
