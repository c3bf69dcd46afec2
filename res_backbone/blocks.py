"""Residual blocks of the ResNet paper (He et al., 2015) and their plain (shortcut-free) twins.

Parameter names follow torchvision (``conv1``/``bn1``..., ``downsample.0``/``downsample.1``) so
torchvision and timm checkpoints load with ``strict=True``.

Shortcut options (paper, section 4.1 "Identity vs. Projection Shortcuts"):

* ``"A"`` - identity everywhere; where the shape changes, subsample and zero-pad channels
  (:class:`~res_backbone.layers.ZeroPadShortcut`, no parameters).
* ``"B"`` - identity where the shape is unchanged, projection (1x1 conv + norm) where it changes.
  The default, and what torchvision and timm ship.
* ``"C"`` - projection on every block.

``residual=False`` builds the plain twin: the same convs and norms, no shortcut at all (the
paper's "plain networks", section 4.1, used to show the degradation problem).
"""

from typing import Callable, Optional

import torch
from torch import nn

from .layers import ZeroPadShortcut, conv1x1, conv3x3

SHORTCUTS = ("A", "B", "C")


def make_shortcut(
    in_ch: int, out_ch: int, stride: int, shortcut: str, norm_layer: Callable[[int], nn.Module]
) -> Optional[nn.Module]:
    """Build the shortcut branch of a block, or ``None`` for a plain identity.

    Returns ``None`` when the identity is used as is (option A/B without a shape change), a
    :class:`ZeroPadShortcut` for option A with a shape change, else ``Sequential(conv1x1, norm)``
    (named ``downsample.0``/``downsample.1`` as in torchvision).
    """
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut={shortcut!r} is not supported; choose one of {', '.join(SHORTCUTS)}")
    changes_shape = stride != 1 or in_ch != out_ch
    if shortcut == "C" or (shortcut == "B" and changes_shape):
        return nn.Sequential(conv1x1(in_ch, out_ch, stride), norm_layer(out_ch))
    if changes_shape:  # option A
        return ZeroPadShortcut(in_ch, out_ch, stride)
    return None


class _ResidualBlock(nn.Module):
    """What both blocks share: the shortcut, the final ReLU, zero-init of the last norm, the residual sum."""

    def _finish(self, in_ch: int, out_ch: int, stride: int, shortcut: str, norm_layer, residual: bool,
                last_norm: str) -> None:
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = make_shortcut(in_ch, out_ch, stride, shortcut, norm_layer) if residual else None
        self.out_channels = out_ch
        self._last_norm = last_norm

    def zero_init_last(self) -> None:
        """Zero the last norm's scale so the block starts as an identity (Goyal et al., 2017)."""
        last = getattr(self, self._last_norm)
        if self.residual and getattr(last, "weight", None) is not None:
            nn.init.zeros_(last.weight)

    def _add_shortcut(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (ResNet-18/34). ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        width: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        shortcut: str = "B",
        residual: bool = True,
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        if dilation > 1:
            raise ValueError(
                "BasicBlock (resnet18/34 and their plain twins) does not support dilation; "
                "output_stride 16 or 8 needs a bottleneck model (resnet50/101/152)"
            )
        del stride_in_1x1  # both convs are 3x3; the stride always sits in the first
        out_ch = width * self.expansion
        self.conv1 = conv3x3(in_ch, width, stride)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, out_ch)
        self.bn2 = norm_layer(out_ch)
        self._finish(in_ch, out_ch, stride, shortcut, norm_layer, residual, "bn2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self._add_shortcut(out, x)


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand (x4) (ResNet-50/101/152; paper, section 4.1 "Deeper Bottleneck
    Architectures").

    ``stride_in_1x1=False`` puts the stride in the 3x3 (torchvision's "ResNet v1.5");
    ``True`` puts it in the first 1x1 as in the paper and the original Caffe models.
    """

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        width: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        shortcut: str = "B",
        residual: bool = True,
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        out_ch = width * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_ch, width, s1)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, s3, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = norm_layer(out_ch)
        self._finish(in_ch, out_ch, stride, shortcut, norm_layer, residual, "bn3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self._add_shortcut(out, x)


def block_stride(block: nn.Module) -> int:
    """The spatial stride of a block, read off its convs' strides (not from a stored number)."""
    stride = 1
    for name in ("conv1", "conv2", "conv3"):
        conv = getattr(block, name, None)
        if isinstance(conv, nn.Conv2d):
            stride *= conv.stride[0]
    return stride
