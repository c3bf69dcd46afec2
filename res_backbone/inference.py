"""Inference fast path: BatchNorm folded into the convs, channels-last memory format.

Each rewrite was measured with ``tools/bench.py backbone --ablation`` (``docs/bench_cpu.md``):

* **BatchNorm folding** (``w' = w * g / sqrt(v + eps)``, ``b' = beta - g * m / sqrt(v + eps)``)
  removes one elementwise pass per conv: +5..10% on CPU at batch 8.
* **Channels-last** weights and inputs let oneDNN/cuDNN use their NHWC kernels: the largest gain
  on CPU (ResNet-50, batch 8: 1.14x over NCHW; torchvision and timm gain about as much from it themselves,
  so against them at their best layout the fast path is 1.02-1.05x: docs/bench_cpu.md).
* **Fused epilogues** (``fuse=True``, opt-in): on CPU every ``conv -> relu`` and
  ``conv -> (+ shortcut) -> relu`` of a folded block runs as one oneDNN call
  (``torch.ops.mkldnn._convolution_pointwise``, the kernel ``torch.compile``'s CPU backend emits for
  the same pattern). It bought +25% on a memory-bound (loaded) machine but -2%..+6% on an idle one,
  where the convs take 98% of the time, and it relies on a private op; so it is not the default.
  Elsewhere (CUDA, autocast, autograd, torch.compile) :class:`FusedConv2d` runs plain ops.

``torch.jit.freeze`` + ``optimize_for_inference`` gave about +5% over folding + channels-last on
ResNet-50 at batch 8, needs tracing (no dict outputs with ``strict=True``) and is deprecated; prepacked
oneDNN weights (``torch.utils.mkldnn``) gave nothing. Neither is used.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as _TVFrozenBN

from .blocks import BasicBlock, Bottleneck
from .layers import FrozenBatchNorm2d as _FrozenBN
from .resnet import ResNet

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, _TVFrozenBN, _FrozenBN)
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


# Read once: torch.compile cannot trace torch.backends.mkldnn.is_available().
_HAS_ONEDNN_FUSION = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """Return a new conv computing ``bn(conv(x))`` in eval mode."""
    # built on the meta device: no random initialisation (it would draw from the global RNG, so preparing
    # a copy for an evaluation mid-training would change the training that follows); filled below
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
        device="meta", dtype=conv.weight.dtype,
    ).to_empty(device=conv.weight.device)
    # in float64, so that the folded weights are the correctly rounded float32 of the exact product
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    fused.weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
    fused.bias.copy_(bn.bias.double() + (bias - bn.running_mean.double()) * scale)
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


class FusedConv2d(nn.Conv2d):
    """A conv with its epilogue: ``relu(conv(x) + residual)``, ``relu(conv(x))`` or ``conv(x)``.

    Parameter names are ``nn.Conv2d``'s (``weight``, ``bias``), and it is an ``nn.Conv2d``, so
    :func:`~res_backbone.complexity.count_macs` still counts it.

    Args (of ``forward``):
        x: ``(N, C_in, H, W)``, channels-last for the fastest path.
        residual: optional ``(N, C_out, H', W')`` added to the conv output before the ReLU.

    Returns:
        ``(N, C_out, H', W')``.
    """

    def __init__(self, *args, relu: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = relu

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, relu: bool) -> "FusedConv2d":
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FusedConv2d needs numeric zero padding")
        fused = cls(  # built on the meta device: no random initialisation (see fuse_conv_bn), filled below
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, relu=relu,
            device="meta", dtype=conv.weight.dtype,
        ).to_empty(device=conv.weight.device)
        fused.weight.copy_(conv.weight)
        if conv.bias is not None:
            fused.bias.copy_(conv.bias)
        fused.weight.requires_grad_(conv.weight.requires_grad)
        return fused

    def _use_onednn(self, x: torch.Tensor) -> bool:
        # The oneDNN op has no backward and is not on autocast's lists: use it only for plain
        # eager CPU inference. Under torch.compile the plain ops let Inductor fuse them itself.
        return (
            _HAS_ONEDNN_FUSION
            and not torch.compiler.is_compiling()
            and x.device.type == "cpu"
            and x.dtype in _ONEDNN_DTYPES
            and x.dtype == self.weight.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not torch.is_autocast_enabled("cpu")
        )

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._use_onednn(x) and (residual is None or residual.dtype == x.dtype):
            args = (self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups)
            if residual is None:
                attr = "relu" if self.relu else "none"
                return torch.ops.mkldnn._convolution_pointwise(x, *args, attr, [], "")
            unary = "relu" if self.relu else None
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", None, unary, [], "")
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            out = out + residual
        return F.relu(out) if self.relu else out

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


class FusedBlock(nn.Module):
    """A folded :class:`BasicBlock` or :class:`Bottleneck` with fused epilogues.

    Keeps the block's names (``conv1``..``conv3``, ``downsample``); the last conv adds the shortcut
    and applies the ReLU in one call. Plain blocks (``residual=False``) have no shortcut.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        names = [n for n in ("conv1", "conv2", "conv3") if isinstance(getattr(block, n, None), nn.Conv2d)]
        self.conv_names = names
        for name in names:
            setattr(self, name, FusedConv2d.from_conv(getattr(block, name), relu=True))
        self.residual = block.residual
        down = block.downsample
        if isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[1], nn.Identity):
            down = FusedConv2d.from_conv(down[0], relu=False)  # folded projection shortcut (B/C)
        self.downsample = down  # None (identity), a FusedConv2d, or option A's ZeroPadShortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in self.conv_names[:-1]:
            out = getattr(self, name)(out)
        shortcut = None
        if self.residual:
            shortcut = x if self.downsample is None else self.downsample(x)
        return getattr(self, self.conv_names[-1])(out, shortcut)


