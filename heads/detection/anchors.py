"""Anchor boxes per feature level (Faster R-CNN, section 3.1.1; FPN, section 4.1).

Each level ``l`` of stride ``s_l`` carries ``A_l = len(sizes[l]) * len(aspect_ratios[l])`` anchors
centred on every grid position ``(x * s_l, y * s_l)`` (torchvision's and detectron2's convention:
the anchor of cell ``(0, 0)`` is centred on the image corner, offset 0). An anchor of size ``S`` and
ratio ``r = h / w`` has ``w = S / sqrt(r)``, ``h = S * sqrt(r)``; its corners are rounded to whole
pixels, as torchvision does, so converted torchvision weights see identical anchors.

Anchors depend only on the (padded) feature-map sizes, so they are built once per size and cached.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from .size_cache import cached_for_size


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], round_corners: bool = True) -> torch.Tensor:
    """Anchors centred on ``(0, 0)``, ratio-major (ratio ``i``, size ``j`` at ``i * len(sizes) + j``).

    Returns:
        ``(len(aspect_ratios) * len(sizes), 4)`` float32 xyxy.
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
    return base.round() if round_corners else base


class AnchorGenerator(nn.Module):
    """Anchors for a list of feature levels.

    Args:
        sizes: per level, the anchor sizes (sqrt of area) in input pixels, e.g.
            ``((32,), (64,), (128,), (256,), (512,))`` for FPN ``p2..p6`` or
            ``((32, 64, 128, 256, 512),)`` for a single C4 level.
        aspect_ratios: per level ``h / w`` ratios; a single entry is used for every level.
        strides: per level stride in input pixels, read from the backbone's ``output_shape()``
            (see :meth:`from_shapes`).
        round_corners: round cell anchors to whole pixels (torchvision does; detectron2 does not).
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        round_corners: bool = True,
    ):
        super().__init__()
        if len(aspect_ratios) == 1:
            aspect_ratios = list(aspect_ratios) * len(sizes)
        if not len(sizes) == len(aspect_ratios) == len(strides):
            raise ValueError(
                f"one entry per level needed: {len(sizes)} sizes, {len(aspect_ratios)} aspect ratios, {len(strides)} strides"
            )
        self.sizes = [tuple(float(s) for s in level) for level in sizes]
        self.aspect_ratios = [tuple(float(r) for r in level) for level in aspect_ratios]
        self.strides = [int(s) for s in strides]
        self.cells = [cell_anchors(s, r, round_corners) for s, r in zip(self.sizes, self.aspect_ratios)]
        self._cache: Dict[Tuple, Tuple[List[torch.Tensor], torch.Tensor]] = {}

    @classmethod
    def from_shapes(
        cls,
        shapes: Mapping[str, Tuple[int, int]],
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),),
        **kwargs,
    ) -> "AnchorGenerator":
        """Build with the strides of ``shapes`` (``{name: (channels, stride)}``, in level order)."""
        return cls(sizes, aspect_ratios, [s for _, s in shapes.values()], **kwargs)

    @property
    def num_anchors_per_location(self) -> List[int]:
        return [c.shape[0] for c in self.cells]

    def grid_anchors(self, grid_sizes: Sequence[Tuple[int, int]], device: torch.device, dtype: torch.dtype = torch.float32) -> List[torch.Tensor]:
        """Anchors of each level for feature maps of ``grid_sizes`` ``[(h, w), ...]``, cached.

        Returns:
            per level ``(h * w * A, 4)`` xyxy; row ``(y * w + x) * A + a`` is anchor ``a`` of cell
            ``(y, x)`` (the order of the RPN head's flattened outputs).
        """
        return self._cached(grid_sizes, device, dtype)[0]

    def _cached(self, grid_sizes: Sequence[Tuple[int, int]], device: torch.device, dtype: torch.dtype) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """``(per-level anchors, all levels concatenated)``, built once per grid sizes and device."""
        if len(grid_sizes) != len(self.cells):
            raise ValueError(f"{len(grid_sizes)} feature maps for {len(self.cells)} anchor levels")

        def build() -> Tuple[List[torch.Tensor], torch.Tensor]:
            out = []
            for (h, w), stride, cell in zip(grid_sizes, self.strides, self.cells):
                xs = torch.arange(w, device=device, dtype=torch.float32) * stride
                ys = torch.arange(h, device=device, dtype=torch.float32) * stride
                sy, sx = torch.meshgrid(ys, xs, indexing="ij")
                shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
                out.append((shifts + cell.to(device).reshape(1, -1, 4)).reshape(-1, 4).to(dtype))
            return out, torch.cat(out)

        if torch.compiler.is_exporting():  # sizes are symbolic: no cache keyed on them
            return build()
        key = (tuple(tuple(int(v) for v in g) for g in grid_sizes), str(device), dtype)
        return cached_for_size(self._cache, key, build)  # a data pipeline pads to few distinct sizes

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Anchors for feature maps ``(N, C, h_l, w_l)``, shared by all images of the (padded) batch."""
        return self.grid_anchors([f.shape[-2:] for f in features], features[0].device)

    def concatenated(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """All levels' anchors in one ``(sum_l h_l * w_l * A, 4)`` tensor, level-major (cached too)."""
        return self._cached([f.shape[-2:] for f in features], features[0].device, torch.float32)[1]

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, strides={self.strides}"


def default_fpn_sizes(num_levels: int, smallest: float = 32.0) -> Tuple[Tuple[float], ...]:
    """One size per level doubling from ``smallest`` (FPN: 32 on p2 .. 512 on p6)."""
    return tuple((smallest * 2 ** i,) for i in range(num_levels))

