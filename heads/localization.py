"""Single-object localization: a class and a box per image, over a backbone's last feature map.

    model = build_localizer("resnet18", num_classes=10, mode="scr")      # or "pcr"
    out = model(images)                    # {"logits": (N, K), "boxes": (N, 4) or (N, K, 4)}
    losses = localization_loss(out, labels, boxes)                      # cls + L1 + GIoU terms
    pred = model.predict(images, k=5)      # top-5 classes, scores and the box of each

Box format everywhere: ``xyxy`` normalised by the input's width and height (0..1 covers the image).
The box branch predicts ``(cx, cy, w, h)`` through a sigmoid and returns the corners, so a box is
never inverted; corners may leave [0, 1] by up to half a box during training, ``predict`` clamps them.

Two modes, after the ResNet paper's ImageNet localization (section A of its appendix) and OverFeat:

* ``"scr"`` - single-class regression: one class-agnostic box per image;
* ``"pcr"`` - per-class regression: one box per class; the loss trains the ground-truth class's box
  and ``predict`` returns, with each predicted class, that class's box.

A second, R-CNN-style pass (``crop_size > 0``; the ResNet paper's ILSVRC localization entry classified
its box proposals with a second network run on the cropped regions): the image region inside the box
(enlarged by ``crop_context`` per side, resized to ``crop_size`` squared with RoIAlign) goes through the
backbone's convolutions again (with normalisation layers of its own) and a second classifier scores it. The crop shows the object at one scale and with
little background - what a classifier pre-trained on centred objects knows - so the class comes from
where the object is, not from the whole canvas. Training crops come from jittered ground-truth boxes,
test crops from the predicted box; the reported class probabilities are the mean of both classifiers'.

"On top of a classifier": :func:`build_localizer` with ``cls_checkpoint=`` (a ``tools/train_cls.py``
checkpoint) takes the backbone and the classifier from it, frozen (no gradients, BatchNorm
statistics fixed); only the box branch trains.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from res_backbone import create_backbone
from res_backbone.weights.files import CheckpointMismatchError, read_checkpoint

from .classification import ClassificationHead, Features, NumClassesMismatchError

__all__ = ["LocalizationHead", "LocalizationModel", "build_localizer", "load_localizer", "localization_loss"]

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


def tied_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are the original's (the same tensors, trained together),
    except those of normalisation layers (BatchNorm and its frozen and group variants), which are copied:
    one set of weights, two sets of normalisation statistics."""
    import copy

    twin = copy.deepcopy(module)
    for (_, m), (_, t) in zip(module.named_modules(), twin.named_modules()):
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or "Norm" in type(m).__name__:
            continue
        for name, param in list(m.named_parameters(recurse=False)):
            setattr(t, name, param)
    return twin


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
        if not self.crop_jitter:
            return boxes
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-6)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + (torch.rand_like(wh) * 2 - 1) * self.crop_jitter * wh
        wh = wh * (1 + (torch.rand_like(wh) * 2 - 1) * self.crop_jitter)
        return torch.cat((centre - wh / 2, centre + wh / 2), -1)

    def crop(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The regions of ``boxes`` ((N, 4) normalised xyxy, one per image), enlarged by
        ``crop_context`` per side, resampled to ``crop_size`` x ``crop_size`` (RoIAlign, bilinear)."""
        from torchvision.ops import roi_align

        h, w = x.shape[-2:]
        scale = boxes.new_tensor([w, h, w, h])
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1.0 / max(h, w))
        b = torch.cat((boxes[:, :2] - self.crop_context * wh, boxes[:, 2:] + self.crop_context * wh), -1) * scale
        rois = torch.cat((torch.arange(len(b), device=b.device, dtype=b.dtype)[:, None], b), 1)
        crops = roi_align(x.float(), rois, self.crop_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        crops = crops.to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            crops = crops.contiguous(memory_format=torch.channels_last)  # keep the caller's memory format
        return crops

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


def localization_loss(
    outputs: Dict[str, torch.Tensor], labels: torch.Tensor, boxes: torch.Tensor, *, cls_weight: float = 1.0,
    l1_weight: float = 5.0, giou_weight: float = 2.0, label_smoothing: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """Cross-entropy + L1 + generalized IoU (Rezatofighi et al., 2019), DETR's weights by default.

    Args:
        outputs: the model's ``{"logits": (N, K), "boxes": (N, 4) | (N, K, 4)}``.
        labels: (N,) target classes 0..K-1; for pcr they pick the box that is trained.
        boxes: (N, 4) target boxes, normalised xyxy.
        cls_weight, l1_weight, giou_weight: the terms' weights (the L1 is the mean over the 4
            coordinates, the GIoU loss the mean over images).
        label_smoothing: of both cross-entropies (0: none).

    Returns:
        ``{"loss_cls", "loss_l1", "loss_giou"}`` (and ``"loss_crop_cls"``, the crop classifier's
        cross-entropy with ``cls_weight``, when the outputs have ``"crop_logits"``), already weighted (their sum
        is the training loss).
    """
    logits, pred = outputs["logits"], outputs["boxes"].float()
    labels = labels.long()
    if pred.dim() == 3:
        pred = pred[torch.arange(len(labels), device=pred.device), labels]
    if pred.shape != boxes.shape:
        raise ValueError(f"predicted boxes {tuple(pred.shape)} and targets {tuple(boxes.shape)} differ; "
                         "targets must be (N, 4) normalised xyxy")
    boxes = boxes.to(pred.dtype)
    losses = {
        "loss_cls": cls_weight * F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing),
        "loss_l1": l1_weight * F.l1_loss(pred, boxes),
        "loss_giou": giou_weight * generalized_box_iou_loss(pred, boxes, reduction="mean"),
    }
    if "crop_logits" in outputs:
        losses["loss_crop_cls"] = cls_weight * F.cross_entropy(outputs["crop_logits"].float(), labels,
                                                               label_smoothing=label_smoothing)
    return losses


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
