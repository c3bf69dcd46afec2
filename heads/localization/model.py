"""The localizer: :class:`LocalizationHead` (a class branch and a box branch over one feature map) and
:class:`LocalizationModel` (backbone + head, with the optional crop pass of :mod:`.crop_pass`)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..classification import ClassificationHead, Features
from .crop_pass import crop_regions, jitter_boxes, tied_copy

MODES = ("scr", "pcr")


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` centre/size boxes -> corner boxes."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)



class LocalizationHead(nn.Module):
    """A classification branch and a box branch over one feature map.

    The classification branch is a :class:`~heads.classification.ClassificationHead` (average pool,
    dropout, linear). The box branch keeps the spatial layout, which average pooling would lose: a
    1x1 convolution to ``box_channels``, adaptive average pooling to a ``grid`` x ``grid`` map (any
    input size works), then two fully connected layers (OverFeat's regressor over the last map) to
    ``4`` numbers per box. The last layer starts at zero: every box starts as the centred half-size
    box ``(0.25, 0.25, 0.75, 0.75)``.

    Args:
        in_channels: channels of the map read (``backbone.feature_info[-1]["num_chs"]``).
        num_classes: K.
        mode: ``"scr"`` (one box) or ``"pcr"`` (one box per class).
        grid: side of the pooled map the box branch reads.
        box_channels, hidden: widths of the box branch.
        drop_rate: dropout before the classifier.
        in_features: the level to read from a dict of levels (default: its last one).
        crop_classifier: add ``crop_cls``, a second classification branch for the crop pass of
            :class:`LocalizationModel` (same layout as ``cls``).
    """

    def __init__(self, in_channels: int, num_classes: int, mode: str = "scr", *, grid: int = 3,
                 box_channels: int = 128, hidden: int = 256, drop_rate: float = 0.0,
                 in_features: Optional[str] = None, crop_classifier: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be 'scr' (class-agnostic box) or 'pcr' (a box per class), got {mode!r}")
        if grid < 1 or box_channels < 1 or hidden < 1:
            raise ValueError(f"grid, box_channels and hidden must be positive, got {grid}, {box_channels}, {hidden}")
        self.in_channels, self.num_classes, self.mode, self.grid = in_channels, num_classes, mode, grid
        self.cls = ClassificationHead(in_channels, num_classes, drop_rate=drop_rate, in_features=in_features)
        self.num_boxes = num_classes if mode == "pcr" else 1
        self.box_reduce = nn.Sequential(nn.Conv2d(in_channels, box_channels, 1, bias=False),
                                        nn.BatchNorm2d(box_channels), nn.ReLU(inplace=True))
        self.box_pool = nn.AdaptiveAvgPool2d(grid)
        self.box_fc = nn.Sequential(nn.Flatten(1), nn.Linear(box_channels * grid * grid, hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, 4 * self.num_boxes))
        nn.init.zeros_(self.box_fc[-1].weight)
        nn.init.zeros_(self.box_fc[-1].bias)
        self.crop_cls = (ClassificationHead(in_channels, num_classes, drop_rate=drop_rate, in_features=in_features)
                         if crop_classifier else None)

    @property
    def in_features(self) -> Optional[str]:
        return self.cls.in_features

    def box_parameters(self):
        """The parameters of the box branch (what trains on top of a frozen classifier)."""
        for m in (self.box_reduce, self.box_fc):
            yield from m.parameters()

    def forward(self, features: Features) -> Dict[str, torch.Tensor]:
        """``{"logits": (N, K), "boxes": (N, 4) for scr or (N, K, 4) for pcr}``, boxes normalised xyxy."""
        x = self.cls.select(features)
        logits = self.cls(x)
        raw = self.box_fc(self.box_pool(self.box_reduce(x)))
        boxes = cxcywh_to_xyxy(torch.sigmoid(raw.float()).view(x.shape[0], self.num_boxes, 4))
        return {"logits": logits, "boxes": boxes[:, 0] if self.mode == "scr" else boxes}


class LocalizationModel(nn.Module):
    """A backbone (``forward -> {level: map}`` with ``feature_info``) and a :class:`LocalizationHead`.

    Args:
        backbone, head: the two parts.
        crop_size: side of the crop pass's input (0: no crop pass); see the module docstring.
        crop_context: the box is enlarged by this fraction of its width/height on each side before cropping.
        crop_jitter: in training, crops come from the ground-truth box with its centre moved and its
            sides scaled by up to this fraction (what the predicted boxes' errors look like).
        box_scale: with the crop pass, the first pass (box and first classifier) reads the image
            downscaled by this factor (antialiased) while crops come from the full-resolution image:
            the box needs little resolution, the class needs the object's own pixels. 0.5 makes the
            first pass 4x cheaper.
        first_cls_weight: with the crop pass, the weight of the first classifier in the reported class
            probabilities, ``w * p_first + (1 - w) * p_crop`` (0.5: their mean; 0: the crop classifier alone).

    Attributes:
        frozen_classifier: True when the backbone and the classification branch are frozen (only the
            box branch trains); :meth:`train` then keeps them in eval mode.
    """

    def __init__(self, backbone: nn.Module, head: LocalizationHead, *, crop_size: int = 0,
                 crop_context: float = 0.08, crop_jitter: float = 0.1, box_scale: float = 1.0,
                 first_cls_weight: float = 0.5):
        super().__init__()
        if not 0 <= first_cls_weight <= 1:
            raise ValueError(f"first_cls_weight must be in [0, 1], got {first_cls_weight}")
        self.first_cls_weight = float(first_cls_weight)
        if not 0 < box_scale <= 1:
            raise ValueError(f"box_scale must be in (0, 1], got {box_scale}")
        if box_scale != 1 and not crop_size:
            raise ValueError("box_scale < 1 only makes sense with the crop pass (crop_size > 0), which reads the "
                             "full-resolution image")
        self.box_scale = float(box_scale)
        if crop_size and head.crop_cls is None:
            raise ValueError("crop_size > 0 needs a head built with crop_classifier=True")
        if crop_size < 0 or crop_context < 0 or crop_jitter < 0:
            raise ValueError(f"crop_size, crop_context and crop_jitter must be >= 0, got {crop_size}, "
                             f"{crop_context}, {crop_jitter}")
        self.crop_size, self.crop_context, self.crop_jitter = int(crop_size), float(crop_context), float(crop_jitter)
        # The crop pass shares every convolution with the backbone but keeps its own normalisation layers:
        # crops (one centred object) and canvases (mostly background) have different activation statistics,
        # and one set of BatchNorm statistics for both degrades the box branch.
        self.crop_backbone = tied_copy(backbone) if crop_size else None
        info = {f["name"]: f for f in backbone.feature_info}
        if head.cls.in_features is None:
            head.cls.in_features = backbone.feature_info[-1]["name"]
        if head.in_features not in info:
            raise ValueError(f"the head reads {head.in_features!r}, but the backbone returns {list(info)}")
        if info[head.in_features]["num_chs"] != head.in_channels:
            raise ValueError(f"the head expects {head.in_channels} channels but the backbone's {head.in_features!r} "
                             f"has {info[head.in_features]['num_chs']}")
        self.backbone, self.head = backbone, head
        self.num_classes, self.mode = head.num_classes, head.mode
        self.feature_info = backbone.feature_info
        self.frozen_classifier = False

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.backbone, "pretrained_cfg", {})

    def freeze_classifier(self) -> "LocalizationModel":
        """Freeze the backbone and the classification branch; only the box branch keeps training."""
        for p in list(self.backbone.parameters()) + list(self.head.cls.parameters()):
            p.requires_grad_(False)
        self.frozen_classifier = True
        return self.train(self.training)

    def train(self, mode: bool = True) -> "LocalizationModel":
        super().train(mode)
        if self.frozen_classifier:  # fixed BatchNorm statistics and no dropout in the frozen part
            self.backbone.eval()
            self.head.cls.eval()
        return self

    def forward(self, x: torch.Tensor, gt_boxes: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Images ``(N, C, H, W)`` -> ``{"logits": (N, K), "boxes": (N, 4) | (N, K, 4)}`` (normalised xyxy).

        With the crop pass, also ``"crop_logits"`` (N, K): the crop classifier's scores for the region of
        ``gt_boxes`` ((N, 4) normalised xyxy, jittered; training only) or of the predicted box (the
        box of the top-1 class for pcr).
        """
        first = x
        if self.box_scale != 1:
            size = [max(1, round(d * self.box_scale)) for d in x.shape[-2:]]
            first = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True).to(x.dtype)
        out = self.head(self.backbone(first))
        if self.crop_size:
            if gt_boxes is not None and self.training:
                boxes = self._jitter(gt_boxes.to(x.device).float())
            else:
                boxes = out["boxes"].detach().float()
                if boxes.dim() == 3:
                    boxes = boxes[torch.arange(len(boxes), device=boxes.device), out["logits"].argmax(-1)]
            crops = self.crop(x, boxes)
            out["crop_logits"] = self.head.crop_cls(self.head.cls.select(self.crop_backbone(crops)))
        return out

    def _jitter(self, boxes: torch.Tensor) -> torch.Tensor:
        return jitter_boxes(boxes, self.crop_jitter)

    def crop(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The regions of ``boxes`` ((N, 4) normalised xyxy, one per image), enlarged by
        ``crop_context`` per side, resampled to ``crop_size`` x ``crop_size`` (RoIAlign, bilinear)."""
        return crop_regions(x, boxes, self.crop_size, self.crop_context)

    def class_log_probs(self, out: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The reported class scores (log-probabilities): the classifier's, or with the crop pass the
        two classifiers' probabilities mixed with ``first_cls_weight`` (default: their mean)."""
        probs = out["logits"].float().softmax(-1)
        if "crop_logits" in out:
            w = self.first_cls_weight
            probs = w * probs + (1 - w) * out["crop_logits"].float().softmax(-1)
        return probs.clamp_min(1e-12).log()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, k: int = 5, flip: bool = False) -> Dict[str, torch.Tensor]:
        """Top-``k`` classes with their boxes (``k`` is capped at K).

        Args:
            x: images ``(N, C, H, W)``.
            k: how many classes.
            flip: test-time augmentation: also run the horizontally mirrored images and average the
                class probabilities and the (mirrored back) boxes.

        Returns:
            ``classes`` (N, k) best first, ``scores`` (N, k) softmax probabilities, ``boxes``
            (N, k, 4) the box of each of those classes (the one box for scr), ``class_boxes``
            (N, K, 4) the box for every class; boxes normalised xyxy clamped to [0, 1].
        """
        out = self(x)
        out = {"logits": self.class_log_probs(out), "boxes": out["boxes"]}
        if flip:
            mirrored = self(x.flip(-1))
            b = mirrored["boxes"].float()
            b = torch.stack((1.0 - b[..., 2], b[..., 1], 1.0 - b[..., 0], b[..., 3]), -1)
            probs = (out["logits"].exp() + self.class_log_probs(mirrored).exp()) / 2
            out = {"logits": probs.clamp_min(1e-12).log(), "boxes": (out["boxes"].float() + b) / 2}
        return topk_predictions(out, k)


def topk_predictions(outputs: Dict[str, torch.Tensor], k: int = 5) -> Dict[str, torch.Tensor]:
    """:meth:`LocalizationModel.predict` from raw outputs ``{"logits", "boxes"}``."""
    logits, boxes = outputs["logits"].float(), outputs["boxes"].float().clamp(0.0, 1.0)
    n, num_classes = logits.shape
    scores, classes = logits.softmax(-1).topk(min(k, num_classes), dim=-1)
    class_boxes = boxes if boxes.dim() == 3 else boxes[:, None].expand(n, num_classes, 4)
    picked = class_boxes.gather(1, classes[..., None].expand(-1, -1, 4))
    return {"classes": classes, "scores": scores, "boxes": picked, "class_boxes": class_boxes}
