"""The one training loop of every task: :func:`train_one_epoch` over ``(batch) -> loss``.

The loop knows nothing about the task: a ``loss_fn(model, batch) -> LossOutput`` moves the batch to the
device, runs the model (under autocast) and computes the loss; a meter turns the per-iteration outputs
into the logged records. :class:`ClassificationLoss` / :class:`WindowMeter` are the classifiers' pair,
:class:`DetectionLoss` / :class:`LastLossMeter` the detectors' (and, through
:class:`~heads.localization.evaluate.LossAdapter`, the localizers').
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_mean
from .faults import fault_point
from .optim_step import OptimizerStep, autocast

__all__ = ["ClassificationLoss", "DetectionLoss", "LastLossMeter", "LossOutput", "WindowMeter", "to_device",
           "train_one_epoch", "train_pass"]


@dataclass
class LossOutput:
    """What a ``loss_fn`` returns for one batch.

    Attributes:
        loss: the scalar to backpropagate.
        terms: its named parts (logged by :class:`LastLossMeter`; in the message of a skipped step).
        n: images in the batch.
        wrong: (classifiers) the number of wrong top-1 predictions, a 0-d tensor; None otherwise.
    """
    loss: torch.Tensor
    terms: Dict[str, torch.Tensor] = field(default_factory=dict)
    n: int = 0
    wrong: Optional[torch.Tensor] = None


def to_device(images: torch.Tensor, targets: Sequence[dict], device: torch.device, channels_last: bool = False):
    """Images (channels-last if asked) and every tensor of each target dict on ``device``."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    moved = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
             for t in targets]
    return images, moved


class ClassificationLoss:
    """``(images, labels)`` batches: cross-entropy (``label_smoothing``) of ``model(images) -> logits``,
    computed in fp32 outside autocast."""

    def __init__(self, device: torch.device, *, amp: str = "none", channels_last: bool = False,
                 label_smoothing: float = 0.0):
        self.device, self.amp, self.channels_last, self.label_smoothing = device, amp, channels_last, label_smoothing

    def __call__(self, model: nn.Module, batch) -> LossOutput:
        images, labels = batch
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return LossOutput(loss, {"loss": loss}, labels.shape[0], (logits.detach().argmax(1) != labels).sum())


class DetectionLoss:
    """``(images, image_sizes, targets)`` batches: the sum of ``model(images, image_sizes, targets) ->
    {name: loss}`` (docs/detection_interfaces.md)."""

    def __init__(self, device: torch.device, *, amp: str = "none", channels_last: bool = False):
        self.device, self.amp, self.channels_last = device, amp, channels_last

    def __call__(self, model: nn.Module, batch) -> LossOutput:
        images, image_sizes, targets = batch
        images, targets = to_device(images, targets, self.device, self.channels_last)
        with autocast(self.device, self.amp):
            losses: Dict[str, torch.Tensor] = model(images, image_sizes, targets)
        return LossOutput(sum(losses.values()), losses, images.shape[0])


class WindowMeter:
    """Classifiers' records: mean loss and top-1 error (percent) of the mini-batches since the last record
    (running sums stay on the device; read, a sync, only when logging); ``summary()`` over the whole call."""

    def __init__(self, device: torch.device):
        self.win_loss = torch.zeros((), device=device)
        self.win_wrong = torch.zeros((), device=device)
        self.tot_loss, self.tot_wrong, self.tot_n, self.win_n = 0.0, 0.0, 0, 0

    def update(self, out: LossOutput) -> None:
        self.win_loss += out.loss.detach() * out.n
        self.win_wrong += out.wrong
        self.win_n += out.n

    def record(self) -> Dict[str, float]:
        wl, ww = float(self.win_loss), float(self.win_wrong)
        rec = {"loss": wl / self.win_n, "top1_err": 100.0 * ww / self.win_n}
        self.tot_loss, self.tot_wrong, self.tot_n = self.tot_loss + wl, self.tot_wrong + ww, self.tot_n + self.win_n
        self.win_loss.zero_()
        self.win_wrong.zero_()
        self.win_n = 0
        return rec

    @staticmethod
    def postfix(rec: Dict[str, float]) -> Dict[str, str]:
        return dict(loss=f"{rec['loss']:.3f}", err=f"{rec['top1_err']:.1f}%", img_s=f"{rec['img_per_s']:.0f}",
                    lr=f"{rec['lr']:.3g}")

    def summary(self) -> Dict[str, float]:
        """``{"loss", "top1_err", "n"}`` over the iterations of this call (``{"n": 0}`` for none)."""
        tot_loss, tot_wrong, tot_n = self.tot_loss, self.tot_wrong, self.tot_n
        if self.win_n:
            tot_loss, tot_wrong = tot_loss + float(self.win_loss), tot_wrong + float(self.win_wrong)
            tot_n += self.win_n
        return {"loss": tot_loss / tot_n, "top1_err": 100.0 * tot_wrong / tot_n, "n": tot_n} if tot_n else {"n": 0}


