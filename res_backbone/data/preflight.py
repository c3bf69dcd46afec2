"""Pre-flight check of every image a run will read, and what to do with the bad ones.

A training run meets a missing or broken image only when its DataLoader reaches it, hours in; the user then
learns of one bad file per crash. Before the first step, :func:`preflight` looks at every file a dataset lists
(in parallel threads, with a progress bar, cached by path, size and mtime so a restart is instant) and reports
all problems at once, grouped by kind::

    report = preflight({"train": train_set, "val": val_set}, mode="header", policy="error", output="runs/det")

Modes: ``header`` reads each file's header (format, size) and checks that a JPEG or PNG ends where its format
says (catches truncated copies without decoding); ``full`` decodes every pixel; ``none`` skips the check.
Kinds of problem: ``missing``, ``empty`` (zero bytes), ``outside_root`` (a name leaving the image folder),
``undecodable`` (not an image, a broken header, too large), ``truncated``, ``size_mismatch`` (the decoded size
differs from the json's ``width``/``height``: every box of that image would be misplaced; EXIF-rotated photos
are the usual cause).

Policies: ``error`` raises :class:`BadImagesError` (a ``ValueError``: the tools exit 2) after writing the full
list to ``bad_images.json``; ``skip`` drops the bad images (and their boxes) from the datasets and records them.

Mid-run faults (a file removed or truncated after the check) are :class:`GuardedDataset`'s: under ``skip`` the
sample is replaced by the next one and counted in ``bad_images_mid_run.jsonl``; under ``error`` it raises
:class:`BadImageFault` with one line naming the file, which the runner turns into a checkpoint and exit 2.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from PIL import Image

from ..io import atomic_write_text
from .images import ImageDecodeError, ImageSizeMismatchError, _open_checked, load_rgb_image

__all__ = ["BadImage", "BadImageFault", "BadImagesError", "CHECK_MODES", "GuardedDataset", "IMAGE_FAULTS",
           "POLICIES", "PreflightReport", "check_image", "finish_report", "last_line", "preflight"]

log = logging.getLogger(__name__)

CHECK_MODES = ("header", "full", "none")
POLICIES = ("error", "skip")
KINDS = ("missing", "empty", "outside_root", "undecodable", "truncated", "size_mismatch")
CACHE_NAME = "preflight_cache.json"
REPORT_NAME = "bad_images.json"
MID_RUN_NAME = "bad_images_mid_run.jsonl"
_CACHE_VERSION = 1
_EXIF_ORIENTATION = 0x0112


class BadImagesError(ValueError):
    """The pre-flight check found bad images under the ``error`` policy; the message lists them by kind."""


class BadImageFault(OSError):
    """An image failed while training (after the pre-flight check); the message is one line naming it."""


#: What reading one image raises when the file (not the code) is at fault.
IMAGE_FAULTS = (FileNotFoundError, ImageDecodeError, ImageSizeMismatchError, BadImageFault)


@dataclass
class BadImage:
    """One bad file: ``split`` (train/val), ``key`` (COCO image id or folder sample index), ``path``, ``kind``
    (one of :data:`KINDS`) and ``detail`` (the reader's words)."""

    split: str
    key: Union[int, str]
    path: str
    kind: str
    detail: str


@dataclass
class PreflightReport:
    mode: str
    policy: str
    checked: int
    from_cache: int
    seconds: float
    bad: List[BadImage]
    report_path: Optional[str] = None


def _tail_is_complete(path: Path, fmt: Optional[str]) -> bool:
    """Whether a JPEG ends with its EOI marker / a PNG with its IEND chunk (the last KiB is searched: some
    writers append padding). Other formats: True (their length is not checked without decoding)."""
    if fmt not in ("JPEG", "PNG"):
        return True
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 1024))
        tail = f.read()
    return (b"\xff\xd9" in tail) if fmt == "JPEG" else (b"IEND" in tail)


