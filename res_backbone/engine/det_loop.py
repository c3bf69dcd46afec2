"""Detector loops: a training pass (the shared :func:`~.loop.train_one_epoch`, the sum of the model's
losses) and prediction over a split, for detectors that follow docs/detection_interfaces.md.

``model(images, image_sizes, targets)`` returns a dict of losses in train mode and a list of
``{"boxes", "scores", "labels"}`` in eval mode; the loops know nothing else about the model.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Union

import torch
from torch import nn

from . import loop
from .loop import DetectionLoss, to_device  # noqa: F401  (to_device re-exported)
from .optim_step import AMP_DTYPES, NonFiniteLossError, OptimizerStep, autocast  # noqa: F401  (re-exported)


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
    """One pass of :func:`~.loop.train_one_epoch` over ``(images, image_sizes, targets)`` batches with the
    detectors' loss (:class:`~.loop.DetectionLoss`, the sum of the model's loss dict); return the next
    iteration index.

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
    step = OptimizerStep(optimizer, model.parameters(), scaler=scaler, grad_clip=grad_clip,
                         max_bad_steps=max_bad_steps, logger=logger)
    it, _ = loop.train_one_epoch(model, DetectionLoss(device, amp=amp, channels_last=channels_last), loader, step,
                                 start_iter=start_iter, max_iters=max_iters, lr_at=lr_at, logger=logger,
                                 log_every=log_every, on_iteration_end=on_iteration_end, progress=progress)
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
