"""Model names -> architectures; ``create_model``, ``create_backbone``, ``list_models``.

Each variant is a three-line function returning its architecture (block type, blocks per stage,
shortcuts or not); the builders turn it into a classifier or a feature backbone.
"""
from __future__ import annotations

import fnmatch
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

from .blocks import BasicBlock, Bottleneck
from .fpn import FPN
from .weights.catalogue import DEFAULT_CFG
from .weights.load import load_pretrained
from .resnet import ResNet, ResNetBackbone

_ARCHS: Dict[str, Callable[[], dict]] = {}
Pretrained = Union[bool, str, os.PathLike, None]


def register(fn: Callable[[], dict]) -> Callable[[], dict]:
    """Register a variant under its function's name."""
    _ARCHS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> List[str]:
    """Registered model names matching a shell-style ``pattern`` (``"plain*"``), in registration order."""
    return [n for n in _ARCHS if fnmatch.fnmatch(n, pattern)]


def get_arch(name: str) -> dict:
    """The architecture dict of ``name`` (``block``, ``layers``, ``residual``, ``weights``...)."""
    if name not in _ARCHS:
        close = [n for n in _ARCHS if n.rstrip("0123456789") == name.rstrip("0123456789")]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; known: {', '.join(_ARCHS)}")
    arch = dict(_ARCHS[name]())
    arch.setdefault("residual", True)
    arch.setdefault("weights", name)  # which catalogue entries apply
    return arch


# ---------------------------------------------------------------------- variants (paper, Table 1)
@register
def resnet18():
    return dict(block=BasicBlock, layers=(2, 2, 2, 2))


@register
def resnet34():
    return dict(block=BasicBlock, layers=(3, 4, 6, 3))


@register
def resnet50():
    return dict(block=Bottleneck, layers=(3, 4, 6, 3))


@register
def resnet101():
    return dict(block=Bottleneck, layers=(3, 4, 23, 3))


@register
def resnet152():
    return dict(block=Bottleneck, layers=(3, 8, 36, 3))


# The plain twins: the same stacks without shortcuts (paper, section 4.1; no ImageNet weights).
@register
def plain18():
    return dict(resnet18(), residual=False, weights=None)


@register
def plain34():
    return dict(resnet34(), residual=False, weights=None)


@register
def plain50():
    return dict(resnet50(), residual=False, weights=None)


@register
def plain101():
    return dict(resnet101(), residual=False, weights=None)


@register
def plain152():
    return dict(resnet152(), residual=False, weights=None)


# The CIFAR nets of section 4.2: depth 6n+2, a 3x3 stem, three stages of n basic blocks with
# 16/32/64 filters, option-A (zero-padding) shortcuts; Table 6 gives 0.27M..1.7M parameters.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _cifar(n: int, residual: bool = True) -> dict:
    return dict(
        block=BasicBlock, layers=(n, n, n), residual=residual, weights=None, stem_type="cifar",
        shortcut="A", default_cfg=dict(input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10),
    )


@register
def resnet20():
    return _cifar(3)


@register
def resnet32():
    return _cifar(5)


@register
def resnet44():
    return _cifar(7)


@register
def resnet56():
    return _cifar(9)


@register
def resnet110():
    return _cifar(18)


@register
def plain20():
    return _cifar(3, residual=False)


@register
def plain32():
    return _cifar(5, residual=False)


@register
def plain44():
    return _cifar(7, residual=False)


@register
def plain56():
    return _cifar(9, residual=False)


@register
def plain110():
    return _cifar(18, residual=False)


