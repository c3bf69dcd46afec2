"""Sliced prediction: a detector trained on small images finds small objects in a very large one.

An aerial tile, a slide or a scan of 5,000 x 5,000 px shrunk to a 512 px training size leaves a 30 px object
3 px wide: nothing is found. Instead the image is cut into overlapping square tiles of ``size`` original
pixels (:func:`tile_windows`), the tiles are predicted in batches like any image (each resized to the
predictor's size, so ``size`` = the training size keeps objects at their scale), their boxes shifted back, and
the tiles' detections merged (:func:`merge_sliced`) so that an object is reported once:

* an object inside the overlap of two tiles is found whole by both: the lower-scoring copy is suppressed
  (IoU >= ``iou_thresh``; across tiles whatever the class each tile gave it, within a tile per class as the
  detector's own NMS);
* an object on a seam is cut by the edge of one tile and whole in its neighbour (the overlap is at least the
  object's size): a box touching an inner tile edge (within ``edge_margin`` px; image borders do not count) is
  *cut*, and a cut box mostly inside a whole box (intersection over the cut box's area >= ``ios_thresh``) is
  dropped, whatever its score and class (a cross cut in half looks like a triangle): the fragment must not
  survive next to the whole box;
* an object larger than the overlap is cut in every tile: cut boxes of a class that overlap and line up across
  the seam (their extents along it agree, 1-D IoU >= 0.6) are fused into their union.

With ``full=True`` the whole image is also predicted once at the predictor's size (for objects larger than a
tile); its boxes count as whole. SAHI (Akyon et al., 2022) popularised the scheme; this is its
greedy-NMS/IoS variant with the cut-edge rule added.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchvision.ops import box_iou

from res_backbone.data.collate import pad_images

__all__ = ["Slicer", "merge_sliced", "tile_windows"]

Window = Tuple[int, int, int, int]  # x0, y0, x1, y1 in original pixels


def _starts(length: int, size: int, step: int) -> List[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size, step)) + [length - size]  # the last tile flush with the far edge
    return sorted(set(starts))


def tile_windows(height: int, width: int, size: int, overlap: float) -> List[Window]:
    """Square windows of ``size`` px covering a ``height`` x ``width`` image, neighbours overlapping by at least
    ``overlap * size`` px (the last row/column is moved flush with the image edge; a side shorter than ``size``
    gets one window of its length).

    Raises:
        ValueError: ``size`` < 1 or ``overlap`` outside [0, 1).
    """
    if size < 1:
        raise ValueError(f"slice size must be >= 1 px, got {size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"slice overlap must be in [0, 1), got {overlap}")
    step = max(1, int(size * (1.0 - overlap)))
    return [(x, y, min(x + size, width), min(y + size, height))
            for y in _starts(height, size, step) for x in _starts(width, size, step)]


def cut_flags(boxes: torch.Tensor, window: Window, image_size: Tuple[int, int], margin: float) -> torch.Tensor:
    """``(N,)`` bool: the box (original pixels) touches an edge of ``window`` that is not an image border."""
    x0, y0, x1, y1 = window
    H, W = image_size
    cut = torch.zeros(len(boxes), dtype=torch.bool)
    if x0 > 0:
        cut |= boxes[:, 0] <= x0 + margin
    if y0 > 0:
        cut |= boxes[:, 1] <= y0 + margin
    if x1 < W:
        cut |= boxes[:, 2] >= x1 - margin
    if y1 < H:
        cut |= boxes[:, 3] >= y1 - margin
    return cut


def _inter(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _iou_1d(a0, a1, b0, b1):
    inter = (torch.min(a1, b1) - torch.max(a0, b0)).clamp(min=0)
    union = torch.max(a1, b1) - torch.min(a0, b0)
    return inter / union.clamp(min=1e-9)


def merge_sliced(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, cut: torch.Tensor,
                 tiles: Optional[torch.Tensor] = None, *, iou_thresh: float = 0.5, ios_thresh: float = 0.6
                 ) -> Dict[str, torch.Tensor]:
    """Merge the detections of all tiles of one image (module docstring), per class.

    Args:
        boxes: ``(N, 4)`` xyxy original pixels; scores ``(N,)``; labels ``(N,)``.
        cut: ``(N,)`` bool, the box touches an inner tile edge (:func:`cut_flags`).
        tiles: ``(N,)`` the tile each box comes from (None: one tile): boxes of two tiles overlapping at
            ``iou_thresh`` are one object whatever their classes (two views of one object; the better score wins).
        iou_thresh: two whole boxes overlapping this much are one object.
        ios_thresh: a cut box whose area lies this much inside a kept box is that object's fragment.

    Returns:
        ``{"boxes", "scores", "labels"}`` best first.
    """
    keep = torch.ones(len(boxes), dtype=torch.bool)
    if bool(cut.any()) and bool((~cut).any()):
        # a fragment lying inside a whole box is dropped whatever its class: a cut cross looks like a triangle
        frag = cut.nonzero().squeeze(1)
        area = ((boxes[frag, 2] - boxes[frag, 0]) * (boxes[frag, 3] - boxes[frag, 1])).clamp(min=1e-9)
        ios = _inter(boxes[frag], boxes[~cut]) / area[:, None]
        keep[frag[(ios >= ios_thresh).any(1)]] = False
    if tiles is not None and len(boxes):
        # two tiles saw the same object and named it differently: keep the better view (greedy, best first)
        order = torch.argsort(scores - 2.0 * cut.to(scores.dtype), descending=True, stable=True)
        order = order[keep[order]]
        iou = box_iou(boxes[order], boxes[order])
        other_tile = tiles[order][:, None] != tiles[order][None, :]
        alive = torch.ones(len(order), dtype=torch.bool)
        for a in range(len(order)):
            if alive[a]:
                alive[a + 1:] &= ~((iou[a, a + 1:] >= iou_thresh) & other_tile[a, a + 1:])
        keep[order[~alive]] = False
    out_b, out_s, out_l = [], [], []
    for c in labels[keep].unique():
        idx = ((labels == c) & keep).nonzero().squeeze(1)
        # whole boxes first (best first), then cut ones: a fragment never suppresses its whole object
        order = idx[torch.argsort(scores[idx] - 2.0 * cut[idx].to(scores.dtype), descending=True, stable=True)]
        kept_b: List[torch.Tensor] = []
        kept_s: List[torch.Tensor] = []
        kept_cut: List[bool] = []
        for i in order.tolist():
            b, is_cut = boxes[i], bool(cut[i])
            if kept_b:
                kb = torch.stack(kept_b)
                iou = box_iou(b[None], kb)[0]
                area = ((b[2] - b[0]) * (b[3] - b[1])).clamp(min=1e-9)
                ios = _inter(b[None], kb)[0] / area
                if bool((iou >= iou_thresh).any()) or (is_cut and bool((ios >= ios_thresh).any())):
                    continue
                if is_cut:  # a fragment of an object larger than the overlap: fuse it with its other part
                    kc = torch.tensor(kept_cut)
                    touching = _inter(b[None], kb)[0] > 0
                    aligned = torch.max(_iou_1d(b[0], b[2], kb[:, 0], kb[:, 2]), _iou_1d(b[1], b[3], kb[:, 1], kb[:, 3]))
                    fuse = (kc & touching & (aligned >= 0.6)).nonzero().squeeze(1)
                    if len(fuse):
                        j = int(fuse[0])
                        kept_b[j] = torch.cat([torch.min(kept_b[j][:2], b[:2]), torch.max(kept_b[j][2:], b[2:])])
                        continue
            kept_b.append(b.clone())
            kept_s.append(scores[i])
            kept_cut.append(is_cut)
        out_b += kept_b
        out_s += kept_s
        out_l += [c] * len(kept_b)
    if not out_b:
        return {"boxes": boxes.new_zeros((0, 4)), "scores": scores.new_zeros(0), "labels": labels.new_zeros(0)}
    b, s, lab = torch.stack(out_b), torch.stack(out_s), torch.stack(out_l)
    order = torch.sort(s, descending=True, stable=True).indices
    return {"boxes": b[order], "scores": s[order], "labels": lab[order]}


class Slicer:
    """The sliced mode of a :class:`~heads.detection.predictor.DetectionPredictor` (module docstring).

    Args:
        size: tile side in original pixels; overlap: fraction of ``size`` neighbours share.
        full: also predict the whole image once at the predictor's size.
        edge_margin: px from an inner tile edge within which a box counts as cut (default 4% of ``size``, >= 4:
            a box regressed from a cut object stops a few px short of the edge).
    """

    def __init__(self, size: int, overlap: float = 0.2, *, full: bool = False, edge_margin: float = None,
                 iou_thresh: float = 0.5, ios_thresh: float = 0.6):
        tile_windows(size, size, size, overlap)  # validates
        self.size, self.overlap, self.full = int(size), float(overlap), full
        self.edge_margin = max(4.0, 0.04 * size) if edge_margin is None else float(edge_margin)
        self.iou_thresh, self.ios_thresh = iou_thresh, ios_thresh

    def prepare(self, predictor, image: np.ndarray) -> List[Tuple[torch.Tensor, float, Window]]:
        """Each tile (and the whole image with ``full``) preprocessed: ``[(tensor, scale, window), ...]``."""
        H, W = image.shape[:2]
        size = predictor.scales[0]
        tiles = []
        for win in tile_windows(H, W, self.size, self.overlap):
            x0, y0, x1, y1 = win
            tensor, scale = predictor.transform(np.ascontiguousarray(image[y0:y1, x0:x1]), size)
            tiles.append((tensor, scale, win))
        if self.full and len(tiles) > 1:
            tensor, scale = predictor.transform(image, size)
            tiles.append((tensor, scale, (0, 0, W, H)))
        return tiles

    def cost(self, prepared) -> int:
        return len(prepared)

    def run(self, predictor, prepared: List[List[Tuple]], items, images) -> List[Any]:
        """Predict every tile of every image in batches of ``predictor.batch_size``; merge per image."""
        flat = [(i, t) for i, tiles in enumerate(prepared) for t in tiles]
        per_image: List[List[Tuple[Dict[str, torch.Tensor], torch.Tensor]]] = [[] for _ in prepared]
        for start in range(0, len(flat), predictor.batch_size):
            chunk = flat[start:start + predictor.batch_size]
            tensors = [t[0] for _, t in chunk]
            sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in tensors]
            wins = [t[2] for _, t in chunk]
            tile_sizes = [(w[3] - w[1], w[2] - w[0]) for w in wins]
            parts = predictor.run_variants(pad_images(tensors, 32), sizes, [t[1] for _, t in chunk], tile_sizes)
            for (i, _), ps, win in zip(chunk, parts, wins):
                det = predictor.merge_parts(ps, 10_000)
                b = det["boxes"].clone()
                b[:, 0::2] += win[0]
                b[:, 1::2] += win[1]
                H, W = images[i].shape[:2]
                cut = cut_flags(b, win, (H, W), self.edge_margin) if win != (0, 0, W, H) else \
                    torch.zeros(len(b), dtype=torch.bool)
                per_image[i].append(({"boxes": b, "scores": det["scores"], "labels": det["labels"]}, cut))
        results = []
        for i, dets in enumerate(per_image):
            tile_ids = torch.cat([torch.full((len(c),), t) for t, (_, c) in enumerate(dets)])
            merged = merge_sliced(torch.cat([d["boxes"] for d, _ in dets]), torch.cat([d["scores"] for d, _ in dets]),
                                  torch.cat([d["labels"] for d, _ in dets]), torch.cat([c for _, c in dets]), tile_ids,
                                  iou_thresh=self.iou_thresh, ios_thresh=self.ios_thresh)
            results.append(predictor.finish(merged, images[i].shape[:2], items[i], max_dets=predictor.max_dets))
        return results