def _is_folded(block: nn.Module) -> bool:
    norms = [getattr(block, f"bn{i}", None) for i in (1, 2, 3)]
    down = block.downsample
    down_ok = not isinstance(down, nn.Sequential) or (len(down) == 2 and isinstance(down[1], nn.Identity))
    return all(n is None or isinstance(n, nn.Identity) for n in norms) and down_ok


def fuse_activations(model: nn.Module) -> nn.Module:
    """Replace, in place, every folded residual block by a :class:`FusedBlock` and the stem's
    ``conv1 -> relu`` by one :class:`FusedConv2d`. Blocks whose norms were not folded (GroupNorm)
    are left alone. Call after :func:`fold_batchnorm`.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (BasicBlock, Bottleneck)) and _is_folded(child):
                setattr(module, name, FusedBlock(child))
    for module in model.modules():
        if isinstance(module, ResNet) and isinstance(module.bn1, nn.Identity) and type(module.conv1) is nn.Conv2d:
            # ResNet.stem is relu(bn1(conv1(x))): the conv now applies the ReLU itself.
            module.conv1 = FusedConv2d.from_conv(module.conv1, relu=True)
            module.relu = nn.Identity()
    return model


@torch.no_grad()
def cast_for_autocast(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """Store every conv's and linear layer's weight and bias in ``dtype`` (in place).

    Under ``torch.autocast(dtype=dtype)`` those layers compute in ``dtype`` anyway, casting their
    float32 parameters on every call (one copy kernel per tensor and call: a large share of a GPU
    forward at batch 1); stored in ``dtype`` they are used as they are, with bitwise the same
    results. The model must then run under autocast. ``None`` leaves the model as it is.
    """
    if dtype is None or dtype == torch.float32:
        return model
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.to(dtype)
    return model


def prepare_for_inference(
    model: nn.Module, channels_last: bool = True, fold_bn: bool = True, fuse: bool = False,
    autocast_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Return an eval-mode copy of ``model`` ready for fast inference.

    Outputs equal the unprepared model's in eval mode within float rounding (about 1e-6 relative
    in float32); the input model is not modified.

    A model that needs more than these generic rewrites defines ``finish_inference_copy(channels_last)``,
    called on the copy after BatchNorm folding and the memory-format change and before the autocast
    cast (``heads.detection.FasterRCNN`` reorders its box head's ``fc1`` and makes its input channels-last).

    Args:
        model: a ResNet classifier or backbone (with or without FPN), or a model holding them (a detector).
        channels_last: convert weights to ``torch.channels_last``; feed NHWC inputs
            (``x.contiguous(memory_format=torch.channels_last)``) for the full gain, NCHW works too.
        fold_bn: fold BatchNorm into the convs.
        fuse: fuse ReLU and the residual add into the conv of folded blocks (needs ``fold_bn``);
            a oneDNN kernel on CPU, plain ops on other devices. Off by default: no gain measured
            on an idle CPU (see the module docstring).
        autocast_dtype: ``torch.bfloat16``/``torch.float16`` when the copy will only run under
            ``torch.autocast`` with that dtype: conv and linear weights are stored in it
            (:func:`cast_for_autocast`), same results, no per-call weight casts.

    Returns:
        A new module in eval mode; gradients are disabled on its parameters. Run it under
        ``torch.inference_mode()``.
    """
    fast = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(fast)
        if fuse:
            fuse_activations(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    finish = getattr(fast, "finish_inference_copy", None)
    if callable(finish):  # a model with rewrites of its own (the detector's box head), before any cast
        finish(channels_last=channels_last)
    cast_for_autocast(fast, autocast_dtype)
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast.eval()  # again: the modules the rewrites created start in training mode
