"""res_backbone: ImageNet ResNets with clean multi-stage features, FPN and offline pretrained weights.

>>> import res_backbone as rb
>>> backbone = rb.create_backbone("resnet50", pretrained=False, fpn=True)
>>> backbone.output_shape()["p2"]
ShapeSpec(channels=256, stride=4)
"""
from .blocks import BasicBlock, Bottleneck
from .features import ShapeSpec
from .fpn import FPN
from .inference import fold_batchnorm, prepare_for_inference
from .layers import FrozenBatchNorm2d
from .registry import create_backbone, create_model, get_arch, list_models
from .resnet import ResNet, ResNetBackbone
from .version import __version__
from .weights.cache import PretrainedNotFoundError
from .weights.files import CheckpointMismatchError, save_safetensors
from .weights.load import load_safetensors

try:  # register rb_* models with timm (timm is a dependency, but keep the core importable without it)
    from . import timm_compat  # noqa: F401
except ImportError as _e:  # pragma: no cover
    if "timm" not in str(_e):
        raise

__all__ = [
    "BasicBlock", "Bottleneck", "CheckpointMismatchError", "FPN", "FrozenBatchNorm2d",
    "PretrainedNotFoundError", "ResNet", "ResNetBackbone", "ShapeSpec", "create_backbone",
    "create_model", "fold_batchnorm", "get_arch", "list_models", "load_safetensors", "prepare_for_inference",
    "save_safetensors", "__version__",
]
