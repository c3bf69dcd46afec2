#!/usr/bin/env python
"""Train an image classifier (any registered ResNet, CIFAR-style ResNet or plain twin) and evaluate it.

    python tools/train_cls.py --config configs/cls/fmnist_resnet20.yaml    # Fashion-MNIST, ~7-8 min, quiet 2-core CPU
    python tools/train_cls.py --config configs/cls/fmnist_resnet20.yaml --backbone plain20 \\
        --output runs/fmnist_plain20                                          # the plain twin, same recipe
    python tools/train_cls.py --backbone resnet50 --pretrained auto --train-dir data/train --val-dir data/val \\
        --input-size 224 --epochs 30 --batch-size 256 --amp bf16 --channels-last --device cuda --output runs/r50
    python tools/train_cls.py --config configs/cls/fmnist_resnet20.yaml --resume auto   # continue a stopped run

Data: Fashion-MNIST by default (Debian's dataset-fashion-mnist package, or --data-dir; its 10k test
images are the validation split), or ImageFolder trees (--train-dir/--val-dir: one sub-folder per
class). Defaults follow the ResNet paper: SGD momentum 0.9, weight decay 1e-4 (not on norms and
biases), lr 0.1 x batch/256 with warmup then step (x0.1 at 50% and 75%) or cosine decay; training
augmentation is pad-4 + random crop + flip for Fashion-MNIST and random-resized crop + flip for
folders. Flags override --config values.

Writes into --output: config.yaml (every resolved option; --config it to rerun), checkpoint_last.pt
(atomic, every epoch and every --checkpoint-every iterations; checkpoint_prev.pt keeps the one
before), checkpoint_best.pt (lowest val top-1 error), log.jsonl and TensorBoard events (tb/),
metrics.json (top1_err, top5_err in percent, best_top1_err, train_time_s, img_per_s, per-class
accuracy). Checkpoints load with create_model(name, num_classes=K, in_chans=C, pretrained=path) and
create_backbone(name, pretrained=path).

Exit codes: 0 done, 1 unexpected error, 2 bad arguments or input, 3 non-finite losses, 143 stopped by SIGTERM/SIGINT
after writing a checkpoint (rerun with --resume auto to continue).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from res_backbone.engine.config import opt_int
from res_backbone.engine.run_config import (
    add_model_args, add_optimisation_args, add_run_args, parse_args, run_tool, train_parser,
)

log = logging.getLogger("train_cls")


def build_parser() -> argparse.ArgumentParser:
    p = train_parser(__doc__, "configs/cls/fmnist_resnet20.yaml")
    g = add_model_args(p, backbone="resnet20",
                       pretrained_note="; a classifier of another size is dropped and re-initialised")
    g.add_argument("--num-classes", type=opt_int, default=None,
                   help="classifier outputs; checked against the data's class count (default: taken from the data)")
    g.add_argument("--in-chans", type=opt_int, default=None, choices=(None, 1, 3), metavar="{1,3}",
                   help="input channels: 1 (grey) or 3 (RGB; grey images are repeated). Default 1 for Fashion-MNIST, "
                        "3 for image folders")
    g.add_argument("--drop-rate", type=float, default=0.0, help="dropout before the classifier (default 0)")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST folder with the four idx files (default $RB_FASHION_MNIST or "
                        "/usr/share/datasets/fashion-mnist: sudo apt-get install dataset-fashion-mnist)")
    d.add_argument("--train-dir", default=None, help="ImageFolder training tree: <dir>/<class name>/<images>")
    d.add_argument("--val-dir", default=None, help="ImageFolder validation tree with the same class folders")
    d.add_argument("--limit-train", type=opt_int, default=None, help="use only this many training images (quick runs)")
    d.add_argument("--limit-val", type=opt_int, default=None, help="use only this many validation images")
    d.add_argument("--input-size", type=int, default=224,
                   help="image folders: training crop side (default 224); Fashion-MNIST keeps its 28x28")
    d.add_argument("--resize", type=opt_int, default=None,
                   help="image folders, evaluation: shorter side before the centre crop (default crop/0.875)")
    d.add_argument("--crop", type=opt_int, default=None,
                   help="image folders, evaluation crop side (default --input-size; a crop larger than --resize "
                        "resizes to the crop first)")
    d.add_argument("--augment", default="auto", choices=("auto", "pad_crop", "rrc", "flip", "none"),
                   help="training augmentation: auto = pad_crop (pad 4, random crop, flip) for Fashion-MNIST and "
                        "rrc (random-resized crop, flip) for image folders")
    d.add_argument("--invert", type=float, default=0.0, metavar="P",
                   help="training images are replaced by their negative with probability P (default 0): a classifier "
                        "for objects that may be darker or lighter than their background, e.g. the step before "
                        "train_loc.py on the built-in set")
    d.add_argument("--interpolation", default="bilinear", choices=("bilinear", "bicubic"),
                   help="resize interpolation for image folders")
    d.add_argument("--workers", type=opt_int, default=None,
                   help="DataLoader worker processes (default 0 for Fashion-MNIST, whose batches are built in "
                        "the main process at a few ms each; min(8, CPUs) for image folders)")
    d.add_argument("--threads", type=opt_int, default=None,
                   help="CPU threads for torch (default: one per core). On a machine shared with other jobs, 1 "
                        "can be several times faster than 2 (threads of one op wait for each other)")
    t = add_optimisation_args(
        p, epochs=30, batch_size=128, lr=None, optimizer="sgd", weight_decay=1e-4, schedule="step",
        milestones=(0.5, 0.75), warmup_iters=100,
        lr_help="base learning rate (default 0.1 x batch-size / 256 with sgd, 1e-3 with adamw)",
        help={"milestones": "step schedule: x0.1 at these fractions of the run, or absolute iterations if >= 1 "
                            "(default 0.5 0.75, the paper's 32k and 48k of 64k)"})
    t.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (default 0)")
    add_run_args(p, output="runs/cls",
                 resume_help="'auto' (newest valid checkpoint in --output, else start fresh) or a checkpoint path; "
                             "the model, classes and channels must match",
                 checkpoint_help="also checkpoint every N iterations (default 200; 0: only at epoch ends and on "
                                 "SIGTERM)")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(build_parser(), argv)
    from heads.classification import train as cls_run
    from heads.classification.run import run as run_classification

    fields = set(cls_run.ClsTrainConfig.__dataclass_fields__)
    cfg = cls_run.ClsTrainConfig(**{k: v for k, v in vars(args).items() if k in fields})

    def body() -> int:
        metrics = run_classification(cfg)
        if metrics:
            top5, best = metrics.get("top5_err"), metrics.get("best_top1_err")
            print(f"top-1 err {metrics.get('top1_err', float('nan')):.2f}%"
                  + (f"  top-5 err {top5:.2f}%" if top5 is not None else "")
                  + (f"  best top-1 err {best:.2f}%" if best is not None else "")
                  + f"  ({metrics['train_time_s']:.0f} s training, {metrics['img_per_s']} img/s)"
                  + f"  ->  {Path(cfg.output) / 'metrics.json'}")
        return 0

    return run_tool(body, log)


if __name__ == "__main__":
    sys.exit(main())
