"""Checkpoints that survive crashes: atomic writes, weights-only reads, validation on load.

A checkpoint is a plain dict readable with ``torch.load(weights_only=True)``::

    {"model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ..., "iteration": int,
     "epoch": int, "arch": str, "config": dict, "pretrained_cfg": dict, "library_version": str,
     "rng": {...}, "metrics": dict}

``res_backbone.create_model/create_backbone(..., pretrained=path)`` and ``heads.build_detector``
read the ``model`` entry of these files directly.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    The previous file stays valid until the rename, so a crash mid-write never leaves a truncated
    checkpoint under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back (truncated, not a checkpoint, unsafe)."""


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
        raise CorruptCheckpointError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it may be truncated, or carry pickled objects that weights-only loading refuses"
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CorruptCheckpointError(f"{path}: not a res_backbone checkpoint (no 'model' entry)")
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


def find_resume_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest readable checkpoint in ``output_dir`` (``checkpoint_last.pt`` first), or None.

    A corrupt ``checkpoint_last.pt`` is skipped with a warning in favour of the previous one
    (``checkpoint_prev.pt``), which :func:`rotate_and_save` keeps.
    """
    out = Path(output_dir)
    for name in ("checkpoint_last.pt", "checkpoint_prev.pt"):
        p = out / name
        if not p.is_file():
            continue
        try:
            load_checkpoint(p)
            return p
        except CorruptCheckpointError as e:
            log.warning("skipping %s", e)
    return None


def rotate_and_save(obj: Any, output_dir: PathLike, name: str = "checkpoint_last.pt") -> Path:
    """Keep the current ``name`` as ``checkpoint_prev.pt``, then write ``obj`` atomically."""
    out = Path(output_dir)
    last = out / name
    if last.is_file():
        os.replace(last, out / "checkpoint_prev.pt")
    return atomic_save(obj, last)


def atomic_write_text(text: str, path: PathLike) -> Path:
    """Write ``text`` to ``path`` via a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