def warn_if_frozen_random(norm: str, norm_eval: bool, frozen_stages: int, pretrained) -> None:
    """Warn when BatchNorm statistics are frozen on randomly initialised weights (they stay 0/1)."""
    if pretrained:
        return
    reasons = []
    if norm == "frozen_bn":
        reasons.append("norm='frozen_bn'")
    if norm_eval:
        reasons.append("norm_eval=True")
    if frozen_stages:
        reasons.append(f"frozen_stages={frozen_stages}")
    if reasons:
        warnings.warn(
            f"{', '.join(reasons)} without pretrained weights: the frozen normalisation layers keep "
            "their initial statistics (mean 0, var 1) and frozen convs stay random; pass "
            "pretrained=True or a checkpoint path",
            UserWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------- builders
_ARCH_ONLY = ("block", "layers", "residual", "weights", "default_cfg")


def arch_kwargs(arch: dict, **overrides) -> dict:
    """The :class:`ResNet` keywords an architecture dict sets (``stem_type``, ``shortcut``...), under
    the caller's ``overrides``."""
    return {**{k: v for k, v in arch.items() if k not in _ARCH_ONLY}, **overrides}


def _load(model, name: str, arch: dict, pretrained: Pretrained) -> None:
    model.pretrained_cfg = {**DEFAULT_CFG, **arch.get("default_cfg", {})}
    if pretrained:
        model.pretrained_cfg = load_pretrained(model, arch["weights"] or name, pretrained)


def create_model(name: str, *, num_classes: int = 1000, pretrained: Pretrained = False, **kwargs) -> ResNet:
    """Build the classifier ``name`` (parameter names equal torchvision's).

    Args:
        name: one of :func:`list_models`.
        num_classes: classifier outputs (a pretrained classifier of another size is dropped).
        pretrained: ``False``, ``True`` (local torchvision/timm caches), a catalogue tag, or a file.
        **kwargs: :class:`~res_backbone.resnet.ResNet` options (``in_chans``, ``shortcut``,
            ``stride_in_1x1``, ``output_stride``, ``norm``, ``norm_eval``, ``frozen_stages``...).

    Returns:
        A :class:`ResNet` with ``pretrained_cfg`` (mean/std/input size of its weights).
    """
    arch = get_arch(name)
    model = ResNet(arch["block"], arch["layers"], num_classes=num_classes, residual=arch["residual"],
                   **arch_kwargs(arch, **kwargs))
    _load(model, name, arch, pretrained)
    warn_if_frozen_random(model.norm, model.norm_eval, model.frozen_stages, pretrained)
    model.model_name, model.model_kwargs = name, dict(kwargs, num_classes=num_classes)  # rebuild facts (weights/hub.py)
    return model


def create_backbone(
    name: str,
    *,
    pretrained: Pretrained = False,
    out_features: Optional[Sequence[str]] = None,
    frozen_stages: int = 0,
    norm: str = "bn",
    output_stride: int = 32,
    fpn: bool = False,
    fpn_channels: int = 256,
    fpn_p6: Optional[str] = "maxpool",
    **kwargs,
) -> ResNetBackbone:
    """Build a multi-stage feature extractor.

    Args:
        name: one of :func:`list_models`.
        pretrained: as for :func:`create_model`; the classifier is not loaded.
        out_features: levels to return, from ``stem``, ``res2``..``res5`` (the FPN's inputs when
            ``fpn=True``); default every stage (``res2``..``res5``, or ``res2``..``res4`` for CIFAR nets).
        frozen_stages: 0 = none, 1 = stem, 2 = stem + res2, ..., 5 = everything.
        norm: ``"bn"``, ``"frozen_bn"``, ``"sync_bn"`` or ``"gn"``.
        output_stride: 32, 16 or 8 (dilated res5/res4, bottleneck models only).
        fpn: put an :class:`~res_backbone.fpn.FPN` on top; ``forward`` then returns ``p2``..``p6``.
        fpn_channels: FPN width. fpn_p6: ``"maxpool"``, ``"conv"`` or ``None``.
        **kwargs: other :class:`~res_backbone.resnet.ResNet` options (``norm_eval``, ``in_chans``...).

    Returns:
        A :class:`ResNetBackbone`: ``forward(x) -> OrderedDict[str, Tensor]``, ``feature_info``,
        ``output_shape()``, ``out_channels`` when all levels share a width, ``pretrained_cfg``.
    """
    arch = get_arch(name)
    model = ResNetBackbone(
        arch["block"], arch["layers"], out_features=out_features, residual=arch["residual"],
        **arch_kwargs(arch, norm=norm, output_stride=output_stride, frozen_stages=frozen_stages, **kwargs),
    )
    if fpn:
        model.attach_fpn(FPN(model.output_shape(), out_channels=fpn_channels, p6=fpn_p6))
    _load(model, name, arch, pretrained)
    warn_if_frozen_random(norm, model.norm_eval, frozen_stages, pretrained)
    model.model_name, model.model_kwargs = name, dict(kwargs, norm=norm, output_stride=output_stride)
    return model
