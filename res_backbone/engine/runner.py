"""The one outer loop of every training run (detection, classification, localization) and what it needs.

* :func:`seed_everything` - Python, NumPy and torch seeds (optionally deterministic kernels);
* :class:`SignalFlag` / :class:`Preempted` / :data:`EXIT_PREEMPTED` - SIGTERM/SIGINT become a flag the
  loop checks between iterations (:func:`stop_requested`, agreed by all ranks under torch.distributed)
  and between evaluation batches (:func:`preemptible`); the run writes a checkpoint, raises
  :class:`Preempted`, and the tool exits with 143, what batch schedulers expect from a job that stopped
  on request;
* :func:`resolve_resume` - ``--resume auto|PATH`` to a checkpoint path (the newest valid one for auto);
* :func:`save_run_checkpoint` - ``checkpoint_last.pt`` rotated (the previous one kept as
  ``checkpoint_prev.pt``), any other name written atomically, both with a checksum; a model with
  inf/NaN values is never written over a good checkpoint;
* :func:`unwrap` - the model inside a DistributedDataParallel wrapper;
* :func:`restore_training_state` - model, optimiser, grad-scaler and RNG state from a loaded checkpoint;
* :func:`run_epochs` - the outer loop: epochs of a caller's ``train_epoch``, checkpoints every N
  iterations and at each epoch end, and SIGTERM/SIGINT -> checkpoint -> :class:`Preempted`.

Where a signal lands decides what the checkpoint holds: during data loading or a step, that step
finishes and is saved; during evaluation, the evaluation is abandoned and the checkpoint is marked
``pending_eval`` so the resumed run evaluates first; during a checkpoint write, the write completes.
"""
from __future__ import annotations

