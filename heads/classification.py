"""Image classification on res_backbone features: a pooling + linear head, and checkpoint loading.

    head = ClassificationHead.from_backbone(backbone, num_classes=10)   # reads feature_info[-1]
    model = Classifier(backbone, head)                                    # logits (N, K)
    model, meta = load_classifier("runs/cls/checkpoint_best.pt")        # a ResNet classifier, eval mode

With ``pool=""`` the head returns per-position scores ``(N, K, H, W)``: the linear layer applied
as a 1x1 convolution with the same weights (the fully-convolutional form the paper tests with,
section 3.4). Because the classifier is linear, the mean of those maps over positions equals the
logits of the average-pooled head.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from res_backbone import create_backbone, create_model
from res_backbone.weights.files import CheckpointMismatchError, read_checkpoint
from res_backbone.weights.load import load_into

Features = Union[torch.Tensor, Mapping[str, torch.Tensor]]


class NumClassesMismatchError(CheckpointMismatchError, ValueError):
    """The ``num_classes`` asked for differs from the size of a checkpoint's classifier."""


class ClassificationHead(nn.Module):
    """Global pooling, optional dropout and a linear classifier over one feature map.

    Args:
        in_channels: channels of the map the head reads (``feature_info[-1]["num_chs"]``).
        num_classes: classifier outputs ``K``.
        pool: ``"avg"`` (logits ``(N, K)``) or ``""`` (per-position scores ``(N, K, H, W)``).
        drop_rate: dropout before the classifier (active in training mode only).
        in_features: the level to read when ``forward`` receives a backbone's dict of levels;
            ``None`` takes the dict's last (coarsest) entry.
    """

    def __init__(self, in_channels: int, num_classes: int, *, pool: str = "avg", drop_rate: float = 0.0,
                 in_features: Optional[str] = None):
        super().__init__()
        if pool not in ("avg", ""):
            raise ValueError(f"pool must be 'avg' or '' (per-position scores), got {pool!r}")
        if in_channels <= 0 or num_classes <= 0:
            raise ValueError(f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.pool, self.drop_rate, self.in_features = pool, drop_rate, in_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_channels, num_classes)

    @classmethod
    def from_backbone(cls, backbone: nn.Module, num_classes: int, **kwargs) -> "ClassificationHead":
        """A head over the last level named in ``backbone.feature_info`` (channels read from it)."""
        last = backbone.feature_info[-1]
        kwargs.setdefault("in_features", last["name"])
        return cls(last["num_chs"], num_classes, **kwargs)

    def select(self, features: Features) -> torch.Tensor:
        """The feature map ``(N, C, H, W)`` this head reads from ``features`` (a map or a dict of levels)."""
        if isinstance(features, torch.Tensor):
            x = features
        else:
            if not features:
                raise ValueError("ClassificationHead got an empty dict of features")
            name = self.in_features or next(reversed(list(features)))
            if name not in features:
                raise KeyError(f"ClassificationHead reads level {name!r}, but the features hold {list(features)}")
            x = features[name]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ClassificationHead expects a map (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return x

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position logits ``(N, K, H, W)``: the linear layer as a 1x1 convolution (same weights)."""
        return F.conv2d(x, self.fc.weight[:, :, None, None], self.fc.bias)

    def forward(self, features: Features) -> torch.Tensor:
        """Logits ``(N, K)``, or ``(N, K, H, W)`` with ``pool=""``."""
        x = self.drop(self.select(features))
        if self.pool == "":
            return self.dense(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Classifier(nn.Module):
    """A feature backbone (``forward -> {level: map}``) followed by a :class:`ClassificationHead`.

    Exposes the parts of timm's classifier API the evaluation protocols use:
    ``forward_features(x)`` (the head's input map), ``get_classifier()`` (its ``nn.Linear``),
    ``feature_info``, ``num_classes`` and ``pretrained_cfg`` (the backbone's).
    """

    def __init__(self, backbone: nn.Module, head: ClassificationHead):
        super().__init__()
        info = {f["name"]: f for f in backbone.feature_info}
        if head.in_features is None:
            head.in_features = backbone.feature_info[-1]["name"]
        if head.in_features not in info:
            raise ValueError(f"head reads {head.in_features!r}, but the backbone returns {list(info)}")
        chs = info[head.in_features]["num_chs"]
        if chs != head.in_channels:
            raise ValueError(
                f"head expects {head.in_channels} channels but the backbone's {head.in_features!r} has {chs}"
            )
        self.backbone, self.head = backbone, head
        self.num_classes = head.num_classes
        self.feature_info = backbone.feature_info

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.backbone, "pretrained_cfg", {})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The map the head reads, ``(N, C, H/s, W/s)``."""
        return self.backbone(x)[self.head.in_features]

    def get_classifier(self) -> nn.Linear:
        return self.head.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(name: str, num_classes: int, *, pool: str = "avg", drop_rate: float = 0.0,
                     **backbone_kwargs) -> Classifier:
    """``create_backbone(name, **backbone_kwargs)`` + a head over its last level."""
    backbone = create_backbone(name, **backbone_kwargs)
    return Classifier(backbone, ClassificationHead.from_backbone(backbone, num_classes, pool=pool, drop_rate=drop_rate))


def _classifier_size(sd: Dict[str, torch.Tensor]) -> Optional[int]:
    w = sd.get("fc.weight")
    return int(w.shape[0]) if w is not None else None


def load_classifier(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu",
                    num_classes: Optional[int] = None) -> Tuple[nn.Module, dict]:
    """Rebuild and load a classification checkpoint (``{"model", "model_name", "model_kwargs", ...}``).

    The model is ``create_model(meta["model_name"], **meta["model_kwargs"])``; weights are read with
    ``weights_only=True``. ``model.pretrained_cfg`` comes from the checkpoint and the model is
    returned in eval mode on ``map_location``.

    Args:
        path: a checkpoint written by ``tools/train_cls.py`` (or any file of that layout).
        map_location: device for the returned model.
        num_classes: if given, must equal the checkpoint's classifier size (a check, not a resize).

    Returns:
        ``(model, meta)`` where ``meta`` holds the checkpoint's non-tensor entries (``classes``,
        ``pretrained_cfg``, ``config``, ``metrics``...).

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatchError: unreadable file, missing ``model_name``, or weights that do not fit.
        NumClassesMismatchError: ``num_classes`` differs from the checkpoint's classifier.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classification checkpoint {path} does not exist")
    sd, meta = read_checkpoint(path)
    name = meta.get("model_name") or meta.get("arch")
    if not name:
        raise CheckpointMismatchError(
            f"{path}: no 'model_name' entry, so the architecture is unknown; expected a classification "
            "checkpoint of tools/train_cls.py ({'model', 'model_name', 'model_kwargs', 'pretrained_cfg', ...})"
        )
    kwargs = dict(meta.get("model_kwargs") or {})
    saved = _classifier_size(sd)
    declared = kwargs.get("num_classes", saved)
    if saved is None:
        raise CheckpointMismatchError(f"{path}: holds no classifier (no 'fc.weight'); it is a backbone checkpoint")
    if declared != saved:
        raise CheckpointMismatchError(
            f"{path}: model_kwargs['num_classes']={declared} but its classifier fc.weight has {saved} rows"
        )
    if num_classes is not None and num_classes != saved:
        raise NumClassesMismatchError(
            f"{path}: its classifier has {saved} classes (fc.weight {tuple(sd['fc.weight'].shape)}), but "
            f"num_classes={num_classes} was asked for. Evaluating needs the trained classifier: pass "
            f"num_classes={saved} (or leave it unset). To train for {num_classes} classes, build "
            f"create_model({name!r}, num_classes={num_classes}, pretrained={str(path)!r}), which keeps the "
            "backbone and starts a new classifier."
        )
    kwargs["num_classes"] = saved
    model = create_model(name, **kwargs)
    load_into(model, sd, source=str(path))
    cfg = meta.get("pretrained_cfg")
    model.pretrained_cfg = dict(model.pretrained_cfg, **(dict(cfg) if isinstance(cfg, Mapping) else {}))
    model.pretrained_cfg["file"] = str(path)
    return model.to(map_location).eval(), meta
