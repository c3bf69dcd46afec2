"""Second stage of Faster R-CNN: RoI pooling, a per-RoI box head, class and box predictors.

Two layouts (``build_detector(arch=...)``):

* ``fpn`` (Lin et al., 2017, section 4.2): RoIAlign 7x7 on ``p2..p5``, each RoI on level
  ``k = floor(4 + log2(sqrt(wh) / 224))`` clamped to the pyramid (eq. 1), then two 1024-d FC layers.
* ``c4`` (He et al., 2015, appendix A "Object Detection Baselines"): RoIAlign 14x14 on ``res4``,
  the whole ``res5`` stage as per-RoI head (first block stride 2 -> 7x7), global average pooling.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, roi_align

from . import roi_align as bag_ops
from .box_coder import BoxCoder
from .losses import fast_rcnn_loss
from .matcher import Matcher
from .postprocess import postprocess_detections
from .sampler import BalancedSampler


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign over one or several levels, each RoI on its canonical level.

    Args:
        in_shapes: ``{name: (channels, stride)}`` of the pooled levels, fine to coarse.
        output_size: pooled side (7 for FPN, 14 for C4).
        sampling_ratio: bilinear samples per bin side (2 as torchvision; 0 = adaptive).
        aligned: half-pixel-corrected RoIAlign (detectron2's default); ``False`` is torchvision's.
        canonical_size / canonical_level: a ``canonical_size``-pixel RoI goes to that level (224, 4).
        impl: ``"bag"`` pools all levels in one fused gather-sum
            (:func:`heads.detection.roi_align.roi_align_bag`, several times faster than torchvision's
            kernel on the CPU, forward and backward), ``"torchvision"`` calls
            ``torchvision.ops.roi_align`` per level; ``"auto"`` (default) takes the bag on the CPU
            and torchvision's kernel elsewhere. Both give the same numbers (to float rounding).
    """

    def __init__(
        self,
        in_shapes: Mapping[str, Tuple[int, int]],
        output_size: int = 7,
        sampling_ratio: int = 2,
        aligned: bool = False,
        canonical_size: float = 224.0,
        canonical_level: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        self.impl = bag_ops.check_impl(impl)
        self.in_features = list(in_shapes)
        self.scales = [1.0 / s for _, s in in_shapes.values()]
        levels = [int(round(math.log2(s))) for _, s in in_shapes.values()]
        if levels != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError(f"pooled levels must have consecutive power-of-two strides, got {dict(in_shapes)}")
        self.k_min, self.k_max = levels[0], levels[-1]
        self.output_size, self.sampling_ratio, self.aligned = output_size, sampling_ratio, aligned
        self.canonical_size, self.canonical_level = canonical_size, canonical_level

    def level_of(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(R,)`` index into ``in_features`` of each xyxy box (FPN eq. 1, torchvision's rounding)."""
        if boxes.dtype in (torch.float16, torch.bfloat16):
            boxes = boxes.float()  # as torchvision's box_area: a bf16 area would move RoIs across levels
        wh = boxes[:, 2:] - boxes[:, :2]
        s = torch.sqrt(wh[:, 0] * wh[:, 1])
        k = torch.floor(self.canonical_level + torch.log2(s / self.canonical_size) + torch.tensor(1e-6, dtype=s.dtype))
        return (k.clamp(self.k_min, self.k_max) - self.k_min).to(torch.long)

    def forward(self, features: Mapping[str, torch.Tensor], boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Args:
            features: ``{name: (N, C, H, W)}``; boxes ``(R, 4)`` xyxy input pixels; image_index ``(R,)``.

        Returns:
            ``(R, C, output_size, output_size)``.
        """
        feats = [features[n] for n in self.in_features]
        rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], dim=1)
        size = (self.output_size, self.output_size)
        if torch.compiler.is_exporting():
            return self._pool_exportable(feats, rois, size)
        if bag_ops.use_bag(self.impl, feats[0].device, rois, size, self.scales[0], self.sampling_ratio):
            return self._pool_bags(feats, rois, size)
        if len(feats) == 1:
            return roi_align(feats[0], rois, size, self.scales[0], self.sampling_ratio, self.aligned)
        # RoIs sorted by level so that each level pools a contiguous slice: one host sync for all
        # levels' counts, one gather in and one scatter out (fewer launches than a mask per level)
        levels, order = self.level_of(boxes).sort(stable=True)
        bounds = torch.searchsorted(levels, torch.arange(len(feats) + 1, device=levels.device)).tolist()
        rois = rois[order]
        parts = [roi_align(f, rois[a:b], size, scale, self.sampling_ratio, self.aligned)
                 for f, scale, a, b in zip(feats, self.scales, bounds[:-1], bounds[1:]) if b > a]
        if not parts:
            return rois.new_zeros((0, feats[0].shape[1]) + size)
        pooled = parts[0] if len(parts) == 1 else torch.cat([p.to(parts[0].dtype) for p in parts])
        return pooled.new_empty(pooled.shape).index_copy_(0, order, pooled)

    def _pool_exportable(self, feats: List[torch.Tensor], rois: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """torchvision's RoIAlign per level, written without a branch on how many RoIs a level gets (what
        ``torch.export`` needs; the same values as the other paths)."""
        if len(feats) == 1:
            return roi_align(feats[0], rois, size, self.scales[0], self.sampling_ratio, self.aligned)
        levels = self.level_of(rois[:, 1:])
        out = rois.new_zeros((rois.shape[0], feats[0].shape[1]) + size)
        for lvl, (f, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.nonzero(levels == lvl).squeeze(1)
            pooled = roi_align(f, rois[idx], size, scale, self.sampling_ratio, self.aligned)
            out = out.index_put((idx,), pooled.to(out.dtype))
        return out

    def _pool_bags(self, feats: List[torch.Tensor], rois: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        r, bins = rois.shape[0], size[0] * size[1]
        if r == 0:
            return feats[0].new_zeros((0, feats[0].shape[1]) + size)
        with torch.no_grad():
            levels = self.level_of(rois[:, 1:]) if len(feats) > 1 else None
            parts, offset = [], 0
            for lvl, (f, scale) in enumerate(zip(feats, self.scales)):
                sel = None if levels is None else torch.nonzero(levels == lvl).squeeze(1)
                if sel is None or sel.numel():
                    part = rois if sel is None else rois[sel]
                    idx, wgt = bag_ops.bag_indices(part, f.shape[-2:], size, scale, self.sampling_ratio, self.aligned, offset)
                    parts.append((sel, idx, wgt))
                offset += f.shape[0] * f.shape[2] * f.shape[3]
            if len(parts) == 1 and parts[0][0] is None:
                idx, wgt = parts[0][1], parts[0][2]
            else:
                bag = max(p[1].shape[1] for p in parts)
                idx = torch.zeros((r * bins, bag), dtype=torch.long, device=rois.device)
                wgt = torch.zeros((r * bins, bag), dtype=parts[0][2].dtype, device=rois.device)
                ar = torch.arange(bins, device=rois.device)
                for sel, i, w in parts:
                    rows = (sel[:, None] * bins + ar).reshape(-1)
                    idx[rows, : i.shape[1]] = i
                    wgt[rows, : w.shape[1]] = w
        tables = [bag_ops.channels_last_table(f) for f in feats]
        table = tables[0] if len(tables) == 1 else torch.cat(tables)
        return bag_ops.pool_bags(table, idx, wgt, r, size)


class TwoFCHead(nn.Module):
    """Flatten, ``fc1`` + ReLU, ``fc2`` + ReLU (FPN's "2fc" box head).

    ``fc1`` reads the pooled ``(C, S, S)`` features in torchvision's ``C, y, x`` order, which costs a
    transposing copy of the channels-last RoIAlign output. :meth:`use_hwc_input` (called by
    :func:`res_backbone.prepare_for_inference` of a detector) permutes ``fc1``'s columns once to
    ``y, x, C`` so the pooled features flatten as a view.
    """

    def __init__(self, in_channels: int, resolution: int, representation_size: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * resolution * resolution, representation_size)
        self.fc2 = nn.Linear(representation_size, representation_size)
        self.out_channels = representation_size
        self.in_channels, self.resolution = in_channels, resolution
        self.hwc_input = False

    @torch.no_grad()
    def use_hwc_input(self) -> "TwoFCHead":
        """Reorder ``fc1``'s input columns from ``C, y, x`` to ``y, x, C`` (once; the state dict then
        holds the permuted weight, so do this on an inference copy only)."""
        if not self.hwc_input:
            c, s = self.in_channels, self.resolution
            w = self.fc1.weight.view(-1, c, s, s).permute(0, 2, 3, 1).reshape(-1, c * s * s)
            self.fc1.weight.copy_(w.clone())
            self.hwc_input = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1).flatten(1) if self.hwc_input else x.flatten(1)
        return F.relu(self.fc2(F.relu(self.fc1(x))))


class Res5Head(nn.Module):
    """The ``res5`` stage run per RoI, then global average pooling (ResNet paper, appendix A).

    Args:
        stage: a ResNet ``layer4`` (first block strided), e.g. ``create_backbone(..., out_features=("res5",)).layer4``.
    """

    def __init__(self, stage: nn.Sequential):
        super().__init__()
        self.res5 = stage
        self.out_channels = stage[-1].out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res5(x).mean(dim=(2, 3))


class BoxPredictor(nn.Module):
    """``cls_score``: ``K + 1`` logits (0 = background); ``bbox_pred``: class-specific deltas ``4 (K + 1)``."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Pooler -> box head -> predictor, with proposal sampling and losses (train) or
    post-processing (eval).

    Args:
        pooler: a :class:`MultiLevelRoIAlign`.
        box_head: :class:`TwoFCHead` or :class:`Res5Head` (anything with ``out_channels``).
        num_classes: ``K`` foreground classes.
        fg_iou_thresh / bg_iou_thresh: proposal labelling (0.5 / 0.5).
        batch_size_per_image / positive_fraction: proposals sampled per image (512 / 0.25).
        bbox_reg_weights: box coder weights (10, 10, 5, 5).
        score_thresh / nms_thresh / detections_per_img: post-processing (0.05 / 0.5 / 100).
        box_loss / smooth_l1_beta: ``"smooth_l1"`` (1/9) or ``"giou"``.
    """

    def __init__(
        self,
        pooler: MultiLevelRoIAlign,
        box_head: nn.Module,
        num_classes: int,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9,
    ):
        super().__init__()
        self.pooler, self.box_head = pooler, box_head
        self.predictor = BoxPredictor(box_head.out_channels, num_classes)
        self.num_classes = num_classes
        self.box_coder = BoxCoder(tuple(bbox_reg_weights))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        proposals: Tuple[torch.Tensor, torch.Tensor],
        image_sizes: torch.Tensor,
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
    ):
        """Args:
            features: backbone levels; proposals: ``(boxes (R, 4), image_index (R,))`` from the RPN.
            image_sizes: ``(N, 2)`` ``(h, w)``; targets: per image ``boxes``/``labels`` (train).

        Returns:
            ``{"loss_cls", "loss_box"}`` with targets, else per-image detections.
        """
        boxes, image_index = proposals
        if targets is not None:
            boxes, image_index, labels, matched = self._sample(boxes, image_index, targets)
        x = self.box_head(self.pooler(features, boxes, image_index))
        class_logits, deltas = self.predictor(x)
        if targets is not None:
            pos = torch.nonzero(labels > 0).squeeze(1)
            pos_deltas = deltas.reshape(deltas.shape[0], -1, 4)[pos, labels[pos]]
            loss_cls, loss_box = fast_rcnn_loss(
                class_logits, labels, pos_deltas, boxes[pos], matched[pos], self.box_coder,
                self.box_loss, self.smooth_l1_beta,
            )
            return {"loss_cls": loss_cls, "loss_box": loss_box}
        return postprocess_detections(
            class_logits, deltas, boxes, image_index, image_sizes, self.box_coder,
            score_thresh=self.score_thresh, nms_thresh=self.nms_thresh, detections_per_img=self.detections_per_img,
        )

    @torch.no_grad()
    def _sample(self, boxes: torch.Tensor, image_index: torch.Tensor, targets):
        """Add the ground truth to the proposals (Detectron's trick: positives from the start),
        label them by IoU and sample ``batch_size_per_image`` per image."""
        all_boxes, all_img, all_labels, all_matched = [], [], [], []
        for i, t in enumerate(targets):
            gt = t["boxes"].to(boxes)
            props = torch.cat([boxes[image_index == i], gt])
            matches = self.matcher(box_iou(gt, props))
            if gt.numel():
                labels = t["labels"].to(boxes.device, torch.long)[matches.clamp(min=0)]
                matched = gt[matches.clamp(min=0)]
            else:
                labels = torch.zeros(props.shape[0], dtype=torch.long, device=boxes.device)
                matched = torch.zeros_like(props)
            labels = torch.where(matches >= 0, labels, torch.where(matches == -2, -1, 0))
            all_boxes.append(props)
            all_img.append(torch.full((props.shape[0],), i, dtype=torch.long, device=boxes.device))
            all_labels.append(labels)
            all_matched.append(matched)
        boxes, image_index = torch.cat(all_boxes), torch.cat(all_img)
        labels, matched = torch.cat(all_labels), torch.cat(all_matched)
        pos, neg = self.sampler(labels, image_index, len(targets))
        keep = torch.cat([pos, neg])
        return boxes[keep], image_index[keep], labels[keep], matched[keep]
