#!/usr/bin/env python
"""Train a single-object localizer (a class and a box per image) on ResNet features, then evaluate it.

    python tools/train_loc.py --config configs/loc/fmnist_resnet18.yaml          # built-in Fashion-MNIST set
    python tools/train_loc.py --backbone resnet50 --pretrained auto --mode pcr \\
        --train-json train.json --train-images train/ --val-json val.json --val-images val/ --output runs/loc
    python tools/train_loc.py --cls-checkpoint runs/cls/checkpoint_best.pt ...  # boxes on a frozen classifier

Without data flags the built-in set is rendered into --data-dir (once; reused while its options
match): Fashion-MNIST items pasted at random position, size and colour on textured canvases, train
items for training and unseen test items for validation, in COCO format. With COCO json, the
largest non-crowd box of each image is its target (images without one are skipped and counted);
--all-boxes scores predictions against every box of the image.

Modes: scr = one class-agnostic box per image, pcr = one box per class (the box of each predicted
class is used). The model trains jointly with a classifier (cross-entropy + L1 + GIoU), or with
--cls-checkpoint only the box branch trains on top of a frozen train_cls.py classifier.

Fine-tuning from --pretrained (res_backbone/transfer.py; grey weights: first conv w/3 per colour
channel, grey mean/std repeated): --bn-policy frozen|norm_eval|trainable (default from the weights and
the batch size), --frozen-stages, --freeze-backbone-iters, --backbone-lr-mult; the same flags as
train_det.py, and YAML keys of the same names.

Writes into --output: config.yaml (every resolved option), checkpoint_last.pt (atomic; also every
--checkpoint-every iterations; checkpoint_prev.pt keeps the one before), checkpoint_best.pt (lowest
val top-1 localization error), log.jsonl and TensorBoard events (tb/), metrics.json (ILSVRC top-1/top-5
localization error: an image is wrong unless a predicted class is right AND its box has IoU >= 0.5
with a ground-truth box of that class; top-1/top-5 classification error; mean IoU; localization error
with the class known; per-class top-1 localization error; errors in percent) and predictions/*.png
(val.png: the first val images, errors.png: the first mistakes; ground truth dashed green with its
class, the top-1 prediction solid with class, score and IoU).

Exit codes: 0 done, 1 unexpected error, 2 bad arguments or input, 3 non-finite losses, 143 stopped by SIGTERM/SIGINT
after writing a checkpoint (rerun with --resume auto to continue).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from heads.localization.run import add_localizer_args
from res_backbone.engine.config import opt_int
from res_backbone.engine.run_config import (
    add_finetune_args, add_model_args, add_optimisation_args, add_run_args, parse_args, run_tool, train_parser,
)

log = logging.getLogger("train_loc")


def build_parser() -> argparse.ArgumentParser:
    p = train_parser(__doc__, "configs/loc/fmnist_resnet18.yaml")
    g = add_model_args(p, backbone=None,
                       backbone_note="resnet18, or with --cls-checkpoint the checkpoint's architecture")
    g.add_argument("--mode", default="scr", choices=("scr", "pcr"),
                   help="scr: one class-agnostic box; pcr: one box per class (default scr)")
    g.add_argument("--cls-checkpoint", default=None,
                   help="a train_cls.py checkpoint: its backbone and classifier are loaded and frozen, only the box "
                        "branch trains (its class count must match the data)")
    add_localizer_args(g)
    d = p.add_argument_group("data")
    d.add_argument("--train-json", help="COCO annotations of the training split")
    d.add_argument("--train-images", help="folder the training json's file_name entries are relative to")
    d.add_argument("--val-json", help="COCO annotations of the validation split")
    d.add_argument("--val-images", help="folder the validation json's file_name entries are relative to")
    d.add_argument("--all-boxes", action="store_true",
                   help="score against every non-crowd box of an image (a prediction is right if it matches any box "
                        "of the predicted class); the largest box stays the training target")
    d.add_argument("--data-dir", default=".cache/fmnist_loc", help="where the built-in set is rendered (default .cache/fmnist_loc)")
    d.add_argument("--fmnist-root", default=None,
                   help="Fashion-MNIST idx folder (default $RB_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    d.add_argument("--fmnist-train", type=int, default=30000, help="built-in training images (default 30000)")
    d.add_argument("--fmnist-val", type=int, default=2000, help="built-in validation images (default 2000)")
    d.add_argument("--canvas", type=int, default=64, help="built-in canvas side in px (default 64)")
    d.add_argument("--item-scale", type=float, nargs=2, default=[28.0, 56.0], metavar=("MIN", "MAX"),
                   help="built-in: the 28 px item frame is scaled to a side in [MIN, MAX] px (default 28 56)")
    d.add_argument("--image-size", type=opt_int, default=None,
                   help="images are resized to this square side (default: the canvas for the built-in set, 224 for COCO json)")
    d.add_argument("--hflip", type=float, default=0.5, help="probability of a horizontal flip in training (default 0.5)")
    d.add_argument("--no-photometric", dest="photometric", action="store_false", help="no colour jitter in training")
    d.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0: decode in the main process)")
    d.add_argument("--cache-images", type=float, default=0.0, metavar="MB",
                   help="keep up to MB megabytes of decoded images in memory, per split (default 0: read every time); "
                        "for small sets read many times, e.g. the built-in 64 px set: 30,000 images = 352 MB, and a "
                        "training step 10%% faster on a 2-core CPU")
    d.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is fastest when other jobs share the CPU")
    t = add_optimisation_args(
        p, epochs=3, batch_size=64, lr=0.002, optimizer="adamw", weight_decay=0.05, schedule="cosine",
        milestones=(0.67, 0.89), warmup_iters=50, lr_help="base learning rate (default 0.002, for adamw)")
    add_finetune_args(p, frozen_default="0")
    t.add_argument("--cls-weight", type=float, default=1.0, help="weight of the cross-entropy term (default 1)")
    t.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the classifiers' cross-entropy (default 0)")
    t.add_argument("--l1-weight", type=float, default=5.0, help="weight of the L1 box term, normalised coordinates (default 5)")
    t.add_argument("--giou-weight", type=float, default=2.0, help="weight of the generalized-IoU box term (default 2)")
    r = add_run_args(p, output="runs/loc",
                     resume_help="'auto' (newest valid checkpoint in --output) or a checkpoint path; default: start "
                                 "fresh",
                     checkpoint_help="also checkpoint every N iterations (default 200)",
                     pictures_help="images per picture grid in predictions/ (default 8)")
    r.add_argument("--tta-flip", action="store_true",
                   help="evaluate with test-time flips: class probabilities and boxes averaged with the mirrored image's")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(build_parser(), argv)
    return run_tool(lambda: _train(args), log)


def _train(args: argparse.Namespace) -> int:
    from heads.localization import train as loc_run
    from heads.localization.run import MODEL_FLAGS, run
    from res_backbone.engine import config as cfgmod

    out = Path(args.output)
    fields = set(loc_run.LocTrainConfig.__dataclass_fields__)
    cfg = loc_run.LocTrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if cfg.backbone is None and not args.cls_checkpoint:
        cfg.backbone = "resnet18"  # with --cls-checkpoint, None takes the checkpoint's architecture
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    metrics = run(cfg, model_options={k: getattr(args, k) for k in MODEL_FLAGS},
                  label_smoothing=args.label_smoothing,
                  resolved=cfgmod.resolved_config(args))
    if metrics:
        print(f"top-1 loc err {metrics['top1_loc_err']:.2f}%  top-5 loc err {metrics['top5_loc_err']:.2f}%  "
              f"top-1 cls err {metrics['top1_cls_err']:.2f}%  mean IoU {metrics['mean_iou']:.3f}  "
              f"gt-known loc err {metrics['gt_known_loc_err']:.2f}%  ({metrics['num_images']} val images)  ->  "
              f"{out / 'metrics.json'}, {out / 'predictions'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
