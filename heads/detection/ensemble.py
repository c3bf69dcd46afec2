"""Test-time augmentation and model ensembles for detectors: run variants, merge their boxes.

Each variant (a model, an input scale, a horizontal flip) gives detections in original-image
pixels; per image and class they are merged by NMS (keep the best of overlapping boxes) or by
weighted box fusion (average the coordinates of a cluster, weighted by score; Solovyev et al., 2019).
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple, Union

import torch
from torchvision.ops import batched_nms, box_iou

from .faster_rcnn import FasterRCNN, build_detector


def flip_batch(images: torch.Tensor, image_sizes: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Mirror each image of a padded batch inside its own ``(h, w)``, padding staying bottom/right."""
    out = torch.zeros_like(images)
    for i, (h, w) in enumerate(image_sizes):
        out[i, :, :h, :w] = images[i, :, :h, :w].flip(-1)
    return out


def unflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Map ``xyxy`` boxes found on a mirrored image of ``width`` back to the original."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def merge_detections(
    parts: List[Dict[str, torch.Tensor]], *, method: str = "nms", iou_thresh: float = 0.55, max_dets: int = 100
) -> Dict[str, torch.Tensor]:
    """Merge several detection sets of ONE image (``boxes``, ``scores``, ``labels``) into one.

    Args:
        parts: one dict per variant/model, boxes in the same coordinates.
        method: ``"nms"`` (per class) or ``"wbf"`` (weighted box fusion, per class; a fused score is
            the cluster's mean score times ``min(cluster size, n) / n`` for ``n`` variants, so boxes
            only some variants found are down-weighted).
        iou_thresh: overlap at which boxes are the same object.
        max_dets: keep the top scoring ``max_dets``.
    """
    boxes = torch.cat([p["boxes"] for p in parts]) if parts else torch.zeros(0, 4)
    scores = torch.cat([p["scores"] for p in parts]) if parts else torch.zeros(0)
    labels = torch.cat([p["labels"] for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
    if boxes.numel() == 0:
        return {"boxes": boxes.reshape(0, 4), "scores": scores, "labels": labels}
    if method == "nms":
        keep = batched_nms(boxes, scores, labels, iou_thresh)[:max_dets]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    if method != "wbf":
        raise ValueError(f"merge method must be 'nms' or 'wbf', got {method!r}")
    n = max(1, len(parts))
    out_b, out_s, out_l = [], [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        order = idx[scores[idx].argsort(descending=True)]
        clusters: List[List[int]] = []
        fused: List[torch.Tensor] = []
        for i in order.tolist():
            if fused:
                ious = box_iou(boxes[i : i + 1], torch.stack(fused))[0]
                j = int(ious.argmax())
                if ious[j] >= iou_thresh:
                    clusters[j].append(i)
                    members = torch.tensor(clusters[j])
                    w = scores[members]
                    fused[j] = (boxes[members] * w[:, None]).sum(0) / w.sum()
                    continue
            clusters.append([i])
            fused.append(boxes[i].clone())
        for members, box in zip(clusters, fused):
            s = scores[torch.tensor(members)]
            out_b.append(box)
            out_s.append(s.mean() * min(len(members), n) / n)
            out_l.append(c)
    b, s, l = torch.stack(out_b), torch.stack(out_s), torch.stack(out_l)
    top = s.argsort(descending=True)[:max_dets]
    return {"boxes": b[top], "scores": s[top], "labels": l[top]}


def load_detector(path: Union[str, os.PathLike]) -> Tuple[FasterRCNN, dict]:
    """Rebuild a detector from a ``tools/train_det.py`` checkpoint; return ``(model.eval(), checkpoint)``.

    Raises:
        ValueError: the file is not a detection checkpoint (names the file and what it holds).
    """
    from res_backbone.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    return detector_from_checkpoint(ckpt, source=str(path)), ckpt


def detector_from_checkpoint(ckpt: dict, *, source: str = "checkpoint") -> FasterRCNN:
    """The detector (eval mode) of an already loaded ``tools/train_det.py`` checkpoint dict.

    Raises:
        ValueError: not a detection checkpoint, or weights that do not fit its config (naming ``source``).
    """
    kwargs = ckpt.get("detector_kwargs")
    if ckpt.get("task") != "detection" or not isinstance(kwargs, dict):
        raise ValueError(
            f"{source}: not a detection checkpoint from tools/train_det.py (task={ckpt.get('task')!r}); "
            "backbone-only files go to --pretrained instead"
        )
    kwargs = dict(kwargs)
    if kwargs.get("anchor_sizes") is not None:
        kwargs["anchor_sizes"] = tuple(tuple(a) for a in kwargs["anchor_sizes"])
    model = build_detector(pretrained=False, **kwargs)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{source}: weights do not fit the detector its config describes ({e})") from e
    return model.eval()
