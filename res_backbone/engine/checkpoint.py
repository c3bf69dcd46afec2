"""Checkpoints that survive crashes: atomic writes, weights-only reads, validation on load.

A checkpoint is a plain dict readable with ``torch.load(weights_only=True)``::

    {"model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ..., "iteration": int,
     "epoch": int, "arch": str, "config": dict, "pretrained_cfg": dict, "library_version": str,
     "rng": {...}, "metrics": dict, "checksum": {"sha256": str}}

The ``checksum`` (:func:`with_checksum`, written by the training runs) covers every other entry, tensors
byte for byte, so a file damaged after it was written is refused by :func:`load_checkpoint` even where
the damage falls inside tensor data, which ``torch.load`` reads without complaint.

``res_backbone.create_model/create_backbone(..., pretrained=path)`` and ``heads.build_detector``
read the ``model`` entry of these files directly.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ..io import atomic_target, atomic_write_text, write_synced  # noqa: F401 (atomic_write_text re-exported)
from ..version import __version__
from .faults import fault_point

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


def atomic_save(obj: Any, path: PathLike, *, before_rename=None) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    The previous file stays valid until the rename, so a crash mid-write never leaves a truncated
    checkpoint under the final name. ``before_rename()``, if given, runs once the new bytes are safely
    on disk and before the rename (what :func:`rotate_and_save` uses to keep the previous file).
    """
    with atomic_target(path) as tmp:
        write_synced(tmp, lambda f: torch.save(obj, f))
        if isinstance(obj, dict):
            fault_point("save", obj.get("iteration", obj.get("iter")))
        if before_rename is not None:
            before_rename()
    return Path(path)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back (truncated, damaged, not a checkpoint, unsafe)."""


def _feed(h, obj: Any) -> None:
    """Hash ``obj`` (nested dicts/lists/tuples of tensors and plain values) in a fixed order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the tensor's own buffer, no copy
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        h.update(repr(obj).encode())


def payload_digest(ckpt: Dict[str, Any]) -> str:
    """sha256 of every entry of ``ckpt`` but ``checksum`` (tensors by dtype, shape and bytes)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in ckpt.items() if k != "checksum"})
    return h.hexdigest()


def with_checksum(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """A shallow copy of ``ckpt`` carrying ``checksum: {"sha256": ...}``, verified by :func:`load_checkpoint`."""
    return {**ckpt, "checksum": {"sha256": payload_digest(ckpt)}}


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`atomic_save` (``weights_only=True``).

    Raises:
        FileNotFoundError: naming the path.
        CorruptCheckpointError: truncated or foreign files, naming the path and the cause.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        from ..weights.files import describe_load_error

        raise CorruptCheckpointError(f"{path}: unreadable checkpoint: {describe_load_error(e)}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CorruptCheckpointError(f"{path}: not a res_backbone checkpoint (no 'model' entry)")
    checksum = ckpt.get("checksum")
    if isinstance(checksum, dict) and checksum.get("sha256") and payload_digest(ckpt) != checksum["sha256"]:
        raise CorruptCheckpointError(
            f"{path}: damaged checkpoint, its contents no longer match the sha256 recorded when it was written "
            f"({str(checksum['sha256'])[:12]}...)")
    return ckpt


def rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and numbers (weights-only loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def training_fields(optimizer, scaler, *, it: int, iters_per_epoch: int, config: Dict[str, Any],
                    state: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of a classification or localization checkpoint that describe the run, not the model:
    position (``iter``, ``epoch``), ``config``, ``metrics``, ``best_iter``, ``train_time_s``, ``plan_max_iters``
    (from the runner's ``state``), the optimizer/scaler states, the RNG states and the library version."""
    return {
        "iter": it,
        "epoch": it // iters_per_epoch,
        "config": config,
        "metrics": dict(state.get("metrics") or {}),
        "best_iter": state["best_iter"],
        "train_time_s": state["train_time_s"],
        "plan_max_iters": state.get("plan_max_iters"),
        "library_version": __version__,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
    }


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Restore what :func:`rng_state` captured (missing entries are left alone)."""
    if not state:
        return
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


RESUME_CANDIDATES = ("checkpoint_last.pt", "checkpoint_prev.pt", "checkpoint_best.pt")


def checkpoint_iteration(ckpt: Dict[str, Any]) -> int:
    """The iteration a checkpoint was written at (``iteration`` in detection runs, ``iter`` elsewhere)."""
    return int(ckpt.get("iteration", ckpt.get("iter", -1)))


def find_resume_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest valid checkpoint in ``output_dir`` for ``--resume auto``, or None.

    ``checkpoint_last.pt`` when it loads (fully, checksum included); otherwise, with a warning naming
    the damaged file, whichever of ``checkpoint_prev.pt`` (the one before, kept by :func:`rotate_and_save`)
    and ``checkpoint_best.pt`` is valid and has the higher iteration.
    """
    out = Path(output_dir)
    found = []
    for rank, name in enumerate(RESUME_CANDIDATES):
        p = out / name
        if not p.is_file():
            continue
        try:
            ckpt = load_checkpoint(p)
        except CorruptCheckpointError as e:
            log.warning("--resume auto: skipping %s; falling back to an older checkpoint", e)
            continue
        if rank == 0:
            return p
        found.append((checkpoint_iteration(ckpt), -rank, p))
    if found:
        p = max(found)[2]
        log.warning("--resume auto: resuming from %s", p)
        return p
    return None


def rotate_and_save(obj: Any, output_dir: PathLike, name: str = "checkpoint_last.pt") -> Path:
    """Write ``obj`` atomically as ``name``, keeping the file it replaces as ``checkpoint_prev.pt``.

    The new bytes reach the disk first; only then does the current ``name`` become
    ``checkpoint_prev.pt`` (through a hard link, so ``name`` never goes missing) and the new file take
    its name. Temporary files that a crash during an earlier write left behind are removed first.
    """
    out = Path(output_dir)
    for stale in out.glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
    last, prev = out / name, out / "checkpoint_prev.pt"

    def keep_previous() -> None:
        if not last.is_file():
            return
        link = out / f".{prev.name}.link.tmp"
        try:
            link.unlink(missing_ok=True)
            os.link(last, link)
            os.replace(link, prev)
        except OSError:  # no hard links on this filesystem: a plain copy, then the same rename
            import shutil

            shutil.copyfile(last, link)
            os.replace(link, prev)

    return atomic_save(obj, last, before_rename=keep_previous)
