#!/usr/bin/env python
"""Evaluate a single-object localization checkpoint (tools/train_loc.py) with the ILSVRC localization error.

    python tools/eval_loc.py --checkpoint runs/loc/checkpoint_best.pt --output runs/loc/eval
    python tools/eval_loc.py --checkpoint runs/loc/checkpoint_best.pt --val-json val.json --val-images val/ \\
        --all-boxes --output runs/loc/eval_coco

The data defaults to the checkpoint's validation split, the image size and normalisation to the
checkpoint's. An image counts as wrong at top-k unless one of its k predicted classes is right and
that class's box has IoU >= 0.5 with a ground-truth box of that class. Prints a summary and writes
into --output: metrics.json (top1/top5_loc_err, top1/top5_cls_err, gt_known_loc_err in percent,
mean_iou, per-class top-1 localization error) and predictions/val.png, predictions/errors.png.

Exit codes: 0 done, 1 unexpected error, 2 bad arguments, checkpoint or data.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from res_backbone.engine.run_config import add_image_check_args, tool_main

log = logging.getLogger("eval_loc")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train_loc.py checkpoint (checkpoint_best.pt or checkpoint_last.pt)")
    p.add_argument("--val-json", help="COCO annotations to evaluate on (default: the checkpoint's val split)")
    p.add_argument("--val-images", help="image folder of --val-json (default: the checkpoint's)")
    p.add_argument("--all-boxes", action="store_true", default=None,
                   help="score against every non-crowd box of an image (default: as the checkpoint was trained)")
    p.add_argument("--image-size", type=int, help="square input side (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is fastest when other jobs share the CPU")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu or cuda (default cpu)")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast dtype (default none)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--num-pictures", type=int, default=16, help="images per picture grid in predictions/ (default 16)")
    p.add_argument("--tta-flip", action="store_true", default=None,
                   help="test-time flips: class probabilities and boxes averaged with the mirrored image's "
                        "(default: as the checkpoint's run evaluated)")
    p.add_argument("--first-cls-weight", type=float, default=None, metavar="W",
                   help="models with a crop pass: weight of the first classifier in the class probabilities "
                        "(default: the checkpoint's; 0 = the crop classifier alone, 0.5 = the mean)")
    p.add_argument("--output", required=True, help="folder for metrics.json and predictions/")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_image_check_args(p, training=False)
    return p


def main(argv=None) -> int:
    return tool_main(build_parser(), _evaluate, log, argv)


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from heads.localization import load_localizer
    from res_backbone.data.preflight import preflight
    from res_backbone.data.localization import CocoLocalization, build_loc_eval_transforms
    from res_backbone.engine.checkpoint import CorruptCheckpointError
    from heads.localization.train import rgb_stats
    from heads.localization.evaluate import evaluate, make_eval_loader
    from res_backbone.weights.files import CheckpointMismatchError

    try:
        model, ck = load_localizer(args.checkpoint)
        if args.first_cls_weight is not None:
            if not getattr(model, "crop_size", 0):
                raise ValueError(f"--first-cls-weight: {args.checkpoint} has no crop pass (one classifier)")
            if not 0 <= args.first_cls_weight <= 1:
                raise ValueError(f"--first-cls-weight must be in [0, 1], got {args.first_cls_weight}")
            model.first_cls_weight = args.first_cls_weight
    except (FileNotFoundError, CorruptCheckpointError, CheckpointMismatchError, ValueError) as e:
        log.error("%s", e)
        return 2
    cfg = ck.get("config") or {}
    val_json, val_images = args.val_json or cfg.get("val_json"), args.val_images or cfg.get("val_images")
    if not val_json or not val_images:
        log.error("no validation data: pass --val-json and --val-images (the checkpoint names none)")
        return 2
    all_boxes = bool(cfg.get("all_boxes", False)) if args.all_boxes is None else True
    try:
        dataset = CocoLocalization(val_json, val_images, all_boxes=all_boxes)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    classes = list(ck.get("classes") or [])
    if list(ck.get("cat_ids") or []) != dataset.cat_ids:
        log.error("%s has categories %s but the model was trained on %s (%s)", val_json, dataset.cat_ids,
                  ck.get("cat_ids"), ", ".join(classes))
        return 2
    checked = preflight({"val": dataset}, mode=args.check_images, policy=args.on_bad_image, output=args.output,
                        progress=args.progress)  # every bad image at once; skip: evaluated without them
    if len(dataset) == 0:
        log.error("%s: no image has a usable box (%d skipped)", val_json, dataset.skipped_empty)
        return 2
    size = args.image_size or int(ck.get("image_size") or 224)
    mean, std = rgb_stats(ck.get("pretrained_cfg"))
    dataset.transforms = build_loc_eval_transforms(size, mean, std)
    device = torch.device(args.device)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tta_flip = bool(cfg.get("tta_flip", False)) if args.tta_flip is None else True
    metrics = evaluate(
        model, make_eval_loader(dataset, args.batch_size, args.workers), dataset, device=device, amp=args.amp,
        channels_last=args.channels_last, tta_flip=tta_flip, metrics_path=out / "metrics.json", pictures_dir=out / "predictions",
        num_pictures=args.num_pictures, progress=args.progress,
        extra={"checkpoint": str(args.checkpoint), "checkpoint_iter": ck.get("iter"), "val_json": str(val_json),
               "image_size": size, "bad_images_left_out": len(checked.bad), "model": ck.get("model_name"), "mode": model.mode, "classes": classes,
               **({"first_cls_weight": model.first_cls_weight} if getattr(model, "crop_size", 0) else {})},
    )
    print(f"top-1 loc err {metrics['top1_loc_err']:.2f}%  top-5 loc err {metrics['top5_loc_err']:.2f}%  "
          f"top-1 cls err {metrics['top1_cls_err']:.2f}%  top-5 cls err {metrics['top5_cls_err']:.2f}%  "
          f"mean IoU {metrics['mean_iou']:.3f}  gt-known loc err {metrics['gt_known_loc_err']:.2f}%  "
          f"({metrics['num_images']} images, {dataset.skipped_empty} skipped)  ->  {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
