"""Inference fast path: BatchNorm folded into the preceding convs, channels-last memory format.

Folding (``w' = w * g / sqrt(v + eps)``, ``b' = beta - g * m / sqrt(v + eps)``) removes one
elementwise pass per conv; channels-last lets oneDNN/cuDNN pick their fastest NHWC kernels.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .layers import FrozenBatchNorm2d as _FrozenBN
from torchvision.ops.misc import FrozenBatchNorm2d as _TVFrozenBN

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, _TVFrozenBN, _FrozenBN)


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """Return a new conv computing ``bn(conv(x))`` in eval mode."""
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
    return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ``convN``/``bnN`` and ``downsample.0``/``downsample.1`` pair in place.

    The norm becomes ``nn.Identity``; GroupNorm layers are left alone. Call on an eval-mode model.
    """
    for module in model.modules():
        pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        if isinstance(module, nn.Sequential) and len(module) == 2:
            pairs.append(("0", "1"))
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, _BN_TYPES):
                setattr(module, conv_name, fuse_conv_bn(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return model


def prepare_for_inference(model: nn.Module, channels_last: bool = True, fold_bn: bool = True) -> nn.Module:
    """Return an eval-mode copy of ``model`` ready for fast inference.

    Args:
        model: a ResNet classifier or backbone (left untouched).
        channels_last: convert weights to ``torch.channels_last``; feed NHWC inputs
            (``x.to(memory_format=torch.channels_last)``) for the full gain, NCHW works too.
        fold_bn: fold BatchNorm into the convs (outputs equal the unfused model's within float
            rounding, about 1e-5 relative).

    Returns:
        A new module; gradients are disabled on its parameters.
    """
    fast = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast
