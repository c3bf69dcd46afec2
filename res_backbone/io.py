"""Atomic file writes: a temporary file in the target's folder, fsync, then ``os.replace``.

The one copy every writer of results, checkpoints and weights uses. Readers see the old file or the
whole new one, never half a file, and a crash mid-write leaves the previous file intact (the
temporary ``.<name>.<random>.tmp`` is removed when the write raises)::

    with atomic_target("model.safetensors") as tmp:    # any writer that takes a path
        save_file(tensors, tmp)
    atomic_write_json({"ap": 0.69}, "metrics.json")
    atomic_torch_save(checkpoint, "checkpoint_last.pt")

A leaf module: it imports nothing of this project.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_target", "atomic_torch_save", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "fsync_path", "write_synced"]


def fsync_path(path: PathLike) -> None:
    """Flush a file's bytes, or a folder's entries (a rename inside it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_target(path: PathLike, *, fsync_dir: bool = True) -> Iterator[str]:
    """A temporary file in ``path``'s folder to write; fsynced and renamed over ``path`` when the block
    ends, removed if it raises.

    Args:
        path: the final file (its folder is created).
        fsync_dir: also flush the folder after the rename, so the new name itself survives a power cut.

    Yields:
        The temporary file's path (a ``str``), already created and empty.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        if fsync_dir:
            fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_synced(tmp: PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Open ``tmp`` for binary writing, call ``write(f)``, then flush and fsync it."""
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(data: bytes, path: PathLike, *, fsync_dir: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_target(path, fsync_dir=fsync_dir) as tmp:
        write_synced(tmp, lambda f: f.write(data))
    return Path(path)


def atomic_write_text(text: str, path: PathLike, *, fsync_dir: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(text.encode("utf-8"), path, fsync_dir=fsync_dir)


def atomic_write_json(obj: Any, path: PathLike, *, fsync_dir: bool = False, **dump_kwargs: Any) -> Path:
    """``json.dump(obj, **dump_kwargs)`` to ``path`` atomically (UTF-8)."""
    return atomic_write_text(json.dumps(obj, **dump_kwargs), path, fsync_dir=fsync_dir)


def atomic_torch_save(obj: Any, path: PathLike, *, fsync_dir: bool = True,
                      before_rename: Optional[Callable[[], None]] = None) -> Path:
    """``torch.save(obj)`` to ``path`` atomically.

    ``before_rename()``, if given, runs once the new bytes are on disk and before the rename (e.g. to
    keep the file about to be replaced under another name).
    """
    import torch

    with atomic_target(path, fsync_dir=fsync_dir) as tmp:
        write_synced(tmp, lambda f: torch.save(obj, f))
        if before_rename is not None:
            before_rename()
    return Path(path)