class LastLossMeter:
    """Detectors' records: each loss term of the last iteration (averaged over the ranks) and their sum."""

    def __init__(self, device: Optional[torch.device] = None):
        self.last: Dict[str, torch.Tensor] = {}

    def update(self, out: LossOutput) -> None:
        self.last = out.terms

    def record(self) -> Dict[str, float]:
        rec = {k: float(all_reduce_mean(v.detach())) for k, v in self.last.items()}
        rec["loss"] = sum(rec.values())
        return rec

    @staticmethod
    def postfix(rec: Dict[str, float]) -> Dict[str, str]:
        return dict(loss=f"{rec['loss']:.3f}", img_s=f"{rec['img_per_s']:.1f}", lr=f"{rec['lr']:.2g}")

    def summary(self) -> Dict[str, float]:
        return {}


def train_one_epoch(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], LossOutput],
    loader: Iterable,
    step: OptimizerStep,
    *,
    start_iter: int,
    max_iters: Union[int, Callable[[], int]],
    lr_at: Callable[[int], float],
    meter=None,
    logger=None,
    log_every: int = 20,
    on_iteration_end: Optional[Callable[[int], None]] = None,
    progress=None,
) -> Tuple[int, Dict[str, float]]:
    """One pass over ``loader`` (or until ``max_iters``): ``loss_fn`` per batch, then ``step``.

    Args:
        model: put in train mode; handed to ``loss_fn``.
        loss_fn: ``(model, batch) -> LossOutput`` (moves the batch, runs the model under autocast).
        step: the :class:`~.optim_step.OptimizerStep` (AMP scaler, grad clip, non-finite guard).
        max_iters: the iteration to stop at, or a callable returning it (read before every iteration,
            so a time budget can re-size the run while it trains).
        lr_at: sets the learning rate for an iteration and returns it (see :mod:`.optim`).
        meter: turns outputs into records (:class:`WindowMeter`, :class:`LastLossMeter`, the default).
        logger: a :class:`~.logger.RunLogger`; every ``log_every`` iterations (and at the last) it gets the
            meter's record plus ``lr`` and ``img_per_s`` under ``train/``.
        on_iteration_end: called with the number of completed iterations (checkpointing, signals).
        progress: an optional tqdm bar, advanced by one per iteration (the record as postfix).

    Returns:
        ``(next iteration index, meter.summary())``.
    """
    meter = LastLossMeter() if meter is None else meter
    model.train()
    it = start_iter
    t_last, n_imgs = time.perf_counter(), 0

    def stop_at() -> int:
        return int(max_iters()) if callable(max_iters) else int(max_iters)

    for batch in loader:
        if it >= stop_at():
            break
        fault_point("batch", it)
        lr = lr_at(it)
        out = loss_fn(model, batch)
        step(out.loss, it, lambda: {k: float(v.detach()) for k, v in out.terms.items()})
        meter.update(out)
        it += 1
        n_imgs += out.n
        if it % log_every == 0 or it == stop_at():
            now = time.perf_counter()
            record = meter.record()
            record.update(lr=lr, img_per_s=n_imgs / max(now - t_last, 1e-9))
            if logger is not None:
                logger.log(record, step=it, prefix="train/")
            if progress is not None:
                progress.set_postfix(**meter.postfix(record))
            t_last, n_imgs = now, 0
        if progress is not None:
            progress.update(1)
        if on_iteration_end is not None:
            on_iteration_end(it)
    return it, meter.summary()


def train_pass(model: nn.Module, loss_fn: Callable[[nn.Module, object], LossOutput], loader: Iterable,
               optimizer: torch.optim.Optimizer, *, scaler: Optional[torch.amp.GradScaler] = None,
               grad_clip: Optional[float] = None, max_bad_steps: int = 5, logger=None, **loop_kw,
               ) -> Tuple[int, Dict[str, float]]:
    """:func:`train_one_epoch` with a fresh :class:`~.optim_step.OptimizerStep` over ``optimizer`` (``scaler``,
    ``grad_clip``, ``max_bad_steps``; its skip events go to ``logger``); ``loop_kw``: the loop's keywords."""
    step = OptimizerStep(optimizer, model.parameters(), scaler=scaler, grad_clip=grad_clip,
                         max_bad_steps=max_bad_steps, logger=logger)
    return train_one_epoch(model, loss_fn, loader, step, logger=logger, **loop_kw)
