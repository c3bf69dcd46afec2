"""Load torchvision Faster R-CNN weights into :class:`~heads.detection.faster_rcnn.FasterRCNN`.

Supported: ``torchvision.models.detection.fasterrcnn_resnet50_fpn`` (v1) and any torchvision
``FasterRCNN`` on ``resnet_fpn_backbone`` / ``BackboneWithFPN`` of a ResNet (e.g. ResNet-18),
with torchvision's default heads. Key mapping (``N`` = level, ``*`` = ``weight``/``bias``)::

    backbone.body.<name>                   -> backbone.<name>            (conv1, bn1, layer1..4: same names)
    backbone.fpn.inner_blocks.N[.0].*      -> backbone.fpn.lateral_convs.N.*
    backbone.fpn.layer_blocks.N[.0].*      -> backbone.fpn.output_convs.N.*
    rpn.head.conv[.0.0].*                  -> rpn.head.conv.*
    rpn.head.cls_logits.*                  -> rpn.head.objectness.*
    rpn.head.bbox_pred.*                   -> rpn.head.deltas.*
    roi_heads.box_head.fc6.* / fc7.*       -> roi_heads.box_head.fc1.* / fc2.*
    roi_heads.box_predictor.cls_score.*    -> roi_heads.predictor.cls_score.*
    roi_heads.box_predictor.bbox_pred.*    -> roi_heads.predictor.bbox_pred.*

torchvision's ``num_classes`` counts the background: its ``num_classes=K + 1`` is our
``build_detector(num_classes=K)``. Build ours with ``arch="fpn"``, the same depth and
``aligned=False`` (torchvision's RoIAlign). The v2 models (GroupNorm FPN, 4-conv box head) have a
different head layout and are refused with the keys that do not map.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Union

import torch
from torch import nn

from res_backbone.weights.files import read_checkpoint

_RULES = (
    (r"^backbone\.body\.(.+)$", r"backbone.\1"),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)(?:\.0)?\.(weight|bias)$", r"backbone.fpn.lateral_convs.\1.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)(?:\.0)?\.(weight|bias)$", r"backbone.fpn.output_convs.\1.\2"),
    (r"^rpn\.head\.conv(?:\.0\.0)?\.(weight|bias)$", r"rpn.head.conv.\1"),
    (r"^rpn\.head\.cls_logits\.(weight|bias)$", r"rpn.head.objectness.\1"),
    (r"^rpn\.head\.bbox_pred\.(weight|bias)$", r"rpn.head.deltas.\1"),
    (r"^roi_heads\.box_head\.fc6\.(weight|bias)$", r"roi_heads.box_head.fc1.\1"),
    (r"^roi_heads\.box_head\.fc7\.(weight|bias)$", r"roi_heads.box_head.fc2.\1"),
    (r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$", r"roi_heads.predictor.\1.\2"),
)
_COMPILED = [(re.compile(p), r) for p, r in _RULES]


def convert_torchvision_state_dict(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a torchvision ``FasterRCNN`` state dict to this project's names (table above).

    Args:
        sd: ``torchvision_model.state_dict()`` (a ``module.`` prefix from DDP is stripped).

    Returns:
        a new dict with our keys and the same tensors.

    Raises:
        ValueError: listing every key no rule maps (e.g. a v2 model's ``box_head.0.0.weight``).
    """
    out, unknown = {}, []
    for key, value in sd.items():
        k = key[len("module."):] if key.startswith("module.") else key
        for pattern, repl in _COMPILED:
            if pattern.match(k):
                out[pattern.sub(repl, k)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        more = f" ... (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise ValueError(
            f"{len(unknown)} torchvision keys have no mapping (only the v1 FPN Faster R-CNN layout is "
            f"supported): {', '.join(unknown[:10])}{more}"
        )
    return out


def load_torchvision_detector(model: nn.Module, path_or_sd: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> nn.Module:
    """Load torchvision Faster R-CNN weights (a file or a state dict) into ``model``, strictly.

    ``num_batches_tracked`` counters are dropped where ``model`` uses frozen BatchNorm and added
    (as 0) where it uses trainable BatchNorm but the checkpoint has frozen ones. Anything else that
    does not fit raises ``RuntimeError`` from ``load_state_dict(strict=True)``.

    Returns:
        ``model``.
    """
    if isinstance(path_or_sd, Mapping):
        sd = dict(path_or_sd)
    else:
        sd, _ = read_checkpoint(path_or_sd)
    ours = convert_torchvision_state_dict(sd)
    own = model.state_dict()
    for k in list(ours):
        if k.endswith("num_batches_tracked") and k not in own:
            del ours[k]
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in ours:
            ours[k] = torch.zeros_like(v)
    model.load_state_dict(ours, strict=True)
    return model
