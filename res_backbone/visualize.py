"""Pictures of detections: ground truth (dashed green) and predictions (coloured by class).

Drawn with PIL so the output has exactly the image's pixel size (times ``upscale``) and needs no
display. Boxes are ``xyxy`` in the pixels of the image being drawn.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["SCORE_THRESH", "class_colour", "draw_detections", "render_detections", "save_prediction_grid",
           "tensor_to_uint8"]

GT_COLOUR = (0, 230, 0)
SCORE_THRESH = 0.3  # default: predictions scoring below are not drawn
CAPTION_FONT_SIZE = 10  # px at upscale 1 (where Pillow can scale its default font)
CAPTION_TEXT_COLOUR = (0, 0, 0)
GT_DASH = 4  # dash length of the ground-truth boxes, in line widths
GRID_BACKGROUND = (255, 255, 255)  # the gaps between the tiles of a prediction grid
ImageLike = Union[np.ndarray, torch.Tensor, Image.Image, str, os.PathLike]


# Distinct, saturated, none of them green (green is the ground truth).
_PALETTE = ((255, 60, 60), (40, 120, 255), (255, 160, 0), (190, 70, 255), (255, 0, 200), (255, 230, 0),
            (0, 220, 255), (180, 100, 40), (255, 140, 170), (120, 120, 255), (230, 110, 60), (160, 0, 90))


def class_colour(label: int) -> Tuple[int, int, int]:
    """The drawing colour of a label (a fixed palette, cycled; never green)."""
    return _PALETTE[(int(label) - 1) % len(_PALETTE)]


def tensor_to_uint8(image: torch.Tensor, mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None) -> np.ndarray:
    """(3, h, w) float tensor -> (h, w, 3) uint8; undoes normalisation when ``mean``/``std`` given,
    otherwise assumes values in [0, 1]."""
    x = image.detach().cpu().float()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            return Image.fromarray(tensor_to_uint8(image))
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.transpose(1, 2, 0)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"numpy images must be uint8 (h, w[, 3]), got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def _rows(x: Any, cols: int) -> np.ndarray:
    if x is None:
        return np.zeros((0, cols)) if cols else np.zeros((0,))
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    return arr.reshape(-1, cols) if cols else arr.reshape(-1)


def _dashed_rect(draw: ImageDraw.ImageDraw, box: Sequence[float], fill, width: int, dash: int) -> None:
    x0, y0, x1, y1 = box
    for (a, b) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = math.hypot(b[0] - a[0], b[1] - a[1])
        n = max(1, int(length // dash))
        for i in range(0, n, 2):
            t0, t1 = i / n, min(1.0, (i + 1) / n)
            draw.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                       (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=fill, width=width)


def _name(label: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names and 1 <= label <= len(class_names):
        return str(class_names[label - 1])
    return str(label)


def render_detections(
    image: ImageLike,
    pred_boxes: Any = None,
    pred_labels: Any = None,
    pred_scores: Any = None,
    gt_boxes: Any = None,
    gt_labels: Any = None,
    class_names: Optional[Sequence[str]] = None,
    *,
    score_thresh: float = SCORE_THRESH,
    upscale: int = 1,
    gt_captions: Optional[Sequence[str]] = None,
    pred_captions: Optional[Sequence[str]] = None,
) -> Image.Image:
    """Draw ground truth and predictions on an image and return it (PIL RGB, ``upscale`` x size).

    Args:
        image: uint8 (h, w, 3) array / (3, h, w) tensor (float tensors in [0, 1]), PIL image or path.
        pred_boxes: (M, 4) xyxy in the image's pixels; pred_labels (M,) in 1..K; pred_scores (M,).
        gt_boxes: (N, 4) xyxy; gt_labels (N,) (optional, for the gt caption).
        class_names: K names, ``class_names[label - 1]``.
        score_thresh: predictions scoring below are not drawn.
        upscale: integer magnification (small images get readable captions).
        gt_captions: optional text per ground-truth box (drawn on green under its top-left corner);
            ground truth is otherwise drawn without captions.
        pred_captions: optional text per prediction replacing the default ``"<class> <score>"``.
    """
    pil = _to_pil(image)
    if upscale != 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    draw = ImageDraw.Draw(pil)
    try:  # a scalable font where Pillow has FreeType, so captions grow with ``upscale``
        font = ImageFont.load_default(size=CAPTION_FONT_SIZE * upscale)
    except (TypeError, OSError, ImportError):
        font = ImageFont.load_default()
    line = max(1, upscale)
    gb = _rows(gt_boxes, 4) * upscale  # ground truth is drawn unlabelled (dashed), predictions carry the names
    for j, box in enumerate(gb.tolist()):
        _dashed_rect(draw, box, GT_COLOUR, line, dash=GT_DASH * line)
        if gt_captions is not None and j < len(gt_captions):
            _caption(draw, pil.size, font, str(gt_captions[j]), box[0], box[3] + 1, GT_COLOUR)
    pb, pl, ps = _rows(pred_boxes, 4) * upscale, _rows(pred_labels, 0), _rows(pred_scores, 0)
    if len(ps) == 0 and len(pb):
        ps = np.ones(len(pb))
    order = np.argsort(ps, kind="stable")  # best drawn last, on top
    for i in order.tolist():
        if ps[i] < score_thresh:
            continue
        lab = int(pl[i]) if i < len(pl) else 0
        colour = class_colour(lab)
        x0, y0, x1, y1 = pb[i].tolist()
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        if pred_captions is not None and i < len(pred_captions):
            text = str(pred_captions[i])
        else:
            text = f"{_name(lab, class_names)} {ps[i]:.2f}"
        _caption(draw, pil.size, font, text, x0, y0, colour, above=True)
    return pil


def _caption(draw: ImageDraw.ImageDraw, size: Tuple[int, int], font, text: str, x0: float, y: float, colour,
             above: bool = False) -> None:
    """A filled label at ``(x0, y)``: above ``y`` when ``above`` and there is room, else below it; kept
    inside the ``(width, height)`` image."""
    width, height = size
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    tw, th = r - l, b - t
    if above:
        y = y - th - 2 if y - th - 2 >= 0 else y + 1
    y = min(y, max(0, height - th - 3))
    tx = min(max(0, x0), max(0, width - tw - 2))
    draw.rectangle([tx, y, tx + tw + 2, y + th + 2], fill=colour)
    draw.text((tx + 1 - l, y + 1 - t), text, fill=CAPTION_TEXT_COLOUR, font=font)


def draw_detections(
    image_uint8_or_path: ImageLike,
    pred_boxes: Any,
    pred_labels: Any,
    pred_scores: Any,
    gt_boxes: Any,
    gt_labels: Any,
    class_names: Optional[Sequence[str]],
    out_path: Union[str, os.PathLike],
    score_thresh: float = SCORE_THRESH,
    *,
    upscale: int = 1,
) -> Path:
    """``render_detections`` and write the PNG to ``out_path`` (folders created). Returns the path."""
    pil = render_detections(image_uint8_or_path, pred_boxes, pred_labels, pred_scores, gt_boxes, gt_labels,
                            class_names, score_thresh=score_thresh, upscale=upscale)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pil.save(out, format="PNG")
    return out


def save_prediction_grid(
    images: Sequence[ImageLike],
    predictions: Sequence[Mapping[str, Any]],
    targets: Optional[Sequence[Mapping[str, Any]]],
    class_names: Optional[Sequence[str]],
    out_path: Union[str, os.PathLike],
    *,
    score_thresh: float = SCORE_THRESH,
    ncols: int = 4,
    upscale: int = 1,
    pad: int = 4,
) -> Path:
    """Tile several drawn images into one PNG (row-major, ``ncols`` per row, white gaps).

    ``predictions[i]`` holds ``boxes``/``labels``/``scores`` and ``targets[i]`` ``boxes``/``labels``,
    both in the pixels of ``images[i]``; either may add ``captions`` (one text per box, see
    :func:`render_detections`).
    """
    if not images:
        raise ValueError("no images to draw")
    tiles: List[Image.Image] = []
    for i, im in enumerate(images):
        p = predictions[i] if i < len(predictions) else {}
        t = targets[i] if targets is not None and i < len(targets) else {}
        tiles.append(render_detections(im, p.get("boxes"), p.get("labels"), p.get("scores"), t.get("boxes"),
                                       t.get("labels"), class_names, score_thresh=score_thresh, upscale=upscale,
                                       gt_captions=t.get("captions"), pred_captions=p.get("captions")))
    ncols = max(1, min(ncols, len(tiles)))
    nrows = -(-len(tiles) // ncols)
    cw, ch = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (ncols * cw + (ncols + 1) * pad, nrows * ch + (nrows + 1) * pad), GRID_BACKGROUND)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, ncols)
        grid.paste(tile, (pad + c * (cw + pad), pad + r * (ch + pad)))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    return out
