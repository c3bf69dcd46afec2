"""The crop pass (R-CNN style): a second look at the region of a box, through the backbone's convolutions
with normalisation layers of their own (see :mod:`heads.localization`)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops import roi_align


def tied_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are the original's (the same tensors, trained together),
    except those of normalisation layers (BatchNorm and its frozen and group variants), which are copied:
    one set of weights, two sets of normalisation statistics."""
    twin = copy.deepcopy(module)
    for (_, m), (_, t) in zip(module.named_modules(), twin.named_modules()):
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or "Norm" in type(m).__name__:
            continue
        for name, param in list(m.named_parameters(recurse=False)):
            setattr(t, name, param)
    return twin


def jitter_boxes(boxes: torch.Tensor, jitter: float) -> torch.Tensor:
    """Training crops: ``boxes`` ((N, 4) normalised xyxy) with their centres moved and their sides scaled
    by up to ``jitter`` of their width/height, uniformly at random (0: unchanged)."""
    if not jitter:
        return boxes
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-6)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + (torch.rand_like(wh) * 2 - 1) * jitter * wh
    wh = wh * (1 + (torch.rand_like(wh) * 2 - 1) * jitter)
    return torch.cat((centre - wh / 2, centre + wh / 2), -1)


def crop_regions(x: torch.Tensor, boxes: torch.Tensor, size: int, context: float) -> torch.Tensor:
    """The regions of ``boxes`` ((N, 4) normalised xyxy, one per image of ``x`` (N, C, H, W)), enlarged by
    ``context`` of their width/height per side, resampled to ``size`` x ``size`` (RoIAlign, bilinear);
    ``x``'s dtype and memory format."""
    h, w = x.shape[-2:]
    scale = boxes.new_tensor([w, h, w, h])
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1.0 / max(h, w))
    b = torch.cat((boxes[:, :2] - context * wh, boxes[:, 2:] + context * wh), -1) * scale
    rois = torch.cat((torch.arange(len(b), device=b.device, dtype=b.dtype)[:, None], b), 1)
    crops = roi_align(x.float(), rois, size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    crops = crops.to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        crops = crops.contiguous(memory_format=torch.channels_last)  # keep the caller's memory format
    return crops
