"""One optimisation step, shared by every training loop: mixed precision, gradient clipping and the
non-finite guard (skip a step whose loss or gradient is inf/NaN; stop after several in a row)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    (``non_finite_step_skipped``); ``max_bad_steps`` in a row raise :class:`NonFiniteLossError`.
    With an fp16 ``GradScaler`` the scaler's own skip-and-rescale logic applies instead.

    Args:
        optimizer: the optimiser to step.
        params: the parameters whose gradient norm is checked (and clipped with ``grad_clip``).
        scaler: a ``torch.amp.GradScaler`` for fp16, else None.
        grad_clip: clip the total gradient norm to this value (None: no clipping).
        max_bad_steps: consecutive skipped steps tolerated.
        logger: a :class:`~.logger.RunLogger` for the skip events (optional).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], *,
                 scaler: Optional[torch.amp.GradScaler] = None, grad_clip: Optional[float] = None,
                 max_bad_steps: int = 5, logger=None):
        self.optimizer, self.params = optimizer, list(params)
        self.scaler, self.grad_clip, self.max_bad_steps, self.logger = scaler, grad_clip, max_bad_steps, logger
        self.bad = 0

    def __call__(self, loss: torch.Tensor, it: int, terms: Callable[[], Dict[str, float]]) -> bool:
        """Apply one update from ``loss`` at iteration ``it``; ``terms()`` gives the loss terms for the
        messages of a skipped step. Returns whether the parameters were updated."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
            if self.grad_clip:
                nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.scaler.step(opt)  # skips the step itself on inf/NaN gradients
            self.scaler.update()
            return True
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip else math.inf)
            finite = bool(torch.isfinite(norm))
        if finite:
            opt.step()
            self.bad = 0
            return True
        self.bad += 1
        values = terms()
        if self.logger is not None:
            self.logger.log({"event": "non_finite_step_skipped", **values}, step=it)
        if self.bad >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"iteration {it}: {self.bad} consecutive non-finite losses or gradients, last loss terms "
                f"{values}; stopping (the last good checkpoint is kept). Lower --lr or use --amp none."
            )
        return False