def _exif_rotated(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # the size mismatch is reported either way; this only adds the likely cause
        return False


def check_image(path: Path, expected: Optional[Tuple[int, int]], mode: str = "header") -> Optional[Tuple[str, str]]:
    """``(kind, detail)`` of what is wrong with one image file, or None when it is fine.

    Args:
        path: the file.
        expected: ``(width, height)`` the annotation file gives it (None: not checked).
        mode: ``"header"`` (header, size, and a JPEG/PNG's end marker) or ``"full"`` (decode every pixel).
    """
    try:
        if path.stat().st_size == 0:
            return "empty", f"{path} is empty (0 bytes)"
        if mode == "full":
            h, w = load_rgb_image(path).shape[:2]
        else:
            with _open_checked(path, None) as im:  # header only, with the readers' format and size limits
                (w, h), fmt = im.size, im.format
            if not _tail_is_complete(path, fmt):
                return "truncated", f"{path}: the {fmt} file ends early (its end marker is missing; a partial copy?)"
    except FileNotFoundError:
        return "missing", f"{path} does not exist"
    except ImageDecodeError as e:
        kind = "truncated" if "truncated" in str(e).lower() else "undecodable"
        return kind, str(e)
    except OSError as e:
        return "undecodable", f"cannot read {path}: {e}"
    if expected is not None and (w, h) != tuple(expected):
        detail = f"{path} is {w}x{h} (w x h) but the annotations say {expected[0]}x{expected[1]}"
        if (h, w) == tuple(expected) or _exif_rotated(path):
            detail += (": an EXIF-rotated photo? the annotations were made on the rotated view; store the pixels "
                       "rotated (e.g. PIL.ImageOps.exif_transpose) or fix width/height")
        return "size_mismatch", detail
    return None


def _signature(path: Path) -> Optional[List[int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _load_cache(path: Optional[Path], mode: str) -> Dict[str, list]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("version") != _CACHE_VERSION or data.get("mode") != mode:
        return {}
    return data.get("files", {})


def preflight(datasets: Dict[str, object], *, mode: str = "header", policy: str = "error",
              output: Optional[Union[str, os.PathLike]] = None, workers: int = 8, progress: bool = True,
              ) -> PreflightReport:
    """Check every image of ``datasets`` (``{"train": ds, "val": ds}``; None values are skipped) before a run.

    Each dataset provides ``image_files() -> [(key, path | None, (w, h) | None, problem)]`` (``path`` None with
    ``problem`` set for names that cannot be joined to the root) and ``exclude(keys)``.

    Args:
        mode: one of :data:`CHECK_MODES`.
        policy: one of :data:`POLICIES` (see the module docstring).
        output: the run folder: ``bad_images.json`` and the cache ``preflight_cache.json`` go there.
        workers: threads reading files (I/O bound; 8 suits local disks and network filesystems).

    Returns:
        The report (under ``skip`` the bad images are already dropped from the datasets).

    Raises:
        BadImagesError: bad images under the ``error`` policy (after writing ``bad_images.json``).
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"check mode must be one of {CHECK_MODES}, got {mode!r}")
    if policy not in POLICIES:
        raise ValueError(f"bad-image policy must be one of {POLICIES}, got {policy!r}")
    t0 = time.perf_counter()
    out = Path(output) if output is not None else None
    if mode == "none":
        return PreflightReport(mode, policy, 0, 0, 0.0, [])
    from tqdm import tqdm

    cache_path = out / CACHE_NAME if out is not None else None
    cache = _load_cache(cache_path, mode)
    jobs, bad, from_cache = [], [], 0
    for split, ds in datasets.items():
        if ds is None:
            continue
        for key, path, expected, problem in ds.image_files():
            if path is None:
                bad.append(BadImage(split, key, "", "outside_root", problem))
                continue
            sig = _signature(path)
            hit = cache.get(str(path))
            if sig is not None and hit is not None and hit[0] == sig and hit[1] == list(expected or []):
                from_cache += 1
                if hit[2] is not None:
                    bad.append(BadImage(split, key, str(path), hit[2][0], hit[2][1]))
                continue
            jobs.append((split, key, path, expected, sig))

    def run(job):
        split, key, path, expected, sig = job
        return job, check_image(path, expected, mode)

    new_cache = dict(cache)
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(jobs), desc=f"checking images ({mode})", unit="img", disable=not progress or not jobs,
                 leave=False) as bar:
        for (split, key, path, expected, sig), found in pool.map(run, jobs):
            bar.update(1)
            if found is not None:
                bad.append(BadImage(split, key, str(path), *found))
            if sig is not None:
                new_cache[str(path)] = [sig, list(expected or []), list(found) if found else None]
    checked = len(jobs) + from_cache + sum(1 for b in bad if b.kind == "outside_root")
    report = PreflightReport(mode, policy, checked, from_cache, time.perf_counter() - t0, bad)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if jobs:
            atomic_write_text(json.dumps({"version": _CACHE_VERSION, "mode": mode, "files": new_cache}) + "\n",
                              cache_path)
        if bad or (out / REPORT_NAME).exists():
            report.report_path = str(write_report(report, out))
    log.info("pre-flight (%s): %d images checked in %.1f s (%d from the cache), %d bad", mode, checked,
             report.seconds, from_cache, len(bad))
    if bad:
        text = summarize(bad)
        if policy == "error":
            where = f"; the full list is in {report.report_path}" if report.report_path else ""
            raise BadImagesError(f"{len(bad)} bad image(s) found before training (--on-bad-image error){where}:\n"
                                 f"{text}\nfix or remove them, or rerun with --on-bad-image skip to leave them out")
        for split, ds in datasets.items():
            keys = [b.key for b in bad if b.split == split]
            if ds is not None and keys:
                ds.exclude(keys)
        log.warning("--on-bad-image skip: %d bad image(s) left out (%s):\n%s", len(bad),
                    ", ".join(f"{s} {sum(b.split == s for b in bad)}" for s in datasets if datasets[s] is not None),
                    text)
    return report


def summarize(bad: Sequence[BadImage], first: int = 3) -> str:
    """The bad images grouped by kind, with the first few file names of each."""
    groups: Dict[str, List[BadImage]] = defaultdict(list)
    for b in bad:
        groups[b.kind].append(b)
    lines = []
    for kind in sorted(groups, key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS)):
        items = groups[kind]
        lines.append(f"  {kind}: {len(items)}")
        lines += [f"    {b.split} {b.key}: {b.detail}" for b in items[:first]]
        if len(items) > first:
            lines.append(f"    ... and {len(items) - first} more")
    return "\n".join(lines)


def write_report(report: PreflightReport, output: Union[str, os.PathLike],
                 mid_run: Optional[Iterable[dict]] = None) -> Path:
    """Write ``bad_images.json`` (policy, mode, counts, every bad image, and the mid-run faults) into ``output``."""
    out = Path(output)
    mid = list(mid_run) if mid_run is not None else read_mid_run(out)
    body = {"policy": report.policy, "mode": report.mode, "checked": report.checked,
            "seconds": round(report.seconds, 3), "bad": [asdict(b) for b in report.bad],
            "counts": {k: sum(b.kind == k for b in report.bad) for k in KINDS}, "mid_run": mid}
    return atomic_write_text(json.dumps(body, indent=2) + "\n", out / REPORT_NAME)


def finish_report(report: PreflightReport, output: Union[str, os.PathLike]) -> Optional[Path]:
    """After a run: rewrite ``bad_images.json`` with the faults met mid-run (if any, or if it exists)."""
    out = Path(output)
    if not (out / MID_RUN_NAME).is_file() and not (out / REPORT_NAME).is_file():
        return None
    return write_report(report, out)


def read_mid_run(output: Union[str, os.PathLike]) -> List[dict]:
    """The mid-run faults :class:`GuardedDataset` recorded in ``output`` (one JSON object per line)."""
    path = Path(output) / MID_RUN_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class GuardedDataset:
    """Wraps a training dataset so an image that fails mid-run follows the bad-image policy.

    Under ``skip`` the item is replaced by the next good one (index + 1, + 2, ...) and the fault appended to
    ``output/bad_images_mid_run.jsonl`` (one line per fault, written with ``O_APPEND`` so DataLoader workers can
    share it); under ``error`` :class:`BadImageFault` names the file in one line. Other attributes are the
    wrapped dataset's.
    """

    def __init__(self, dataset, policy: str = "error", output: Optional[Union[str, os.PathLike]] = None,
                 max_consecutive: int = 32):
        if policy not in POLICIES:
            raise ValueError(f"bad-image policy must be one of {POLICIES}, got {policy!r}")
        self.dataset, self.policy, self.max_consecutive = dataset, policy, max_consecutive
        self.record_path = str(Path(output) / MID_RUN_NAME) if output is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":  # during unpickling in a worker, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _record(self, index: int, err: BaseException) -> None:
        line = json.dumps({"index": index, "error": f"{type(err).__name__}: {last_line(err)}",
                           "time": time.time()}) + "\n"
        log.warning("skipping a bad image mid-run (item %d): %s", index, last_line(err))
        if self.record_path is not None:
            fd = os.open(self.record_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def __getitem__(self, index: int):
        n = len(self.dataset)
        for k in range(min(n, self.max_consecutive)):
            i = (index + k) % n
            try:
                return self.dataset[i]
            except IMAGE_FAULTS as e:
                if self.policy == "error":
                    raise BadImageFault(f"bad image during training (--on-bad-image error): {last_line(e)}") from e
                self._record(i, e)
        raise BadImageFault(f"{self.max_consecutive} consecutive bad images from item {index} on: "
                            "is the image folder gone?")


def last_line(err: BaseException) -> str:
    """The last non-empty line of an error's message (a DataLoader worker's re-raised error ends with it)."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__
