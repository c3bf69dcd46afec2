"""A detection run from its configuration: data, model (:func:`~.faster_rcnn.build_detector`), transfer
settings, ``config.yaml``, then :func:`heads.detection.train.fit` (the shared runner)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from res_backbone import transfer
from res_backbone.data.preflight import finish_report, preflight
from res_backbone.engine import config as cfgmod
from . import train as det_run
from res_backbone.engine.distributed import DistInfo

from .faster_rcnn import build_detector

__all__ = ["run"]


def _model_kwargs(kw: dict) -> dict:
    kw = dict(kw)
    if kw.get("anchor_sizes") is not None:
        kw["anchor_sizes"] = tuple(tuple(a) for a in kw["anchor_sizes"])
    return kw


def run(cfg: det_run.DetTrainConfig, dist: DistInfo, *, norm: Optional[str] = None, bn_policy: Optional[str] = None,
        frozen_stages: Optional[int] = None, resolved: Optional[dict] = None) -> dict:
    """Train and evaluate a detector per ``cfg`` (``cfg.model_kwargs``: the detector's size options);
    return the final metrics (empty on non-main ranks).

    Args:
        norm, bn_policy: the backbone's normalisation layer and BatchNorm policy (None: chosen from the
            weights and the batch size, :func:`res_backbone.transfer.resolve_bn_policy`).
        frozen_stages: stem..stage k never trained (None: 2 with pretrained weights, else 0).
        resolved: every option's final value (the tool's flags); written to ``config.yaml`` with the data
            paths and the normalisation decisions filled in (main rank).

    Raises:
        Preempted, NonFiniteLossError: see :func:`heads.detection.train.fit`.
    """
    out = Path(cfg.output)
    det_run.seed_everything(cfg.seed + dist.rank, cfg.deterministic)
    pretrained = True if cfg.pretrained == "auto" else cfg.pretrained
    # The data decides the class count, the weights decide the normalisation.
    train_set, val_set = det_run.load_datasets(cfg, dist)
    checked = preflight({"train": train_set, "val": val_set}, mode=cfg.check_images, policy=cfg.on_bad_image,
              output=out, progress=cfg.progress and dist.is_main)  # every bad image at once, before training
    chosen = det_run.resolve_auto(cfg, train_set, is_main=dist.is_main)  # --image-size/--anchor-* auto
    # The BN policy follows from the weights (and the batch size) unless bn_policy/norm say otherwise.
    policy, norm, norm_eval = transfer.resolve_bn_policy(bn_policy, norm, pretrained=bool(pretrained),
                                                         batch_size=cfg.batch_size)
    model = build_detector(
        backbone=cfg.backbone, num_classes=len(train_set.cat_ids), arch=cfg.arch, pretrained=pretrained,
        frozen_stages=frozen_stages, norm=norm, **_model_kwargs(cfg.model_kwargs),
    )
    # Input channels, mean/std (grey statistics repeated for RGB) and BN policy, logged and recorded.
    cfg.transfer = transfer.configure_backbone(
        model.backbone, bn_policy=policy, norm_eval=norm_eval, freeze_backbone_iters=cfg.freeze_backbone_iters,
        backbone_lr_mult=cfg.backbone_lr_mult)
    if dist.is_main and resolved is not None:  # every option's final value, data paths resolved
        out.mkdir(parents=True, exist_ok=True)
        resolved = dict(resolved)
        resolved.update({k: getattr(cfg, k) for k in ("train_json", "train_images", "val_json", "val_images")},
                        **chosen)
        resolved.update(bn_policy=None if policy == "gn" else policy, norm=norm,
                        frozen_stages=model.backbone.frozen_stages)
        cfgmod.dump_yaml(resolved, out / "config.yaml")
    cfg.detector_kwargs = dict(backbone=cfg.backbone, num_classes=len(train_set.cat_ids), arch=cfg.arch,
                               norm=model.backbone.norm, **cfg.model_kwargs)
    if norm == "sync_bn" and dist.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    data = det_run.prepare_data(cfg, dist, train_set, val_set, cfg.transfer["mean"], cfg.transfer["std"])
    try:
        return det_run.fit(model, data, cfg, dist)
    finally:
        finish_report(checked, cfg.output)  # + the faults met mid-run
