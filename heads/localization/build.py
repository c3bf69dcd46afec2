"""Build a localizer, on its own or "on top of a classifier", and rebuild one from a ``tools/train_loc.py`` checkpoint.

:func:`build_localizer` with ``cls_checkpoint=`` (a ``tools/train_cls.py`` checkpoint) takes the backbone and
the classifier from it, frozen (no gradients, BatchNorm statistics fixed); only the box branch trains.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from res_backbone import create_backbone
from res_backbone.weights.files import CheckpointMismatchError, read_checkpoint

from ..classification import NumClassesMismatchError
from .model import LocalizationHead, LocalizationModel


_CLASSIFIER_ONLY_KWARGS = ("num_classes", "in_chans", "drop_rate", "global_pool")


def build_localizer(
    backbone_name: Optional[str], num_classes: int, mode: str = "scr", pretrained: Union[bool, str, os.PathLike, None] = None,
    *, cls_checkpoint: Union[str, os.PathLike, None] = None, in_chans: int = 3, grid: Optional[int] = None,
    input_size: Optional[int] = None, box_channels: int = 128, hidden: int = 256, drop_rate: float = 0.0,
    crop_size: int = 0, crop_context: float = 0.08, crop_jitter: float = 0.1, box_scale: float = 1.0,
    first_cls_weight: float = 0.5, **backbone_kwargs,
) -> LocalizationModel:
    """Build a :class:`LocalizationModel`.

    Args:
        backbone_name: a registered model (``resnet18``, ``resnet20``...); with ``cls_checkpoint``
            it may be None (the checkpoint's architecture is used) and must otherwise match it.
        num_classes: K.
        mode: ``"scr"`` or ``"pcr"``.
        pretrained: backbone weights (``create_backbone``'s argument: a tag, True, or a file such as
            an ImageNet checkpoint or a ``train_cls.py`` checkpoint; grey-level checkpoints are
            adapted to ``in_chans`` by :func:`~res_backbone.pretrained.load_into`). A file whose
            classifier has ``num_classes`` outputs also initialises the classification branch(es).
        cls_checkpoint: a ``train_cls.py`` checkpoint: its backbone and classifier are loaded and
            frozen, only the box branch trains (its classifier must have ``num_classes`` outputs).
        in_chans: input channels (3: the data pipelines give RGB).
        grid: see :class:`LocalizationHead`; None: the side of the last feature map at ``input_size``
            (``ceil(input_size / stride)``, at most 4), or 3 without ``input_size``.
        input_size: the side of the (square) training images, for the automatic ``grid``.
        box_channels, hidden, drop_rate: see :class:`LocalizationHead`.
        crop_size, crop_context, crop_jitter, box_scale, first_cls_weight: the crop pass (see :class:`LocalizationModel`; 0: none);
            its classifier starts as a copy of the classification branch (the pretrained one when
            the weights carry a classifier).
        **backbone_kwargs: other ``create_backbone`` options (``norm``, ``frozen_stages``...).

    Raises:
        NumClassesMismatchError: the classifier of ``cls_checkpoint`` has another number of classes.
        CheckpointMismatchError: ``cls_checkpoint`` is not a classification checkpoint.
    """
    fc = None
    if cls_checkpoint is not None:
        if pretrained:
            raise ValueError("give either pretrained= (backbone weights, joint training) or cls_checkpoint= "
                             "(a frozen classifier), not both")
        sd, meta = read_checkpoint(cls_checkpoint)
        name = meta.get("model_name") or meta.get("arch")
        if not name:
            raise CheckpointMismatchError(f"{cls_checkpoint}: no 'model_name' entry; expected a tools/train_cls.py "
                                          "checkpoint")
        if backbone_name and backbone_name != name:
            raise ValueError(f"--backbone {backbone_name} but {cls_checkpoint} holds a {name}; leave --backbone out "
                             "or make them agree")
        if "fc.weight" not in sd:
            raise CheckpointMismatchError(f"{cls_checkpoint}: no classifier (fc.weight) to build on")
        if sd["fc.weight"].shape[0] != num_classes:
            raise NumClassesMismatchError(
                f"{cls_checkpoint}: its classifier has {sd['fc.weight'].shape[0]} classes but the localization data "
                f"has {num_classes}")
        backbone_name, pretrained, fc = name, cls_checkpoint, (sd["fc.weight"], sd["fc.bias"])
        saved = {k: v for k, v in dict(meta.get("model_kwargs") or {}).items() if k not in _CLASSIFIER_ONLY_KWARGS}
        backbone_kwargs = {**saved, **backbone_kwargs}
    if not backbone_name:
        raise ValueError("build_localizer needs a backbone name (or a cls_checkpoint naming one)")
    backbone = create_backbone(backbone_name, pretrained=pretrained or False, in_chans=in_chans, **backbone_kwargs)
    if grid is None:
        stride = backbone.feature_info[-1]["reduction"]
        grid = min(4, max(1, math.ceil(input_size * box_scale / stride))) if input_size else 3
    if crop_size and fc is not None:
        raise ValueError("the crop pass trains the backbone; it does not combine with cls_checkpoint= (a frozen "
                         "classifier): pass the checkpoint as pretrained= instead")
    head = LocalizationHead(backbone.feature_info[-1]["num_chs"], num_classes, mode, grid=grid,
                            box_channels=box_channels, hidden=hidden, drop_rate=drop_rate,
                            in_features=backbone.feature_info[-1]["name"], crop_classifier=crop_size > 0)
    model = LocalizationModel(backbone, head, crop_size=crop_size, crop_context=crop_context, crop_jitter=crop_jitter,
                              box_scale=box_scale, first_cls_weight=first_cls_weight)
    model.build_kwargs = dict(backbone_name=backbone_name, num_classes=num_classes, mode=mode, in_chans=in_chans,
                              grid=grid, box_channels=box_channels, hidden=hidden, drop_rate=drop_rate,
                              **({"crop_size": crop_size, "crop_context": crop_context, "crop_jitter": crop_jitter,
                                  "box_scale": box_scale, "first_cls_weight": first_cls_weight} if crop_size else {}),
                              **backbone_kwargs)
    frozen = fc is not None
    if fc is None and isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).is_file():
        fc = _matching_classifier(pretrained, num_classes, head.in_channels)
    if fc is not None:  # the weights' own classifier fits these classes: both branches start from it
        with torch.no_grad():
            for branch in (head.cls, head.crop_cls):
                if branch is not None:
                    branch.fc.weight.copy_(fc[0])
                    branch.fc.bias.copy_(fc[1])
    if frozen:
        model.freeze_classifier()
    return model


def _matching_classifier(path: Union[str, os.PathLike], num_classes: int, channels: int
                         ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(fc.weight, fc.bias)`` of a weights file when its classifier has ``num_classes`` outputs over
    ``channels`` features (a ``train_cls.py`` checkpoint of the same classes), else None."""
    sd, _ = read_checkpoint(path)
    w, b = sd.get("fc.weight"), sd.get("fc.bias")
    if w is None or b is None or tuple(w.shape) != (num_classes, channels):
        return None
    return w, b


def load_localizer(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu"
                   ) -> Tuple[LocalizationModel, dict]:
    """Rebuild a ``tools/train_loc.py`` checkpoint's model (eval mode) and return ``(model, checkpoint)``.

    Raises:
        FileNotFoundError, CheckpointMismatchError: unreadable files or weights that do not fit.
    """
    from res_backbone.engine.checkpoint import load_checkpoint

    ck = load_checkpoint(Path(path))
    kwargs = ck.get("localizer_kwargs")
    if not isinstance(kwargs, dict) or "backbone_name" not in kwargs:
        raise CheckpointMismatchError(f"{path}: no 'localizer_kwargs'; not a tools/train_loc.py checkpoint")
    model = build_localizer(**kwargs)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CheckpointMismatchError(f"{path}: weights do not fit the model they describe ({e})") from e
    model.backbone.pretrained_cfg = dict(ck.get("pretrained_cfg") or {})
    return model.to(map_location).eval(), ck