import logging
import random
import signal
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from . import checkpoint as ckpt_mod
from .faults import fault_point
from ..data.preflight import IMAGE_FAULTS, BadImageFault, last_line
from .optim import build_optimizer
from .optim_step import NonFiniteLossError

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
    :meth:`current` is the innermost flag in force (what :func:`preemptible` consults).
    """

    _active: list = []

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: Dict[int, Any] = {}

    @classmethod
    def current(cls) -> Optional["SignalFlag"]:
        return cls._active[-1] if cls._active else None

    def __enter__(self) -> "SignalFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        SignalFlag._active.append(self)
        return self

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self in SignalFlag._active:
            SignalFlag._active.remove(self)
        return False


def stop_requested(flag: Optional[SignalFlag]) -> bool:
    """Whether a stop signal arrived - on any rank when torch.distributed is initialised.

    Every rank must call this at the same point (it is a collective then): the ranks agree, so they
    all stop after the same iteration and meet in the same checkpoint barrier, although ``torchrun``
    or the scheduler delivers the signal to each process at a slightly different moment.
    """
    local = flag is not None and flag.signum is not None
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return local
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(local)], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def preemptible(loader, iteration: int) -> "_Preemptible":
    """``loader`` for an evaluation inside a training run: before each batch, a stop signal (see
    :func:`stop_requested`) raises :class:`Preempted`, so a long evaluation does not outlast the
    scheduler's grace period. Outside a :class:`SignalFlag` it iterates like the loader itself.

    Args:
        loader: the evaluation loader (same number of batches on every rank).
        iteration: the training iteration being evaluated (messages, fault injection).
    """
    return _Preemptible(loader, iteration)


class _Preemptible:
    def __init__(self, loader, iteration: int):
        self.loader, self.iteration = loader, iteration

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        flag = SignalFlag.current()
        fault_point("eval", self.iteration)
        batches = iter(self.loader)
        while True:
            if flag is not None and stop_requested(flag):
                raise Preempted(f"signal {flag.signum or '(on another rank)'} during the evaluation at iteration "
                                f"{self.iteration}; the evaluation was abandoned")
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def place_and_optimise(model: nn.Module, cfg: Any, device: torch.device):
    """Move ``model`` to ``device`` (channels-last when ``cfg.channels_last``) and build its optimizer (from
    ``cfg``'s optimizer, lr, momentum, weight_decay and, for fine-tuning runs, backbone_lr_mult) and, for fp16,
    a grad scaler. Returns ``(optimizer, scaler or None)``."""
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, backbone_lr_mult=getattr(cfg, "backbone_lr_mult", 1.0))
    return optimizer, (torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None)


def resolve_resume(resume: Optional[str], output: Union[str, Path]) -> Optional[Path]:
    """Turn ``--resume`` into a checkpoint path.

    Args:
        resume: ``None``/``""`` (start fresh), ``"auto"`` (the newest valid checkpoint in ``output``,
            or a fresh start when there is none; under torch.distributed rank 0 chooses for all, so it
            is a collective there) or a checkpoint path.
        output: the run folder.

    Raises:
        FileNotFoundError: an explicit path that does not exist (naming it).
    """
    if not resume:
        return None
    if resume == "auto":
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            # One rank chooses, every rank loads that file: the ranks must continue the same state.
            choice = [ckpt_mod.find_resume_checkpoint(output) if tdist.get_rank() == 0 else None]
            tdist.broadcast_object_list(choice, src=0)
            found = choice[0]
        else:
            found = ckpt_mod.find_resume_checkpoint(output)
        if found is None:
            log.info("--resume auto: no checkpoint in %s, starting fresh", output)
        return found
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file (use --resume auto to pick the "
                                f"newest one in --output, or leave it out to start fresh)")
    return path


def save_run_checkpoint(payload: Dict[str, Any], output: Union[str, Path],
                        name: str = LAST_CHECKPOINT) -> Optional[Path]:
    """Write ``payload`` (with a checksum) as ``output/name``: ``checkpoint_last.pt`` through
    :func:`~.checkpoint.rotate_and_save` (the previous file survives as ``checkpoint_prev.pt``), anything
    else (``checkpoint_best.pt``) atomically.

    A model whose weights or buffers hold inf/NaN (e.g. BatchNorm statistics after a non-finite forward
    pass) is not written, with a warning, and None is returned: the last good checkpoint stays in place.
    """
    bad = [k for k, v in payload["model"].items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        log.warning("not writing %s at iteration %s: non-finite values in %s; the last good checkpoint is kept",
                    Path(output) / name, ckpt_mod.checkpoint_iteration(payload), ", ".join(bad[:5])
                    + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
        return None
    payload = ckpt_mod.with_checksum(payload)
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
    train_epoch: Callable[[int, Callable[[int], None]], int], save: Callable[..., None],
    after_epoch: Optional[Callable[[int, bool], None]] = None, checkpoint_every: int = 0, logger=None,
    output: Union[str, Path] = ".", pending_eval: bool = False, checkpoint_before_eval: bool = False,
    fault_checkpoints: bool = True,
) -> int:
    """Run epochs until ``max_iters``; return the final iteration count.

    Args:
        max_iters: the iteration to stop at, or a callable returning it (read before every pass and
            after every iteration, so a run sized by a time budget can set it once it knows its speed).
        sampler: has ``set_epoch(epoch)`` and ``skip(k)`` (the first ``k`` batches of the next pass
            are dropped, so a run resumed mid-epoch continues where it stopped).
        train_epoch: ``train_epoch(it, on_iteration_end) -> next it``: one pass from iteration ``it``,
            calling ``on_iteration_end(done)`` after every iteration.
        save: ``save(it, pending_eval=False)`` writes ``checkpoint_last.pt`` (called every
            ``checkpoint_every`` iterations, at every epoch end and on a signal); ``pending_eval=True``
            marks a checkpoint written after a pass but before its ``after_epoch`` completed.
        after_epoch: ``after_epoch(it, last)`` after each pass and before its checkpoint
            (evaluation, best checkpoint); ``last`` is True at ``max_iters``. It may raise
            :class:`Preempted` (an evaluation reading its batches through :func:`preemptible`).
        logger: a :class:`~.logger.RunLogger` for the ``preempted`` / ``stopped_non_finite`` events.
        pending_eval: the resumed checkpoint was marked ``pending_eval``: run ``after_epoch`` for
            ``start_iter`` before training on.
        checkpoint_before_eval: write each pass's checkpoint before ``after_epoch`` (marked
            ``pending_eval``) instead of after it, and after it only at ``max_iters``: a run killed
            outright (SIGKILL, out of memory) during a long evaluation keeps the pass it trained (detection).
        fault_checkpoints: on a bad image mid-run, write ``checkpoint_last.pt`` at the last completed iteration
            and raise :class:`~res_backbone.data.preflight.BadImageFault` naming the file in one line; on any
            other exception, write ``checkpoint_emergency.pt`` (never over the last good one) and re-raise.
            False under ``torch.distributed``, where one rank cannot save alone.

    Raises:
        Preempted: SIGTERM/SIGINT arrived; the iteration in flight finished and was checkpointed (or
            the evaluation in flight was abandoned, and the checkpoint says so).
        NonFiniteLossError: from ``train_epoch``, logged and re-raised.
        BadImageFault: an image failed mid-run (see ``fault_checkpoints``).
    """
    it = start_iter
    last_done = [it]  # the last completed iteration (where a non-finite stop is logged)

    def limit() -> int:
        return int(max_iters()) if callable(max_iters) else int(max_iters)

    def log_event(record: Dict[str, Any], step: int) -> None:
        if logger is not None:
            logger.log(record, step=step)

    with SignalFlag() as sig:

        def stop(done: int, during: str, pending: bool, saved: bool = False) -> None:
            if not saved:
                save(done, pending_eval=pending)
            log_event({"event": "preempted", "signal": sig.signum, "during": during}, done)
            raise Preempted(f"signal {sig.signum or '(on another rank)'} at iteration {done} (during {during}); "
                            f"checkpoint written to {output}")

        def on_end(done: int) -> None:
            last_done[0] = done
            periodic = bool(checkpoint_every and done % checkpoint_every == 0 and done % iters_per_epoch
                            and done < limit())
            if periodic:
                save(done)
            if stop_requested(sig):
                stop(done, "training", pending=done % iters_per_epoch == 0 or done >= limit(), saved=periodic)

        def finish_pass(done: int, resumed: bool = False) -> None:
            last = done >= limit()
            if checkpoint_before_eval and not resumed:
                save(done, pending_eval=True)
            if after_epoch is not None:
                try:
                    after_epoch(done, last)
                except Preempted:
                    stop(done, "evaluation", pending=True)
            if last or not checkpoint_before_eval:
                save(done)

        try:
            if pending_eval:
                finish_pass(it, resumed=True)
            while it < limit():
                epoch = it // iters_per_epoch
                sampler.set_epoch(epoch)
                sampler.skip(it - epoch * iters_per_epoch)
                it = train_epoch(it, on_end)
                finish_pass(it)
        except NonFiniteLossError:
            log_event({"event": "stopped_non_finite"}, last_done[0])
            raise
        except IMAGE_FAULTS as e:  # a bad image mid-run (--on-bad-image error): keep what was trained
            done = last_done[0]
            log_event({"event": "bad_image", "error": str(e)}, done)  # with the worker's traceback, if any
            if not fault_checkpoints:
                raise
            save(done)
            raise BadImageFault(f"{last_line(e)}; the {done} iteration(s) trained are in "
                                f"{Path(output) / LAST_CHECKPOINT} (rerun with --resume auto)") from e
        except Preempted:
            raise
        except Exception as e:  # a bug or a crash of the machine's stack: an emergency copy of the weights
            done = last_done[0]
            log_event({"event": "crashed", "error": f"{type(e).__name__}: {e}"}, done)
            if fault_checkpoints:
                _emergency_save(save, done, output)
            raise
    return it


EMERGENCY_CHECKPOINT = "checkpoint_emergency.pt"


def _emergency_save(save: Callable[..., None], done: int, output: Union[str, Path]) -> None:
    """Write the weights as they are after iteration ``done`` to ``checkpoint_emergency.pt`` (never over the
    last good checkpoint; non-finite weights are refused by :func:`save_run_checkpoint`). Failing to write
    it must not hide the error that brought us here."""
    try:
        save(done, EMERGENCY_CHECKPOINT)
    except Exception as err:  # noqa: BLE001  (the original error is re-raised by the caller)
        log.error("could not write an emergency checkpoint: %s", err)
        return
    path = Path(output) / EMERGENCY_CHECKPOINT
    if path.is_file():
        log.error("emergency checkpoint after iteration %d: %s (the last good checkpoint is untouched; "
                  "--resume %s continues from it)", done, path, path)

