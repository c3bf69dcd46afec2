"""Region Proposal Network (Ren et al., 2015, section 3.1), shared across FPN levels (FPN, 4.1).

Proposal selection follows torchvision (so converted weights give the same proposals): per level,
the ``pre_nms_top_n`` highest-scoring anchors; decode; clip to the image; drop boxes thinner than
``min_size``; NMS at ``nms_thresh`` within each level (``torchvision.ops.batched_nms``); keep the
``post_nms_top_n`` best of the image. Unlike torchvision, only the selected anchors are decoded and
the whole batch goes through one ``batched_nms`` call (groups ``image * levels + level``).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from .anchors import AnchorGenerator, default_fpn_sizes
from .box_coder import BoxCoder, grouped_nms
from .losses import rpn_loss
from .matcher import Matcher
from .sampler import BalancedSampler
from .size_cache import cached_for_size

Proposals = Tuple[torch.Tensor, torch.Tensor]  # boxes (R, 4) xyxy, image index (R,) long, grouped by image


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 objectness (``A``) and 1x1 deltas (``4A``), shared by all levels.

    Args:
        in_channels: feature width (all levels must share it).
        num_anchors: anchors per location.
    """

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for m in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Returns per level ``(N, A, H, W)`` logits and ``(N, 4A, H, W)`` deltas."""
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            logits.append(self.objectness(t))
            deltas.append(self.deltas(t))
        return logits, deltas


def _flatten(logits: torch.Tensor, deltas: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(N, A, H, W)``, ``(N, 4A, H, W)`` -> ``(N, H*W*A)``, ``(N, H*W*A, 4)`` in anchor order."""
    n, a, h, w = logits.shape
    logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
    deltas = deltas.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    return logits, deltas


def _per_image_top(keep: torch.Tensor, image_index: torch.Tensor, num_images: int, top_n: int) -> torch.Tensor:
    """From ``keep`` (indices sorted by decreasing score), the first ``top_n`` of each image, grouped by image."""
    if num_images == 1:
        return keep[:top_n]  # a slice: no kernel launch, no sort
    img = image_index[keep]
    order = torch.sort(img, stable=True).indices  # group by image, score order kept inside
    keep, img = keep[order], img[order]
    starts = torch.zeros(num_images + 1, dtype=torch.long, device=keep.device)
    starts[1:] = torch.bincount(img, minlength=num_images).cumsum(0)
    rank = torch.arange(keep.numel(), device=keep.device) - starts[img]
    return keep[rank < top_n]


