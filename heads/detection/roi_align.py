"""RoIAlign as one fused gather-and-weighted-sum (``F.embedding_bag``) over channels-last features.

``torchvision.ops.roi_align`` on the CPU runs one thread over NCHW planes: for every RoI, channel and
bin it reads the four neighbours of each bilinear sample from a different cache line. Its backward
scatters the same way. Here the sample positions and bilinear weights are computed once per RoI
(vectorised over all RoIs), and each output bin becomes one *bag* of ``grid_h * grid_w * 4``
weighted rows of the ``(N * H * W, C)`` channels-last table, which ``embedding_bag(mode="sum",
per_sample_weights=...)`` reduces with vectorised, multi-threaded kernels; its backward is the
matching weighted scatter-add into the feature gradient.

The arithmetic is torchvision's (``roi_align_kernel.cpp``): the same sample points, the same
clamping at the borders, samples outside ``[-1, H] x [-1, W]`` contributing zero, the mean over the
bin's samples, ``aligned`` shifting by half a pixel, and ``sampling_ratio <= 0`` meaning
``ceil(roi_size / output_size)`` samples per bin side for each RoI. Only the order of the float
additions differs (results equal to ~1e-6 relative). No gradient flows into the boxes, as in
torchvision.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align as tv_roi_align

#: ``sampling_ratio <= 0`` picks per-RoI grids; beyond this many samples per bin side (huge RoIs
#: on a fine level) the index tables would grow large, so those calls go to torchvision's kernel.
MAX_ADAPTIVE_GRID = 4


def _axis_samples(start: torch.Tensor, length: torch.Tensor, pooled: int, grid: torch.Tensor, max_grid: int, size: int):
    """Sample positions along one axis for every RoI.

    Args:
        start, length: ``(R,)`` RoI start and extent in feature-map cells.
        pooled: output bins along this axis; grid: ``(R,)`` samples per bin (<= ``max_grid``).
        size: the feature map's extent along this axis.

    Returns:
        ``low, high (R, pooled, max_grid)`` long and ``w_low, w_high`` their bilinear weights (zero for
        samples outside the map or beyond the RoI's own grid).
    """
    bin_size = length / pooled
    ph = torch.arange(pooled, device=start.device, dtype=start.dtype)
    it = torch.arange(max_grid, device=start.device, dtype=start.dtype)
    g = grid.to(start.dtype)
    pos = (start[:, None, None] + ph[None, :, None] * bin_size[:, None, None]
           + (it[None, None, :] + 0.5) * (bin_size / g.clamp(min=1.0))[:, None, None])
    valid = (pos >= -1.0) & (pos <= size) & (it[None, None, :] < g[:, None, None])
    pos = torch.where(valid, pos, torch.zeros_like(pos)).clamp(min=0.0)  # invalid samples: weight 0 at row 0
    low = pos.floor().to(torch.long)
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    vf = valid.to(pos.dtype)
    return low, high, (1.0 - frac) * vf, frac * vf


def bag_indices(
    rois: torch.Tensor,
    feature_hw: Tuple[int, int],
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    row_offset: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows and weights of every bin's bag in a ``(N * H * W, C)`` channels-last table.

    Args:
        rois: ``(R, 5)`` ``(batch index, x1, y1, x2, y2)`` in input pixels.
        feature_hw: ``(H, W)`` of the level; row ``row_offset + (b * H + y) * W + x`` holds ``(b, y, x)``.

    Returns:
        ``idx`` long and ``wgt`` float, both ``(R * out_h * out_w, bag)`` with
        ``bag = 4 * grid_h * grid_w`` (zero weights where a sample is outside the map or beyond a
        RoI's own adaptive grid), the ``1 / count`` of the mean folded into ``wgt``.
    """
    h, w = feature_hw
    out_h, out_w = output_size
    r = rois.shape[0]
    boxes = rois.detach().to(torch.float64 if rois.dtype == torch.float64 else torch.float32)
    offset = 0.5 if aligned else 0.0
    x1, y1 = boxes[:, 1] * spatial_scale - offset, boxes[:, 2] * spatial_scale - offset
    rw = boxes[:, 3] * spatial_scale - offset - x1
    rh = boxes[:, 4] * spatial_scale - offset - y1
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    if sampling_ratio > 0:
        gy = gx = torch.full((r,), sampling_ratio, device=boxes.device, dtype=torch.long)
        my = mx = sampling_ratio
    else:
        # an empty RoI (aligned=True allows zero or negative extents) gets no samples: output 0
        gy = torch.ceil(rh / out_h).to(torch.long).clamp(min=0)
        gx = torch.ceil(rw / out_w).to(torch.long).clamp(min=0)
        my, mx = (max(int(gy.max()), 1), max(int(gx.max()), 1)) if r else (1, 1)
    ylo, yhi, wylo, wyhi = _axis_samples(y1, rh, out_h, gy, my, h)   # (R, out_h, my)
    xlo, xhi, wxlo, wxhi = _axis_samples(x1, rw, out_w, gx, mx, w)   # (R, out_w, mx)
    count = (gy * gx).clamp(min=1).to(boxes.dtype)
    base = boxes[:, 0].to(torch.long) * (h * w) + row_offset
    rows = torch.stack([ylo, yhi], -1) * w + base[:, None, None, None]   # (R, out_h, my, 2)
    cols = torch.stack([xlo, xhi], -1)                                 # (R, out_w, mx, 2)
    wr = torch.stack([wylo, wyhi], -1) / count[:, None, None, None]
    wc = torch.stack([wxlo, wxhi], -1)
    # bag (r, ph, pw) holds the samples (iy, ky, ix, kx): row rows[r, ph, iy, ky] + col cols[r, pw, ix, kx]
    idx = rows[:, :, None, :, :, None, None] + cols[:, None, :, None, None, :, :]
    wgt = wr[:, :, None, :, :, None, None] * wc[:, None, :, None, None, :, :]
    bag = my * 2 * mx * 2
    return idx.reshape(-1, bag), wgt.reshape(-1, bag)


def channels_last_table(features: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N * H * W, C)`` rows (a view when the map is already channels-last)."""
    n, c, h, w = features.shape
    return features.permute(0, 2, 3, 1).reshape(n * h * w, c)


def pool_bags(table: torch.Tensor, idx: torch.Tensor, wgt: torch.Tensor, num_rois: int, output_size: Tuple[int, int]) -> torch.Tensor:
    """One weighted gather-sum over all bins; ``(R, C, out_h, out_w)`` (channels-last in memory)."""
    out = F.embedding_bag(idx, table, mode="sum", per_sample_weights=wgt.to(table.dtype))
    return out.view(num_rois, output_size[0], output_size[1], table.shape[1]).permute(0, 3, 1, 2)


def roi_align_bag(features: torch.Tensor, rois: torch.Tensor, output_size: Tuple[int, int],
                  spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """Same contract and result as :func:`torchvision.ops.roi_align` (``rois`` ``(R, 5)`` with the
    batch index first; returns ``(R, C, out_h, out_w)``, in channels-last memory layout)."""
    n, c, h, w = features.shape
    if rois.shape[0] == 0:
        return features.new_zeros((0, c) + tuple(output_size))
    with torch.no_grad():
        idx, wgt = bag_indices(rois, (h, w), output_size, spatial_scale, sampling_ratio, aligned)
    return pool_bags(channels_last_table(features), idx, wgt, rois.shape[0], output_size)


IMPLS = ("auto", "bag", "torchvision")


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"RoIAlign impl must be one of {IMPLS}, got {impl!r}")
    return impl


def use_bag(impl: str, device: torch.device, rois: torch.Tensor, output_size: Tuple[int, int],
            spatial_scale: float, sampling_ratio: int) -> bool:
    """Whether ``impl`` means the bag here: ``"auto"`` takes it on the CPU (several times faster there,
    forward and backward) and torchvision's kernel on other devices, and falls back to torchvision
    where adaptive sampling would need more than :data:`MAX_ADAPTIVE_GRID` samples per bin side
    (``spatial_scale``: the finest level's, where the grids are largest)."""
    if check_impl(impl) != "auto":
        return impl == "bag"
    if device.type != "cpu":
        return False
    if sampling_ratio > 0 or not rois.numel():
        return True
    side = torch.maximum((rois[:, 3] - rois[:, 1]) * spatial_scale / output_size[1],
                         (rois[:, 4] - rois[:, 2]) * spatial_scale / output_size[0])
    return math.ceil(float(side.max())) <= MAX_ADAPTIVE_GRID


def roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """RoIAlign through :func:`roi_align_bag` or torchvision's kernel, as :func:`use_bag` decides."""
    if use_bag(impl, features.device, rois, output_size, spatial_scale, sampling_ratio):
        return roi_align_bag(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
