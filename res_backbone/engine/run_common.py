"""What every training run shares (detection, classification, localization).

* :func:`seed_everything` - Python, NumPy and torch seeds (optionally deterministic kernels);
* :class:`SignalFlag` / :class:`Preempted` / :data:`EXIT_PREEMPTED` - SIGTERM/SIGINT become a flag the
  loop checks between iterations; the run writes a checkpoint, raises :class:`Preempted`, and the tool
  exits with 143, what batch schedulers expect from a job that stopped on request;
* :func:`resolve_resume` - ``--resume auto|PATH`` to a checkpoint path (the newest valid one for auto);
* :func:`save_run_checkpoint` - ``checkpoint_last.pt`` rotated (the previous one kept as
  ``checkpoint_prev.pt``), any other name written atomically;
* :func:`unwrap` - the model inside a DistributedDataParallel wrapper;
* :func:`restore_training_state` - model, optimiser, grad-scaler and RNG state from a loaded checkpoint;
* :func:`run_epochs` - the outer loop: epochs of a caller's ``train_epoch``, checkpoints every N
  iterations and at each epoch end, and SIGTERM/SIGINT -> checkpoint -> :class:`Preempted`.
"""
from __future__ import annotations

import logging
import random
import signal
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt_mod
from .step import NonFiniteLossError

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a job that stopped on request
LAST_CHECKPOINT = "checkpoint_last.pt"


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's and torch's global RNGs; ``deterministic`` also asks for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run should exit with EXIT_PREEMPTED."""


class SignalFlag:
    """Turns SIGTERM/SIGINT into a flag checked between iterations (the step in flight finishes).

    Use as a context manager; ``signum`` is None until a signal arrives. A second Ctrl-C stops at once.
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> "SignalFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def resolve_resume(resume: Optional[str], output: Union[str, Path]) -> Optional[Path]:
    """Turn ``--resume`` into a checkpoint path.

    Args:
        resume: ``None``/``""`` (start fresh), ``"auto"`` (the newest readable checkpoint in ``output``,
            or a fresh start when there is none) or a checkpoint path.
        output: the run folder.

    Raises:
        FileNotFoundError: an explicit path that does not exist (naming it).
    """
    if not resume:
        return None
    if resume == "auto":
        found = ckpt_mod.find_resume_checkpoint(output)
        if found is None:
            log.info("--resume auto: no checkpoint in %s, starting fresh", output)
        return found
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file (use --resume auto to pick the "
                                f"newest one in --output, or leave it out to start fresh)")
    return path


def save_run_checkpoint(payload: Dict[str, Any], output: Union[str, Path], name: str = LAST_CHECKPOINT) -> Path:
    """Write ``payload`` as ``output/name``: ``checkpoint_last.pt`` through :func:`~.checkpoint.rotate_and_save`
    (the previous file survives as ``checkpoint_prev.pt``), anything else (``checkpoint_best.pt``) atomically."""
    if name == LAST_CHECKPOINT:
        return ckpt_mod.rotate_and_save(payload, output, name)
    return ckpt_mod.atomic_save(payload, Path(output) / name)


def restore_training_state(state: Dict[str, Any], path: Union[str, Path], model: nn.Module,
                           optimizer: torch.optim.Optimizer, scaler=None) -> None:
    """Load a checkpoint dict's ``model``, ``optimizer``, ``scaler`` and ``rng`` entries (``--resume``).

    Raises:
        CorruptCheckpointError: the weights do not fit ``model`` (naming ``path`` and the keys).
    """
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ckpt_mod.CorruptCheckpointError(f"{path}: does not fit this model ({e})") from e
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ckpt_mod.set_rng_state(state.get("rng"))


def run_epochs(
    *, start_iter: int, max_iters: Union[int, Callable[[], int]], iters_per_epoch: int, sampler,
    train_epoch: Callable[[int, Callable[[int], None]], int], save: Callable[[int], None],
    after_epoch: Optional[Callable[[int, bool], None]] = None, checkpoint_every: int = 0, logger=None,
    output: Union[str, Path] = ".",
) -> int:
    """Run epochs until ``max_iters``; return the final iteration count.

    Args:
        max_iters: the iteration to stop at, or a callable returning it (read before every pass and
            after every iteration, so a run sized by a time budget can set it once it knows its speed).
        sampler: has ``set_epoch(epoch)`` and ``skip(k)`` (the first ``k`` batches of the next pass
            are dropped, so a run resumed mid-epoch continues where it stopped).
        train_epoch: ``train_epoch(it, on_iteration_end) -> next it``: one pass from iteration ``it``,
            calling ``on_iteration_end(done)`` after every iteration.
        save: ``save(it)`` writes ``checkpoint_last.pt`` (called every ``checkpoint_every``
            iterations, at every epoch end and on a signal).
        after_epoch: ``after_epoch(it, last)`` after each pass and before its checkpoint
            (evaluation, best checkpoint); ``last`` is True at ``max_iters``.
        logger: a :class:`~.logger.RunLogger` for the ``preempted`` / ``stopped_non_finite`` events.

    Raises:
        Preempted: SIGTERM/SIGINT arrived; the iteration in flight finished and was checkpointed.
        NonFiniteLossError: from ``train_epoch``, logged and re-raised.
    """
    it = start_iter

    def limit() -> int:
        return int(max_iters()) if callable(max_iters) else int(max_iters)

    def log_event(record: Dict[str, Any], step: int) -> None:
        if logger is not None:
            logger.log(record, step=step)

    with SignalFlag() as sig:

        def on_end(done: int) -> None:
            if checkpoint_every and done % checkpoint_every == 0 and done % iters_per_epoch and done < limit():
                save(done)
            if sig.signum is not None:
                save(done)
                log_event({"event": "preempted", "signal": sig.signum}, done)
                raise Preempted(f"signal {sig.signum} at iteration {done}; checkpoint written to {output}")

        try:
            while it < limit():
                epoch = it // iters_per_epoch
                sampler.set_epoch(epoch)
                sampler.skip(it - epoch * iters_per_epoch)
                it = train_epoch(it, on_end)
                if after_epoch is not None:
                    after_epoch(it, it >= limit())
                save(it)
        except NonFiniteLossError:
            log_event({"event": "stopped_non_finite"}, it)
            raise
    return it
