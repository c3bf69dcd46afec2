"""Where the images to predict come from: decoding any input to RGB, expanding sources, reading video frames.

:func:`decode_image`: any image PIL opens among :data:`res_backbone.data.images.IMAGE_FORMATS` (with its
decompression-bomb guard), the EXIF orientation applied (a phone picture comes out upright), grey, palette,
16-bit, CMYK and RGBA converted to RGB; PIL images, uint8 arrays and tensors too. :func:`expand_sources`: files,
folders (``recursive``), globs and ``.txt`` lists -> :class:`Item` s. :func:`video_frames`: every ``stride``-th
frame of a video (OpenCV, when installed).
"""
from __future__ import annotations

import glob as globmod
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from res_backbone.data.images import ImageDecodeError, _open_checked, _pil_to_rgb_uint8

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "ImageInput", "Item", "SourceError", "decode_image",
           "expand_sources", "video_frames"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


class SourceError(ValueError):
    """A source names nothing to predict (a folder without images, a missing file, an unreadable list)."""


@dataclass(frozen=True)
class Item:
    """One image to predict: a file (``path``), a video frame (``path`` + ``frame``) or an in-memory input
    (``data``; ``path`` is then a label such as ``"<input 3>"``). ``image_id``: the COCO id when known."""

    path: str
    frame: Optional[int] = None
    image_id: Optional[int] = None
    data: Any = None
    video: bool = False  # a video file not yet split into frames (expand_sources output)


def decode_image(x: ImageInput, *, exif: bool = True) -> np.ndarray:
    """Any supported input -> ``(H, W, 3)`` uint8 RGB.

    Args:
        x: an image file path, a PIL image, an ``(H, W, 3)`` (or ``(H, W)`` grey) uint8 array in RGB order, or a
            ``(3, H, W)`` / ``(1, H, W)`` tensor (uint8, or float in [0, 1]).
        exif: apply the EXIF orientation of files and PIL images (off for COCO files, whose boxes refer to
            the stored pixels).

    Raises:
        FileNotFoundError, ImageDecodeError (an ``OSError``): naming the file; ValueError: an array or tensor
        of another shape or dtype.
    """
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        with _open_checked(path, None) as im:
            try:
                im.load()
                return _pil_to_rgb_uint8(ImageOps.exif_transpose(im) if exif else im)
            except MemoryError:
                raise
            except ImageDecodeError:
                raise
            except Exception as e:  # truncated data, broken chunks: PIL raises many types
                raise ImageDecodeError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    if isinstance(x, Image.Image):
        return _pil_to_rgb_uint8(ImageOps.exif_transpose(x) if exif else x)
    if isinstance(x, torch.Tensor):
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"a tensor image must be (3, H, W) or (1, H, W), got {tuple(x.shape)}")
        t = x.detach().cpu()
        if t.dtype != torch.uint8:
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        x = t.expand(3, -1, -1).permute(1, 2, 0).numpy()
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise ValueError(f"an array image must be uint8 RGB (H, W, 3), got dtype {x.dtype}")
        if x.ndim == 2:
            x = np.repeat(x[..., None], 3, axis=2)
        if x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"an array image must be (H, W, 3) RGB, got shape {x.shape}")
        return np.ascontiguousarray(x)
    raise TypeError(f"cannot predict on a {type(x).__name__}; give a path, PIL image, uint8 array or tensor")


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _folder_images(folder: Path, recursive: bool) -> List[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)


def expand_sources(sources: Sequence[Union[str, os.PathLike]], *, recursive: bool = False) -> List[Item]:
    """Files, folders, globs and ``.txt`` lists -> the :class:`Item` list to predict, in a stable order.

    A file is taken whatever its extension (so a broken one is reported, not silently ignored); videos
    (:data:`VIDEO_EXTENSIONS`) become one item with ``video=True`` that :meth:`Predictor.stream` splits into
    frames. Folders give their images and videos (sorted; ``recursive`` descends). A ``.txt`` file lists one path
    per line (relative ones to the list's folder; ``#`` comments and blank lines skipped).

    Raises:
        SourceError: a source that does not exist, a glob or folder matching no image, an empty list.
    """
    items: List[Item] = []
    for src in sources:
        s = str(src)
        p = Path(s)
        if p.is_dir():
            found = _folder_images(p, recursive)
            if not found:
                hint = "" if recursive else " (images in subfolders? add --recursive)"
                raise SourceError(f"{p}: no image or video files ({', '.join(IMAGE_EXTENSIONS[:5])}, ...) in this "
                                  f"folder{hint}")
        elif p.is_file() and p.suffix.lower() == ".txt":
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
            found = [q if q.is_absolute() else p.parent / q
                     for q in (Path(ln) for ln in lines if ln and not ln.startswith("#"))]
            if not found:
                raise SourceError(f"{p}: the list names no files")
        elif p.is_file():
            found = [p]
        elif any(ch in s for ch in "*?["):
            found = sorted(Path(m) for m in globmod.glob(s, recursive=True) if Path(m).is_file())
            if not found:
                raise SourceError(f"{s}: the pattern matches no files")
        else:
            raise SourceError(f"{s}: no such file or folder")
        items.extend(Item(str(f), video=_is_video(f)) for f in found)
    return items


def video_frames(path: str, stride: int = 1) -> Iterator[Tuple[int, np.ndarray]]:
    """``(frame index, (H, W, 3) uint8 RGB)`` of every ``stride``-th frame of a video (OpenCV).

    Raises:
        ImageDecodeError: OpenCV is not installed or cannot open the file (named).
    """
    try:
        import cv2
    except ImportError:
        raise ImageDecodeError(f"{path}: reading videos needs OpenCV (pip install opencv-python-headless)") from None
    if stride < 1:
        raise ValueError(f"vid_stride must be >= 1, got {stride}")
    cap = cv2.VideoCapture(str(path))
    try:
        ok, frame = cap.read() if cap.isOpened() else (False, None)
        if not ok:
            raise ImageDecodeError(f"cannot decode video {path}: no frame could be read")
        index = 0
        while ok:
            if index % stride == 0:
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            ok, frame = cap.read()
            index += 1
    finally:
        cap.release()
