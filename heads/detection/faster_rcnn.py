"""Faster R-CNN (Ren et al., 2015) on this project's ResNet backbones, FPN or C4 layout.

The model takes a batch that the data pipeline already resized, normalised and padded
(``docs/detection_interfaces.md``) and never resizes or normalises itself::

    model = build_detector("resnet50", num_classes=80, pretrained=True)
    losses = model(images, image_sizes, targets)      # train(): loss_objectness, loss_rpn_box, loss_cls, loss_box
    detections = model.eval()(images, image_sizes)    # [{"boxes", "scores", "labels"}] per image
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from res_backbone import create_backbone
from res_backbone.inference import prepare_for_inference

from .roi_heads import MultiLevelRoIAlign, Res5Head, RoIHeads, TwoFCHead
from .rpn import RegionProposalNetwork
from .size_cache import cached_for_size

Pretrained = Union[bool, str, os.PathLike]
LOSS_KEYS = ("loss_objectness", "loss_rpn_box", "loss_cls", "loss_box")


class FasterRCNN(nn.Module):
    """Backbone -> RPN -> RoI heads.

    Args:
        backbone: returns ``{name: (N, C, H/s, W/s)}`` and has ``output_shape()``.
        rpn: a :class:`~heads.detection.rpn.RegionProposalNetwork`.
        roi_heads: a :class:`~heads.detection.roi_heads.RoIHeads`.
    """

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads
        self.input_memory_format: Optional[torch.memory_format] = None  # set by finish_inference_copy
        self._sizes_cache: Dict[Tuple, torch.Tensor] = {}

    def inference_copy(self, autocast_dtype: Optional[torch.dtype] = None) -> "FasterRCNN":
        """:func:`res_backbone.prepare_for_inference` of this model (what the training and evaluation tools
        predict with; ``autocast_dtype`` when they predict under autocast).

        An eval-mode copy with BatchNorm folded into the convs, channels-last weights and input, and the
        FPN box head's ``fc1`` reading the pooled features in their channels-last order. Detections equal
        the unprepared model's in eval mode within float rounding. Run it under ``torch.inference_mode()``;
        the model itself is not modified. With ``autocast_dtype`` (``torch.bfloat16``/``torch.float16``)
        conv and linear weights are stored in that dtype: the copy then runs only under
        ``torch.autocast(dtype=autocast_dtype)``, with the same results and no per-call weight casts.
        """
        return prepare_for_inference(self, autocast_dtype=autocast_dtype)

    def finish_inference_copy(self, channels_last: bool = True) -> None:
        """The detector's part of :func:`res_backbone.prepare_for_inference`, run on the copy it makes
        (never on a model that trains: the box head's state dict changes)."""
        box_head = getattr(self.roi_heads, "box_head", None)
        if isinstance(box_head, TwoFCHead):
            box_head.use_hwc_input()  # the pooled features flatten as a view (RoIAlign output is channels-last)
        if channels_last:
            self.input_memory_format = torch.channels_last

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes

    def forward(
        self,
        images: torch.Tensor,
        image_sizes: Union[Sequence[Tuple[int, int]], torch.Tensor],
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
    ):
        """Args:
            images: ``(B, 3, H, W)`` resized, normalised, zero-padded bottom/right.
            image_sizes: ``(h, w)`` of each image before padding (a list, or a ``(B, 2)`` long tensor).
            targets: per image ``{"boxes": (G, 4) xyxy, "labels": (G,) in 1..K, ...}``; needed in
                train mode.

        Returns:
            train mode: ``{"loss_objectness", "loss_rpn_box", "loss_cls", "loss_box"}`` scalars.
            eval mode: per image ``{"boxes": (M, 4) xyxy clipped to image_sizes[i], "scores": (M,),
            "labels": (M,) in 1..K}``.
        """
        if images.dim() != 4 or len(image_sizes) != images.shape[0]:
            raise ValueError(f"expected images (B, 3, H, W) and B image_sizes, got {tuple(images.shape)} and {len(image_sizes)}")
        if self.training and targets is None:
            raise ValueError("train mode needs targets; call model.eval() for detections")
        if not self.training:
            targets = None
        if self.input_memory_format is not None:
            images = images.contiguous(memory_format=self.input_memory_format)
        sizes = self._sizes_tensor(image_sizes, images.device)
        features = self.backbone(images)
        proposals, rpn_losses = self.rpn(features, sizes, targets)
        out = self.roi_heads(features, proposals, sizes, targets)
        if targets is not None:
            return {**rpn_losses, **out}
        return out


    def _sizes_tensor(self, image_sizes: Sequence[Tuple[int, int]], device: torch.device) -> torch.Tensor:
        """``(B, 2)`` long ``(h, w)`` on ``device``, cached per distinct value (read-only downstream). A
        ``(B, 2)`` tensor is taken as it is (what an exported graph receives: its sizes are inputs)."""
        if isinstance(image_sizes, torch.Tensor):
            return image_sizes.to(device=device, dtype=torch.long)
        key = (tuple(tuple(int(v) for v in s) for s in image_sizes), str(device))
        return cached_for_size(self._sizes_cache, key,
                               lambda: torch.as_tensor(key[0], dtype=torch.long, device=device).reshape(-1, 2), limit=64)


def build_detector(
    backbone: str = "resnet50",
    num_classes: int = 80,
    arch: str = "fpn",
    pretrained: Pretrained = False,
    frozen_stages: Optional[int] = None,
    norm: Optional[str] = None,
    *,
    fpn_channels: int = 256,
    anchor_sizes: Optional[Sequence[Sequence[float]]] = None,
    aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),),
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.7,
    rpn_fg_iou_thresh: float = 0.7,
    rpn_bg_iou_thresh: float = 0.3,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    representation_size: int = 1024,
    pooler_resolution: Optional[int] = None,
    sampling_ratio: Optional[int] = None,
    aligned: bool = False,
    box_fg_iou_thresh: float = 0.5,
    box_bg_iou_thresh: float = 0.5,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    box_loss: str = "smooth_l1",
) -> FasterRCNN:
    """Build a Faster R-CNN on a registered ResNet.

    Keyword defaults equal torchvision's ``fasterrcnn_resnet50_fpn`` (shrink them for demos).

    Args:
        backbone: registered ResNet name (``resnet18``..``resnet152``).
        num_classes: ``K`` foreground classes; labels are ``1..K``, 0 is the background.
        arch: ``"fpn"`` (RPN on ``p2..p6``, 2-FC head on ``p2..p5``) or ``"c4"`` (RPN on ``res4``,
            ``res5`` as per-RoI head).
        pretrained: ``False``, ``True`` (local cache), a catalogue tag or a checkpoint path; loaded into
            the backbone and, for C4, into the ``res5`` head.
        frozen_stages: default 2 (stem + res2) with pretrained weights, else 0.
        norm: default ``"frozen_bn"`` with pretrained weights, else ``"bn"``.
        anchor_sizes: per RPN level; default ``(32,)..(512,)`` (FPN) or ``((32, 64, 128, 256, 512),)`` (C4).
        pooler_resolution / sampling_ratio: default 7 / 2 (FPN), 14 / 0 (C4).
        aligned: half-pixel RoIAlign (``False`` as torchvision).
        box_loss: ``"smooth_l1"`` or ``"giou"``, both stages.

    Returns:
        a :class:`FasterRCNN` (train mode).
    """
    if arch not in ("fpn", "c4"):
        raise ValueError(f"arch must be 'fpn' or 'c4', got {arch!r}")
    if norm is None:
        norm = "frozen_bn" if pretrained else "bn"
    if frozen_stages is None:
        frozen_stages = 2 if pretrained else 0
    rpn_kw = dict(
        aspect_ratios=aspect_ratios, pre_nms_top_n_train=rpn_pre_nms_top_n_train, pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        post_nms_top_n_train=rpn_post_nms_top_n_train, post_nms_top_n_test=rpn_post_nms_top_n_test,
        nms_thresh=rpn_nms_thresh, fg_iou_thresh=rpn_fg_iou_thresh, bg_iou_thresh=rpn_bg_iou_thresh,
        batch_size_per_image=rpn_batch_size_per_image, positive_fraction=rpn_positive_fraction, box_loss=box_loss,
    )
    roi_kw = dict(
        fg_iou_thresh=box_fg_iou_thresh, bg_iou_thresh=box_bg_iou_thresh, batch_size_per_image=box_batch_size_per_image,
        positive_fraction=box_positive_fraction, bbox_reg_weights=bbox_reg_weights, score_thresh=box_score_thresh,
        nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img, box_loss=box_loss,
    )
    if arch == "fpn":
        body = create_backbone(backbone, pretrained=pretrained, frozen_stages=frozen_stages, norm=norm,
                               fpn=True, fpn_channels=fpn_channels)
        shapes = body.output_shape()
        rpn = RegionProposalNetwork(shapes, anchor_sizes=anchor_sizes, **rpn_kw)
        pooled = {n: s for n, s in shapes.items() if s[1] <= 32}  # p2..p5; p6 only feeds the RPN
        res = pooler_resolution or 7
        pooler = MultiLevelRoIAlign(pooled, res, 2 if sampling_ratio is None else sampling_ratio, aligned)
        head = TwoFCHead(fpn_channels, res, representation_size)
    else:
        body = create_backbone(backbone, pretrained=pretrained, frozen_stages=min(frozen_stages, 4), norm=norm,
                               out_features=("res4",))
        shapes = body.output_shape()
        rpn = RegionProposalNetwork(shapes, anchor_sizes=anchor_sizes or ((32, 64, 128, 256, 512),), **rpn_kw)
        res = pooler_resolution or 14
        pooler = MultiLevelRoIAlign(shapes, res, 0 if sampling_ratio is None else sampling_ratio, aligned)
        # res5 from the same registered model, so the same checkpoint loads into it
        full = create_backbone(backbone, pretrained=pretrained, norm=norm, out_features=("res5",),
                               frozen_stages=5 if frozen_stages >= 5 else 0)
        head = Res5Head(full.layer4)
    return FasterRCNN(body, rpn, RoIHeads(pooler, head, num_classes, **roi_kw))
