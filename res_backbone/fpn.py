"""Feature Pyramid Network (Lin et al., 2017) over ResNet levels ``res2``..``res5``.

``p_k = out_conv_k(lateral_k(c_k) + upsample_nearest(top-down_{k+1}))``, with an extra ``p6`` either
by max-pooling ``p5`` (kernel 1, stride 2, as torchvision and detectron2 do for Faster R-CNN) or by
a stride-2 3x3 conv on ``p5`` (``p6="conv"``).
"""

from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .features import feature_entry


class FPN(nn.Module):
    """Top-down pyramid with lateral connections.

    Args:
        in_shapes: ``{name: (channels, stride)}`` of the inputs, fine to coarse, e.g. a backbone's
            ``output_shape()`` for ``res2``..``res5``. Output ``p{k}`` has stride ``2**k``.
        out_channels: width of every output level (256 in the FPN paper).
        p6: ``"maxpool"``, ``"conv"`` or ``None`` (no extra level).

    ``forward(features)`` takes the dict the backbone returns and gives ``OrderedDict`` of
    ``p*`` levels, fine to coarse, each ``(N, out_channels, H / stride, W / stride)``.
    """

    def __init__(self, in_shapes: Mapping[str, Tuple[int, int]], out_channels: int = 256, p6: Optional[str] = "maxpool"):
        super().__init__()
        if p6 not in ("maxpool", "conv", None):
            raise ValueError(f"p6 must be 'maxpool', 'conv' or None, got {p6!r}")
        if not in_shapes:
            raise ValueError("FPN needs at least one input level")
        self.in_names = list(in_shapes)
        strides = [int(s) for _, s in in_shapes.values()]
        if strides != sorted(strides) or len(set(strides)) != len(strides):
            raise ValueError(f"FPN inputs must be ordered fine to coarse with distinct strides, got {dict(in_shapes)}")
        for s in strides:
            if s & (s - 1):
                raise ValueError(f"FPN input strides must be powers of two, got {strides}")
        self.out_names = [f"p{s.bit_length() - 1}" for s in strides]
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c, _ in in_shapes.values())
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in strides)
        self.p6_mode = p6
        self.p6 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) if p6 == "conv" else None
        info = [
            feature_entry(n, conv.out_channels, s, f"output_convs.{i}")
            for i, (n, conv, s) in enumerate(zip(self.out_names, self.output_convs, strides))
        ]
        if p6 is not None:
            p6_stride = strides[-1] * 2
            info.append(feature_entry(f"p{p6_stride.bit_length() - 1}", out_channels, p6_stride, "p6"))
        self.feature_info = info
        self.out_channels = out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        xs = [features[n] for n in self.in_names]
        last = self.lateral_convs[-1](xs[-1])
        outs = [self.output_convs[-1](last)]
        for i in range(len(xs) - 2, -1, -1):
            lateral = self.lateral_convs[i](xs[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.output_convs[i](last))
        if self.p6_mode == "maxpool":
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        elif self.p6 is not None:
            outs.append(self.p6(outs[-1]))
        return OrderedDict((f["name"], o) for f, o in zip(self.feature_info, outs))
