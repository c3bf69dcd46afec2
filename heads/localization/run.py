"""A localization run from its configuration: data, model (:func:`~.build.build_localizer`), transfer
settings, ``config.yaml``, loss, then :func:`heads.localization.train.fit` (the shared runner)."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

from res_backbone import transfer
from res_backbone.data.preflight import finish_report, preflight
from res_backbone.engine import config as cfgmod
from res_backbone.engine.config import opt_int

from . import build_localizer, localization_loss
from . import train as loc_run

__all__ = ["MODEL_FLAGS", "add_localizer_args", "run"]

MODEL_FLAGS = ("grid", "box_channels", "hidden", "drop_rate", "crop_size", "crop_context", "crop_jitter", "box_scale",
               "first_cls_weight")


def add_localizer_args(g) -> None:
    """The localizer's flags of ``tools/train_loc.py`` (their values reach :func:`run` as ``model_options``)."""
    g.add_argument("--grid", type=opt_int, default=None,
                   help="the box branch pools the last feature map to grid x grid (default: that map's side at "
                        "--image-size, at most 4)")
    g.add_argument("--box-channels", type=int, default=128, help="1x1 conv width of the box branch (default 128)")
    g.add_argument("--hidden", type=int, default=256, help="hidden width of the box branch's MLP (default 256)")
    g.add_argument("--drop-rate", type=float, default=0.0, help="dropout before the classifier (default 0)")
    g.add_argument("--crop-size", type=int, default=0,
                   help="R-CNN-style second pass: the box's region, resampled to this side, goes through the backbone "
                        "again and a second classifier; the class probabilities are the mean of both (0, the "
                        "default: no second pass; 28 suits Fashion-MNIST items)")
    g.add_argument("--crop-context", type=float, default=0.08,
                   help="the crop pass enlarges the box by this fraction of its size on each side (default 0.08)")
    g.add_argument("--crop-jitter", type=float, default=0.1,
                   help="training crops come from the true box moved and scaled by up to this fraction (default 0.1)")
    g.add_argument("--box-scale", type=float, default=1.0,
                   help="with --crop-size: the first pass (box, first classifier) reads the image downscaled by this "
                        "factor, crops come from the full-resolution image (default 1; 0.5 = a 4x cheaper first pass)")
    g.add_argument("--first-cls-weight", type=float, default=0.5, metavar="W",
                   help="with --crop-size: the class probabilities are W x the first classifier's + (1 - W) x the "
                        "crop classifier's (default 0.5, their mean; 0: the crop classifier alone)")



def run(cfg: loc_run.LocTrainConfig, *, model_options: dict, label_smoothing: float = 0.0,
        resolved: Optional[dict] = None) -> dict:
    """Train and evaluate a localizer per ``cfg``; return the final metrics.

    Args:
        model_options: :func:`~.build.build_localizer`'s size and crop-pass keywords (``grid``,
            ``box_channels``, ``hidden``, ``drop_rate``, ``crop_size``, ``crop_context``, ``crop_jitter``,
            ``box_scale``, ``first_cls_weight``).
        label_smoothing: the loss's (with ``cfg.cls_weight``, ``cfg.l1_weight`` and ``cfg.giou_weight``).
        resolved: every option's final value (the tool's flags); written to ``config.yaml`` with the
            backbone, data paths, image size and grid filled in.

    Raises:
        ValueError: fine-tuning options with ``cfg.cls_checkpoint``; a label smoothing outside [0, 1).
        Preempted, NonFiniteLossError: see :func:`heads.localization.train.fit`.
    """
    out = Path(cfg.output)
    loc_run.seed_everything(cfg.seed, cfg.deterministic)
    train_set, val_set = loc_run.load_datasets(cfg)  # the data decides the class count
    checked = preflight({"train": train_set, "val": val_set}, mode=cfg.check_images, policy=cfg.on_bad_image,
              output=cfg.output, progress=cfg.progress)  # every bad image at once, before training
    # Weights load even when resuming (then overwritten): their pretrained_cfg sets the normalisation.
    pretrained = {"auto": True, "none": None, "": None}.get(str(cfg.pretrained).lower(), cfg.pretrained)
    if cfg.cls_checkpoint and (cfg.bn_policy or cfg.frozen_stages or cfg.freeze_backbone_iters
                               or cfg.backbone_lr_mult != 1.0):
        raise ValueError("--cls-checkpoint freezes the backbone and classifier (only the box branch trains); the "
                         "fine-tuning flags apply to --pretrained")
    # The BN policy follows from the weights and the batch size unless --bn-policy says otherwise.
    policy, norm, norm_eval = transfer.resolve_bn_policy(
        "frozen" if cfg.cls_checkpoint else cfg.bn_policy, None, pretrained=bool(pretrained), batch_size=cfg.batch_size)
    norm_kw = {} if norm == "bn" or cfg.cls_checkpoint else {"norm": norm}  # bn: rebuild keywords as before
    model = build_localizer(cfg.backbone, train_set.num_classes, cfg.mode, pretrained=pretrained,
                            cls_checkpoint=cfg.cls_checkpoint, input_size=cfg.image_size, **model_options, **norm_kw)
    cfg.transfer = transfer.configure_backbone(
        model.backbone, bn_policy=policy, norm_eval=norm_eval, frozen_stages=cfg.frozen_stages,
        freeze_backbone_iters=cfg.freeze_backbone_iters, backbone_lr_mult=cfg.backbone_lr_mult)
    cfg.backbone = model.build_kwargs["backbone_name"]
    cfg.localizer_kwargs = dict(model.build_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    if resolved is not None:
        resolved = dict(resolved)
        resolved.update({k: getattr(cfg, k) for k in ("backbone", "train_json", "train_images", "val_json",
                                                      "val_images", "image_size")}, grid=model.build_kwargs["grid"])
        cfgmod.dump_yaml(resolved, out / "config.yaml")
    mean, std = loc_run.rgb_stats(model.pretrained_cfg)
    model.backbone.pretrained_cfg = dict(model.pretrained_cfg, mean=list(mean), std=list(std),
                                         input_size=[3, cfg.image_size, cfg.image_size])
    data = loc_run.prepare_data(cfg, train_set, val_set, mean, std)
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
    loss_fn = partial(localization_loss, cls_weight=cfg.cls_weight, l1_weight=cfg.l1_weight,
                      giou_weight=cfg.giou_weight, label_smoothing=label_smoothing)
    try:
        return loc_run.fit(model, loss_fn, data, cfg)
    finally:
        finish_report(checked, cfg.output)  # + the faults met mid-run
