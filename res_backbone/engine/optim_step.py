"""One optimisation step, shared by every training loop: mixed precision, gradient clipping and the
non-finite guard (skip a step whose loss or gradient is inf/NaN; stop after several in a row)."""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from .faults import fault_point

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# Consecutive bad steps per optimiser: a training loop makes a new OptimizerStep for every pass, and a
# run of bad steps that crosses an epoch boundary must still count as one run.
_BAD_STREAK: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list]" = weakref.WeakKeyDictionary()


class NonFiniteLossError(RuntimeError):
    """Training stopped after too many consecutive non-finite losses or gradients."""


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in ``none|bf16|fp16`` (a no-op context for ``none``)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class OptimizerStep:
    """``step(loss, it, terms)``: zero the gradients, backpropagate, clip, update - or skip a bad step.

    Without a ``scaler``, a non-finite loss or gradient norm skips the update and is logged
    (``non_finite_step_skipped``, one ``log.jsonl`` line per skipped step, with the loss terms);
    ``max_bad_steps`` in a row raise :class:`NonFiniteLossError`. With an fp16 ``GradScaler`` the
    scaler's own skip-and-rescale logic decides (an overflowing gradient is routine at a high scale;
    logged as ``amp_step_skipped``), but ``max_bad_steps`` non-finite *losses* in a row still stop the
    run: lowering the scale cannot repair a forward pass that is already inf/NaN.

    Args:
        optimizer: the optimiser to step.
        params: the parameters whose gradient norm is checked (and clipped with ``grad_clip``).
        scaler: a ``torch.amp.GradScaler`` for fp16, else None.
        grad_clip: clip the total gradient norm to this value (None: no clipping).
        max_bad_steps: consecutive skipped steps tolerated (counted per optimiser, so across the
            ``OptimizerStep`` objects of successive passes).
        logger: a :class:`~.logger.RunLogger` for the skip events (optional).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], *,
                 scaler: Optional[torch.amp.GradScaler] = None, grad_clip: Optional[float] = None,
                 max_bad_steps: int = 5, logger=None):
        self.optimizer, self.params = optimizer, list(params)
        self.scaler, self.grad_clip, self.max_bad_steps, self.logger = scaler, grad_clip, max_bad_steps, logger
        self._streak = _BAD_STREAK.setdefault(optimizer, [0])

    @property
    def bad(self) -> int:
        """Consecutive skipped steps with a non-finite loss or gradient so far."""
        return self._streak[0]

    @bad.setter
    def bad(self, value: int) -> None:
        self._streak[0] = value

    def __call__(self, loss: torch.Tensor, it: int, terms: Callable[[], Dict[str, float]]) -> bool:
        """Apply one update from ``loss`` at iteration ``it``; ``terms()`` gives the loss terms for the
        messages of a skipped step. Returns whether the parameters were updated."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            return self._scaled_step(loss, it, terms)
        # backward() even for a non-finite loss: under DistributedDataParallel every rank must join the
        # gradient all-reduce, which then hands the NaN to all ranks, so they all skip this step together.
        loss.backward()
        fault_point("step", it)
        norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip else math.inf)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
        if finite:
            opt.step()
            self.bad = 0
            return True
        self._bad_step(it, terms(), "non_finite_step_skipped")
        return False

    def _scaled_step(self, loss: torch.Tensor, it: int, terms: Callable[[], Dict[str, float]]) -> bool:
        scaler, opt = self.scaler, self.optimizer
        finite_loss = bool(torch.isfinite(loss))
        scaler.scale(loss).backward()
        fault_point("step", it)
        scaler.unscale_(opt)
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        scale = scaler.get_scale()
        scaler.step(opt)  # skips the update itself on inf/NaN gradients
        scaler.update()
        if scaler.get_scale() >= scale:  # the scale only drops when the scaler found inf/NaN and skipped
            self.bad = 0
            return True
        if finite_loss:  # a gradient overflow: routine for the scaler, not counted towards max_bad_steps
            if self.logger is not None:
                self.logger.log({"event": "amp_step_skipped", "scale": scale}, step=it)
            return False
        self._bad_step(it, terms(), "amp_step_skipped")
        return False

    def _bad_step(self, it: int, values: Dict[str, float], event: str) -> None:
        """Count a skipped step with a non-finite loss or gradient; stop after ``max_bad_steps`` in a row."""
        self.bad += 1
        if self.logger is not None:
            self.logger.log({"event": event, **values}, step=it)
        if self.bad >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"iteration {it}: {self.bad} consecutive non-finite losses or gradients, last loss terms "
                f"{values}; stopping (the last good checkpoint is kept). Lower --lr or use --amp none."
            )
