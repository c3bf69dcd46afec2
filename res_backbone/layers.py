"""Normalisation factory and small layers shared by the ResNet family.

Every conv in a ResNet is followed by a normalisation layer (the paper's "BN after every conv",
section 3.4). Which one is a deployment choice, so it is a keyword, not a subclass:

* ``"bn"``        - ``nn.BatchNorm2d`` (the paper's choice, torchvision's and timm's default)
* ``"frozen_bn"`` - :class:`FrozenBatchNorm2d`: statistics and affine parameters fixed (detection
  fine-tuning with small per-GPU batches, as in detectron2 and torchvision's detection models)
* ``"sync_bn"``   - ``nn.SyncBatchNorm``: statistics reduced across DDP ranks
* ``"gn"``        - ``nn.GroupNorm`` with 32 groups (or fewer when the width is not divisible)
"""

from typing import Callable, Tuple

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as _TVFrozenBatchNorm2d

NORMS = ("bn", "frozen_bn", "sync_bn", "gn")


@torch.jit.unused
def _compiling() -> bool:
    return torch.compiler.is_compiling()


class FrozenBatchNorm2d(_TVFrozenBatchNorm2d):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, no parameters).

    Loads BatchNorm2d state dicts (``num_batches_tracked`` is ignored), so torchvision and timm
    checkpoints load with ``strict=True``.
    """

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Return ``module`` with every ``BatchNorm2d``/``SyncBatchNorm`` replaced by a frozen copy."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = cls(module.num_features, eps=module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new = cls.convert(child)
            if new is not child:
                setattr(module, name, new)
        return module

    def _compute_affine(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` as ``(1, C, 1, 1)`` tensors in ``dtype``, computed as torchvision does."""
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return scale.to(dtype), shift.to(dtype)

    @torch.jit.unused
    def _cached_affine(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_compute_affine` for ``x``, cached until a buffer changes (its data pointer or in-place
        version), the dtype or the inference mode does: four small ops and kernel launches less per
        layer and call, which is what a GPU forward at small batch is bound by."""
        bufs = (self.weight, self.bias, self.running_mean, self.running_var)
        key = (x.dtype, torch.is_inference_mode_enabled()) + tuple((b.data_ptr(), b._version) for b in bufs)
        cache = self.__dict__.get("_affine_cache")
        if cache is None or cache[0] != key:
            cache = (key,) + self._compute_affine(x.dtype)
            self.__dict__["_affine_cache"] = cache
        return cache[1], cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's arithmetic (x * scale, then + shift: the same roundings in float32), with the
        # addition in place on the product (one large temporary less: 6% of a ResNet-50-FPN forward on
        # CPU). Under autocast the output keeps the input's dtype (torchvision's promotes to float32).
        if torch.jit.is_scripting() or _compiling():
            scale, shift = self._compute_affine(x.dtype)
        else:
            scale, shift = self._cached_affine(x)
        return (x * scale).add_(shift)


def _group_count(channels: int, preferred: int = 32) -> int:
    groups = min(preferred, channels)
    while channels % groups:
        groups -= 1
    return groups


def get_norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """Return a constructor ``f(num_channels) -> nn.Module`` for the named normalisation.

    Args:
        norm: one of ``"bn"``, ``"frozen_bn"``, ``"sync_bn"``, ``"gn"``.

    Raises:
        ValueError: for any other name, listing the valid ones.
    """
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "sync_bn":
        return nn.SyncBatchNorm
    if norm == "gn":
        return lambda c: nn.GroupNorm(_group_count(c), c)
    raise ValueError(f"norm={norm!r} is not supported; choose one of {', '.join(NORMS)}")


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, _TVFrozenBatchNorm2d))


def set_bn_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer below ``module`` in eval mode (running statistics stay fixed)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """The paper's shortcut option A: parameter-free identity with zero-padded extra channels.

    Subsamples by ``stride`` (taking every ``stride``-th position, as a 1x1 stride-s identity would)
    and appends ``out_ch - in_ch`` zero channels (section 3.3, "(A) zero-padding shortcuts").
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_ch} -> {out_ch})")
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        pad = self.out_ch - self.in_ch
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, x.shape[2], x.shape[3])], dim=1)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}, stride={self.stride}"
