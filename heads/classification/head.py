"""The classification head (global pooling, dropout, linear; or per-position scores) and the
backbone + head :class:`Classifier`."""
from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

Features = Union[torch.Tensor, Mapping[str, torch.Tensor]]


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