def clip_boxes(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Clip xyxy ``boxes (..., 4)`` to ``[0, w] x [0, h]``; ``sizes (..., 2)`` holds ``(h, w)`` per box."""
    wh = sizes.flip(-1).to(boxes.dtype)
    return boxes.clamp(min=0).minimum(torch.cat((wh, wh), dim=-1))  # bound (w, h, w, h)


class RegionProposalNetwork(nn.Module):
    """Anchors, head, proposal selection and losses.

    Args:
        in_shapes: ``{name: (channels, stride)}`` of the levels it runs on (fine to coarse).
        anchor_sizes: per level sizes; default one size per level doubling from 32.
        aspect_ratios: ``h / w`` ratios (one tuple for all levels, or one per level).
        pre_nms_top_n_train / _test: anchors kept per level before NMS (2000 / 1000).
        post_nms_top_n_train / _test: proposals kept per image after NMS (2000 / 1000).
        nms_thresh: IoU of the per-level NMS (0.7).
        fg_iou_thresh / bg_iou_thresh: anchor labelling (0.7 / 0.3); best anchors of each object
            are positive too.
        batch_size_per_image / positive_fraction: anchors sampled for the loss (256 / 0.5).
        min_size: proposals narrower or lower than this are dropped (1e-3 px).
        score_thresh: objectness probability below which proposals are dropped (0).
        box_loss: ``"smooth_l1"`` (beta ``smooth_l1_beta``) or ``"giou"``.
    """

    def __init__(
        self,
        in_shapes: Mapping[str, Tuple[int, int]],
        *,
        anchor_sizes: Optional[Sequence[Sequence[float]]] = None,
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),),
        pre_nms_top_n_train: int = 2000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_train: int = 2000,
        post_nms_top_n_test: int = 1000,
        nms_thresh: float = 0.7,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        min_size: float = 1e-3,
        score_thresh: float = 0.0,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9,
    ):
        super().__init__()
        self.in_features = list(in_shapes)
        channels = {c for c, _ in in_shapes.values()}
        if len(channels) != 1:
            raise ValueError(f"the shared RPN head needs one width for all levels, got {dict(in_shapes)}")
        if anchor_sizes is None:
            anchor_sizes = default_fpn_sizes(len(in_shapes))
        self.anchor_generator = AnchorGenerator.from_shapes(in_shapes, anchor_sizes, aspect_ratios)
        num_anchors = set(self.anchor_generator.num_anchors_per_location)
        if len(num_anchors) != 1:
            raise ValueError(f"the shared RPN head needs the same anchor count on every level, got {num_anchors}")
        self.head = RPNHead(channels.pop(), num_anchors.pop())
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n = {"train": pre_nms_top_n_train, "test": pre_nms_top_n_test}
        self.post_nms_top_n = {"train": post_nms_top_n_train, "test": post_nms_top_n_test}
        self.nms_thresh, self.min_size, self.score_thresh = nms_thresh, min_size, score_thresh
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta
        self._constants: Dict[Tuple, Tuple[torch.Tensor, ...]] = {}

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        image_sizes: torch.Tensor,
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
    ) -> Tuple[Proposals, Dict[str, torch.Tensor]]:
        """Args:
            features: ``{name: (N, C, H_l, W_l)}`` holding at least ``in_features``.
            image_sizes: ``(N, 2)`` long ``(h, w)`` of each image before padding.
            targets: per image ``{"boxes": (G, 4) xyxy, ...}``; losses are computed when given.

        Returns:
            ``((boxes (R, 4), image_index (R,)), losses)``: proposals grouped by image, best first
            within an image; ``losses`` holds ``loss_objectness`` and ``loss_rpn_box`` with targets.
        """
        feats = [features[n] for n in self.in_features]
        logits, deltas = self.head(feats)
        flat = [_flatten(lg, d) for lg, d in zip(logits, deltas)]
        all_deltas = torch.cat([f[1] for f in flat], dim=1)  # (N, M, 4) over all levels
        anchors = self.anchor_generator.concatenated(feats)  # (M, 4), cached
        proposals = self._select([f[0] for f in flat], all_deltas, anchors, image_sizes)
        losses: Dict[str, torch.Tensor] = {}
        if targets is not None:
            all_logits = torch.cat([f[0] for f in flat], dim=1)
            losses = self._losses(all_logits, all_deltas, anchors, targets)
        return proposals, losses

    def _selection_constants(self, n: int, ks: Tuple[int, ...], ms: Tuple[int, ...], device: torch.device):
        """Per selected anchor (``ks[l]`` of the ``ms[l]`` of level ``l``, level-major, for ``n``
        images): its row offset into the concatenated anchors, its image and its NMS group. They only
        depend on the sizes, so they are built once per size (no per-call kernel launches)."""

        def build() -> Tuple[torch.Tensor, ...]:
            level = torch.cat([torch.full((k,), lvl, dtype=torch.long) for lvl, k in enumerate(ks)])
            starts = [0]
            for m in ms[:-1]:
                starts.append(starts[-1] + m)
            offsets = torch.cat([torch.full((k,), s0, dtype=torch.long) for s0, k in zip(starts, ks)])
            image_index = torch.arange(n)[:, None].expand(n, level.shape[0]).reshape(-1)
            groups = image_index * len(ks) + level.repeat(n)
            return tuple(t.to(device) for t in (offsets, image_index, groups))

        if torch.compiler.is_exporting():  # sizes are symbolic: no cache keyed on them
            return build()
        return cached_for_size(self._constants, (n, ks, ms, str(device)), build)

    @torch.no_grad()
    def _select(self, logits: List[torch.Tensor], deltas: torch.Tensor, anchors: torch.Tensor, image_sizes: torch.Tensor) -> Proposals:
        """Per level the ``pre_nms_top_n`` best anchors of each image (``logits``: per level
        ``(N, M_l)``; ``deltas (N, M, 4)`` and ``anchors (M, 4)`` all levels), decoded in one go."""
        mode = "train" if self.training else "test"
        pre_n, post_n = self.pre_nms_top_n[mode], self.post_nms_top_n[mode]
        top = [lg.detach().topk(min(pre_n, lg.shape[1]), dim=1) for lg in logits]  # (N, k_l) each
        n = logits[0].shape[0]
        offsets, image_index, groups = self._selection_constants(
            n, tuple(t.values.shape[1] for t in top), tuple(lg.shape[1] for lg in logits), deltas.device)
        idx = torch.cat([t.indices for t in top], dim=1) + offsets  # (N, K) rows of all levels
        k = idx.shape[1]
        d = deltas.detach().gather(1, idx[..., None].expand(n, k, 4))
        boxes = self.box_coder.decode(d.reshape(-1, 4), anchors[idx.reshape(-1)])[:, 0].reshape(n, k, 4)
        scores = torch.sigmoid(torch.cat([t.values for t in top], dim=1))  # NMS on probabilities, as torchvision
        boxes = clip_boxes(boxes, image_sizes[:, None, :])
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
        wh = boxes[:, 2:] - boxes[:, :2]
        valid = torch.nonzero((wh >= self.min_size).all(dim=1) & (scores >= self.score_thresh)).squeeze(1)
        keep = valid[grouped_nms(boxes[valid], scores[valid], groups[valid], self.nms_thresh)]
        keep = _per_image_top(keep, image_index, n, post_n)
        return boxes[keep], image_index[keep]

    def _losses(self, logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, targets) -> Dict[str, torch.Tensor]:
        n, m = logits.shape
        labels = torch.empty((n, m), dtype=torch.long, device=logits.device)
        matched_gt = torch.zeros((n, m, 4), dtype=anchors.dtype, device=anchors.device)
        for i, t in enumerate(targets):  # matching needs each image's own ground truth
            gt = t["boxes"].to(anchors)
            matches = self.matcher(box_iou(gt, anchors))
            labels[i] = torch.where(matches >= 0, 1, torch.where(matches == -2, -1, 0))  # no mask assignment
            if gt.numel():
                matched_gt[i] = gt[matches.clamp(min=0)]
        labels, matched_gt = labels.reshape(-1), matched_gt.reshape(-1, 4)
        image_index = torch.arange(n, device=logits.device).repeat_interleave(m)
        pos, neg = self.sampler(labels, image_index, n)
        sampled = torch.cat([pos, neg])
        anchor_idx = pos % m
        return dict(zip(("loss_objectness", "loss_rpn_box"), rpn_loss(
            logits.reshape(-1)[sampled], labels[sampled].clamp(min=0), deltas.reshape(-1, 4)[pos],
            anchors[anchor_idx], matched_gt[pos], self.box_coder, self.box_loss, self.smooth_l1_beta,
        )))
