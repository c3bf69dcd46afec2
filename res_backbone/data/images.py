"""Image files, read safely: (H, W, 3) uint8 RGB from any stored layout, hostile input refused by name.

What the COCO reader (:mod:`.coco`) and the classification folders (:mod:`.classification`) decode
images with. Decoding follows the stored pixel layout: no EXIF rotation is applied, since COCO's
``width``/``height`` and boxes refer to the raw stored pixels. Only the decoders of
:data:`IMAGE_FORMATS` are used; an image whose header declares more than :data:`MAX_IMAGE_PIXELS`
pixels is refused before any pixel memory is allocated (decompression-bomb guard); names from an
annotation file are joined to the image root with :func:`safe_join`, which never leaves it.

* ``FileNotFoundError``: the image file is missing;
* :class:`ImageDecodeError` (an ``OSError``): a file that cannot be read or decoded (truncated,
  random bytes, empty, a format outside :data:`IMAGE_FORMATS`, zero-sized);
* :class:`ImageTooLargeError` (an :class:`ImageDecodeError`): more pixels than :data:`MAX_IMAGE_PIXELS`;
* ``ValueError``: a file name that is absolute, empty, holds NUL or lone surrogates, climbs out of the
  image root, or is a symbolic link leading outside it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image

__all__ = ["IMAGE_FORMATS", "ImageDecodeError", "ImageSizeMismatchError", "ImageTooLargeError", "MAX_IMAGE_PIXELS", "load_rgb_image",
           "read_image_size", "safe_join"]

PathLike = Union[str, os.PathLike]

#: Images with more pixels than this are refused (:class:`ImageTooLargeError`) from their header,
#: before decoding allocates anything: the decompression-bomb guard. The default equals
#: ``PIL.Image.MAX_IMAGE_PIXELS`` (~9459 x 9459). Set it to ``None`` to lift the guard; PIL itself
#: still refuses images over twice its own ``Image.MAX_IMAGE_PIXELS``, so raise that too for larger ones.
MAX_IMAGE_PIXELS: Optional[int] = 89_478_485

#: The PIL decoders an image file may be opened with (the formats of the classification reader's
#: ``IMG_EXTENSIONS``; PIL's JPEG decoder also opens multi-picture camera JPEGs). Files of other
#: formats are refused as undecodable, whatever their name: PIL would otherwise pick any of its ~40
#: decoders from the file's first bytes (EPS even runs Ghostscript).
IMAGE_FORMATS: Tuple[str, ...] = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


class ImageDecodeError(OSError):
    """An image file exists but cannot be read or decoded (message names the path and image id)."""


class ImageSizeMismatchError(ValueError):
    """An image decodes to another size than its annotation file says (its boxes would be misplaced)."""


class ImageTooLargeError(ImageDecodeError):
    """An image whose header declares more than :data:`MAX_IMAGE_PIXELS` pixels (refused before decoding)."""


def safe_join(root: PathLike, file_name: str, *, resolve_links: bool = True) -> Path:
    """Join a json ``file_name`` to ``root``, refusing anything that would leave ``root``.

    The name is checked lexically (``normpath``): absolute names and ``..`` components that climb
    above ``root`` are refused. With ``resolve_links`` the joined path's symbolic links are then
    resolved and the target must still lie under ``root``'s own resolved path, so a root that is
    itself a symlink works but a link inside it pointing elsewhere does not.

    Raises:
        ValueError: for an empty, absolute or escaping ``file_name``, one holding NUL or a lone
            surrogate (not a file name any file system stores), or a link leading outside ``root``.
    """
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"image file_name must be a non-empty string, got {file_name!r}")
    if "\x00" in file_name:
        raise ValueError(f"image file_name {file_name!r} contains a NUL character")
    try:
        file_name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"image file_name {file_name!r} is not valid Unicode text (lone surrogate)") from None
    if os.path.isabs(file_name) or file_name.startswith(("/", "\\")) or (len(file_name) > 1 and file_name[1] == ":"):
        raise ValueError(f"image file_name {file_name!r} is an absolute path; file names must be relative to "
                         f"the image root {str(root)!r}")
    root_n = os.path.normpath(os.path.abspath(root))
    joined = os.path.normpath(os.path.join(root_n, file_name.replace("\\", "/")))
    if os.path.commonpath([root_n, joined]) != root_n:
        raise ValueError(f"image file_name {file_name!r} escapes the image root {str(root)!r}")
    if resolve_links:
        root_r, joined_r = os.path.realpath(root_n), os.path.realpath(joined)
        if os.path.commonpath([root_r, joined_r]) != root_r:
            raise ValueError(f"image file_name {file_name!r} is a symbolic link (or lies under one) leading "
                             f"outside the image root {str(root)!r}, to {joined_r!r}; it is not read")
    return Path(joined)


def _pil_to_rgb_uint8(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB. 16-bit data is scaled by 1/257 (65535 -> 255); alpha is
    dropped (the stored colour is kept, as torchvision's ``read_image(..., RGB)`` does)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im).astype(np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def _pixel_limit(max_pixels: Optional[int]) -> Optional[int]:
    return MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def _open_checked(path: Path, max_pixels: Optional[int]):
    """``Image.open`` (header only) restricted to :data:`IMAGE_FORMATS`, with the pixel limit checked.

    Returns the open image (the caller closes it). Raises FileNotFoundError / ImageTooLargeError /
    ImageDecodeError; never decodes pixel data.
    """
    try:
        exists = path.is_file()
    except OSError as e:  # e.g. ENAMETOOLONG, which is_file() does not swallow
        raise ImageDecodeError(f"cannot read image {path}: {e}") from e
    if not exists:
        raise FileNotFoundError(f"image file not found: {path}")
    limit = _pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():  # the size is checked below, with a clearer error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image {path} is refused as too large: {e}") from e
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on broken headers
        raise ImageDecodeError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise ImageDecodeError(f"cannot decode image {path}: its header declares a {w}x{h} (w x h) image")
    if limit is not None and w * h > limit:
        im.close()
        raise ImageTooLargeError(
            f"image {path} declares {w}x{h} (w x h) = {w * h} pixels, more than the limit of {limit} "
            "(res_backbone.data.images.MAX_IMAGE_PIXELS, a decompression-bomb guard); it is not decoded")
    return im


def read_image_size(path: PathLike, *, max_pixels: Optional[int] = None) -> Tuple[int, int]:
    """``(width, height)`` of an image file from its header, with :func:`load_rgb_image`'s checks.

    Raises:
        FileNotFoundError, ImageDecodeError, ImageTooLargeError: as :func:`load_rgb_image`.
    """
    with _open_checked(Path(path), max_pixels) as im:
        return im.size


def load_rgb_image(path: PathLike, *, max_pixels: Optional[int] = None) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB (grayscale, palette, RGBA, CMYK, 16-bit all accepted).

    Args:
        path: the image file; only the decoders of :data:`IMAGE_FORMATS` are used.
        max_pixels: refuse images with more pixels (default :data:`MAX_IMAGE_PIXELS`, read at call time).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageTooLargeError: the header declares more than ``max_pixels`` pixels (nothing is decoded).
        ImageDecodeError: the file cannot be read or decoded (truncated, not an image, zero-sized...).
    """
    path = Path(path)
    with _open_checked(path, max_pixels) as im:
        try:
            im.load()
            return _pil_to_rgb_uint8(im)
        except MemoryError:
            raise
        except Exception as e:  # a decoder fed hostile bytes may raise nearly anything: name the file
            raise ImageDecodeError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
