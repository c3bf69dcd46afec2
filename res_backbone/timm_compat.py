"""Register this project's ResNets with timm as ``rb_resnet18`` .. ``rb_resnet152`` and ``rb_plain*``.

Importing :mod:`res_backbone` runs this module, after which::

    timm.create_model("rb_resnet101", pretrained=True, features_only=True, out_indices=(1, 2, 3, 4))

builds through ``timm.models.build_model_with_cfg`` (so ``features_only``, ``pretrained_cfg``,
``num_classes``/``in_chans`` adaptation and ``timm.data.resolve_data_config`` behave as for timm's own
models). Pretrained tags are the catalogue's (``tv_in1k``, ``tv2_in1k``, ``a1_in1k``); weights are
looked up in the local torchvision / Hugging Face caches only, so a missing file fails at once. A model
timm sources itself (``local-dir:FOLDER``, ``hf-hub:USER/REPO``, ``pretrained_cfg_overlay=dict(file=...)``)
loads what timm hands over; :mod:`res_backbone.weights.hub` writes such folders.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Dict, Optional

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._pretrained import PretrainedCfg
from timm.models._registry import get_pretrained_cfg

from .weights.cache import resolve
from .weights.catalogue import CATALOGUE
from .weights.files import strip_prefix
from .registry import arch_kwargs, get_arch, list_models
from .resnet import ResNet

PREFIX = "rb_"
_TV_URL = "https://download.pytorch.org/models/"


class TimmResNet(ResNet):
    """:class:`ResNet` with the constructor keywords timm's factory passes (``device``, ``dtype``)."""

    def __init__(self, block, layers, *, device=None, dtype=None, **kwargs):
        ctx = torch.device(device) if device is not None else contextlib.nullcontext()
        with ctx:
            super().__init__(block, layers, **kwargs)
        if dtype is not None:
            self.to(dtype=dtype)


def _cfg(**kwargs) -> dict:
    cfg = dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bilinear", first_conv="conv1", classifier="fc",
        license="bsd-3-clause", paper_ids="arXiv:1512.03385",
    )
    cfg.update(kwargs)
    return cfg


def _default_cfgs() -> Dict[str, dict]:
    cfgs: Dict[str, dict] = {}
    for name in list_models():
        entries = [e for e in CATALOGUE if e.arch == name]
        order = {"tv2_in1k": 0, "tv_in1k": 1, "a1_in1k": 2}
        for e in sorted(entries, key=lambda e: order.get(e.tag, 9)):
            src = dict(hf_hub_id=e.hf_repo) if e.source == "timm" else dict(url=_TV_URL + e.filename)
            extra = dict(test_input_size=e.test_input_size, test_crop_pct=1.0) if e.test_input_size else {}
            cfgs[f"{PREFIX}{name}.{e.tag}"] = _cfg(
                crop_pct=round(e.crop_pct, 4), interpolation=e.interpolation, mean=e.mean, std=e.std,
                origin_url="local cache only (res_backbone never downloads)", **src, **extra,
            )
        if not entries:
            small = get_arch(name).get("default_cfg", {})  # CIFAR nets: 32x32 inputs, 8x8 final map
            cfgs[f"{PREFIX}{name}"] = _cfg(**small, **({"pool_size": (8, 8)} if small else {}))
    return cfgs


default_cfgs = generate_default_cfgs(_default_cfgs())


def _filter_state_dict(state_dict: dict, model: torch.nn.Module) -> dict:
    """Strip wrapper prefixes (``module.``, ``backbone.``) and counters a frozen norm does not hold."""
    sd = strip_prefix(state_dict, "conv1.weight")
    own = model.state_dict()
    return {k: v for k, v in sd.items() if not (k.endswith("num_batches_tracked") and k not in own)}


def _tag_of(variant: str, pretrained_cfg) -> Optional[str]:
    if isinstance(pretrained_cfg, PretrainedCfg):
        return pretrained_cfg.tag
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get("tag")
    default = get_pretrained_cfg(variant)
    return default.tag if default is not None else None


def _timm_has_weights(pretrained_cfg, overlay: dict) -> bool:
    """Whether timm was handed the weights: a file or state dict, or a ``local-dir:`` / ``hf-hub:`` model
    (whose ``config.json`` came with them). Only otherwise do we look in the local caches ourselves."""
    cfg = pretrained_cfg.to_dict() if isinstance(pretrained_cfg, PretrainedCfg) else pretrained_cfg
    cfg = {**(cfg if isinstance(cfg, dict) else {}), **overlay}
    return bool(cfg.get("file") or cfg.get("state_dict")) or cfg.get("source") in ("local-dir", "hf-hub")


def _create(variant: str, pretrained: bool = False, **kwargs) -> TimmResNet:
    arch = get_arch(variant[len(PREFIX):])
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    if pretrained and not _timm_has_weights(pretrained_cfg, overlay):
        # Resolve from the local caches ourselves: no network call, an immediate, explicit error.
        tag = _tag_of(variant, pretrained_cfg)
        path, _ = resolve(arch["weights"] or variant[len(PREFIX):], tag or True)
        overlay["file"] = str(path)
    return build_model_with_cfg(
        partial(TimmResNet, arch["block"], arch["layers"], residual=arch["residual"], **arch_kwargs(arch)),
        variant,
        pretrained,
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=overlay or None,
        pretrained_filter_fn=_filter_state_dict,
        feature_cfg=dict(out_indices=tuple(range(len(arch["layers"]) + 1))),  # stem + each stage
        **kwargs,
    )


def _register(name: str) -> None:
    variant = PREFIX + name

    def entry(pretrained: bool = False, **kwargs) -> TimmResNet:
        return _create(variant, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = variant
    entry.__module__ = __name__
    entry.__doc__ = f"res_backbone's {name} ({'residual' if get_arch(name)['residual'] else 'plain, no shortcuts'})."
    globals()[variant] = entry
    register_model(entry)


for _name in list_models():
    _register(_name)
