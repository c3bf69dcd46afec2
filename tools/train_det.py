#!/usr/bin/env python
"""Train a Faster R-CNN detector on ResNet features on any COCO-format dataset, then evaluate it.

    python tools/train_det.py --config configs/det/demo.yaml            # embedded synthetic shapes
    python tools/train_det.py --backbone resnet101 --pretrained auto \\
        --train-json train.json --train-images train/ --val-json val.json --val-images val/ \\
        --epochs 12 --batch-size 8 --amp bf16 --output runs/r101
    python tools/train_det.py --config configs/det/fmnist_transfer.yaml  # from a grey train_cls.py checkpoint
    torchrun --nproc_per_node 8 tools/train_det.py --device cuda ...   # DDP, one GPU per process
    torchrun --nproc_per_node 2 tools/train_det.py --device cpu ...    # DDP on CPU (gloo)

Without data flags the embedded synthetic dataset (shapes on textured backgrounds, COCO format)
is generated into --data-dir and used. Flags override --config values.

--pretrained takes ImageNet files and train_cls.py checkpoints; the weights set the input side
(res_backbone/transfer.py): a grey (1-channel) classifier gets its first conv as w/3 per colour channel
and the RGB input is normalised with its grey mean/std repeated, so a grey picture gives the response
the classifier learnt. Fine-tuning: --bn-policy frozen|norm_eval|trainable (default from the weights
and the batch size), --frozen-stages, --freeze-backbone-iters, --backbone-lr-mult (the FPN is new and
always trains at the full rate); the decisions are logged and stored in log.jsonl's start event.

Writes into --output: config.yaml (every resolved option), checkpoint_last.pt (atomic; also every
--checkpoint-every iterations; checkpoint_prev.pt keeps the one before), checkpoint_best.pt (best
val AP), log.jsonl and TensorBoard events (tb/), metrics.json (AP, AP50, AP75, APs, APm, APl, AR1,
AR10, AR100, ARs, ARm, ARl, per-class AP), detections.json (COCO results, original category ids)
and predictions/*.png (val images: predictions coloured by class, ground truth dashed). With --diagnostics,
at the end also pr_curves.png, confusion.png/.json, diagnostics.json and worst/*.png (docs/diagnostics.md).

--image-size auto, --anchor-sizes auto and --aspect-ratios auto choose those values from the training boxes
before training (heads/detection/anchor_fit.py: anchors that cover the most boxes at IoU 0.5 and 0.7 at the
training size); the log says what was chosen and the anchor coverage before and after, config.yaml and the
checkpoint keep the chosen values (auto_choices.json: the coverage). tools/analyze_data.py shows the same
numbers without training. --sampler repeat_factor repeats images of rare classes (LVIS).

Exit codes: 0 done, 1 unexpected error (under torchrun the message names the rank that failed first),
2 bad arguments or input, 3 non-finite losses (the last good checkpoint is kept), 143 stopped by
SIGTERM/SIGINT after writing a checkpoint (rerun with --resume auto to continue; under
`torchrun --max-restarts K` a dead worker restarts the group, which resumes from the newest valid
checkpoint when --resume auto is given).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from heads.detection.anchor_fit import add_anchor_args, anchor_kwargs, number_or_auto
from res_backbone.engine.run_config import (
    add_finetune_args, add_model_args, add_optimisation_args, add_run_args, parse_args, run_tool, train_parser,
)
from res_backbone.evaluation.coco import add_coco_backend_arg
from res_backbone.evaluation.diagnostics import add_diagnostics_args

log = logging.getLogger("train_det")


def build_parser() -> argparse.ArgumentParser:
    p = train_parser(__doc__, "configs/det/demo.yaml")
    g = add_model_args(p, backbone="resnet50")
    g.add_argument("--arch", default="fpn", choices=("fpn", "c4"),
                   help="fpn: FPN p2-p6 with a 2-FC box head; c4: RoIs from res4, res5 as the per-RoI head (paper)")
    g.add_argument("--norm", default=None, choices=("bn", "frozen_bn", "sync_bn", "gn"),
                   help="backbone normalisation layer (sync_bn is the DDP choice for small per-GPU batches); "
                        "default: from --bn-policy")
    g.add_argument("--fpn-channels", type=int, default=256, help="FPN width (default 256)")
    g.add_argument("--representation-size", type=int, default=1024, help="width of the 2-FC box head (default 1024)")
    add_anchor_args(g)
    g.add_argument("--rpn-pre-nms-top-n-train", type=int, default=2000, help="proposals kept per level before NMS, training")
    g.add_argument("--rpn-post-nms-top-n-train", type=int, default=2000, help="proposals kept per image after NMS, training")
    g.add_argument("--rpn-pre-nms-top-n-test", type=int, default=1000, help="proposals kept per level before NMS, inference")
    g.add_argument("--rpn-post-nms-top-n-test", type=int, default=1000, help="proposals kept per image after NMS, inference")
    g.add_argument("--rpn-batch-size-per-image", type=int, default=256, help="anchors sampled per image for the RPN loss")
    g.add_argument("--box-batch-size-per-image", type=int, default=512, help="RoIs sampled per image for the box head loss")
    g.add_argument("--box-loss", default="smooth_l1", choices=("smooth_l1", "giou"), help="box regression loss")
    g.add_argument("--box-score-thresh", type=float, default=0.05, help="drop detections scoring below this")
    g.add_argument("--box-detections-per-img", type=int, default=100, help="detections kept per image")
    d = p.add_argument_group("data")
    d.add_argument("--train-json", help="COCO annotations of the training split")
    d.add_argument("--train-images", help="folder the training json's file_name entries are relative to")
    d.add_argument("--val-json", help="COCO annotations of the validation split (evaluated with pycocotools)")
    d.add_argument("--val-images", help="folder the validation json's file_name entries are relative to")
    d.add_argument("--data-dir", default=".cache/synthetic", help="where the embedded synthetic set is generated")
    d.add_argument("--synthetic-train", type=int, default=600, help="synthetic training images (default 600)")
    d.add_argument("--synthetic-val", type=int, default=100, help="synthetic validation images (default 100)")
    d.add_argument("--synthetic-size", type=int, default=160, help="synthetic image side in pixels (default 160)")
    d.add_argument("--filter-empty", action="store_true", help="drop training images without annotations (kept as negatives by default)")
    d.add_argument("--image-size", type=number_or_auto, default=512,
                   help="longer image side after resizing (default 512); 'auto': chosen from the training boxes' "
                        "sizes (small objects are upscaled; logged)")
    d.add_argument("--sampler", default="random", choices=("random", "repeat_factor"),
                   help="training image order: random (a permutation per epoch) or repeat_factor (images of rare "
                        "classes repeated, LVIS: r = max(1, sqrt(t / share of images with the class)); the epoch "
                        "size is logged)")
    d.add_argument("--repeat-thresh", type=float, default=0.001,
                   help="t of --sampler repeat_factor: classes in fewer than this share of images repeat (default 0.001)")
    d.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank (default 2)")
    t = add_optimisation_args(
        p, epochs=12, batch_size=4, lr=0.02, optimizer="sgd", weight_decay=1e-4, schedule="step",
        milestones=(0.67, 0.89), warmup_iters=100, time_budget=False,
        lr_help="base learning rate (default 0.02 for batch 16; scale linearly)",
        help={"batch_size": "images per rank and iteration (default 4)"})
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_finetune_args(p, frozen_default="2 with --pretrained, 0 without", frozen_what="backbone (not the FPN)")
    r = add_run_args(p, output="runs/det",
                     resume_help="'auto' (newest valid checkpoint in --output) or a checkpoint path; default: start "
                                 "fresh",
                     checkpoint_help="also checkpoint every N iterations (default 200)",
                     pictures_help="val images drawn into predictions/ (default 8)")
    r.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds a collective waits for the other torchrun ranks before failing (default 1800)")
    add_coco_backend_arg(r)
    add_diagnostics_args(r)
    return p


MODEL_FLAGS = ("fpn_channels", "representation_size", "rpn_pre_nms_top_n_train",
               "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
               "rpn_batch_size_per_image", "box_batch_size_per_image", "box_loss", "box_score_thresh",
               "box_detections_per_img")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(build_parser(), argv)
    from res_backbone.engine.distributed import cleanup, describe_failure, init_distributed

    dist = init_distributed(args.device, timeout_s=args.dist_timeout)
    # Under torchrun an unexpected error is described naming this rank (the peers' collectives fail
    # next and name it); a single process lets it propagate, traceback and all.
    return run_tool(lambda: _train(args, dist), log, on_exit=cleanup,
                    describe=describe_failure if dist.enabled else None, reraise=not dist.enabled)


def _train(args: argparse.Namespace, dist) -> int:
    from heads.detection import train as det_run
    from heads.detection.run import run
    from res_backbone.engine import config as cfgmod
    from res_backbone.evaluation.coco import require_backend

    require_backend(args.coco_backend)  # before training, not after it
    fields = set(det_run.DetTrainConfig.__dataclass_fields__)
    cfg = det_run.DetTrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    cfg.model_kwargs = {k: getattr(args, k) for k in MODEL_FLAGS}
    # per level (one size each with fpn, all on the one level with c4); 'auto' is resolved from the training boxes
    cfg.model_kwargs.update(anchor_kwargs(args.anchor_sizes, args.aspect_ratios, args.arch))
    metrics = run(cfg, dist, norm=args.norm, bn_policy=args.bn_policy, frozen_stages=args.frozen_stages,
                  resolved=cfgmod.resolved_config(args))
    out = Path(cfg.output)
    if dist.is_main and metrics:
        print(metrics.get("summary", ""))
        print(f"AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  ->  {out / 'metrics.json'}, "
              f"{out / 'detections.json'}, {out / 'predictions'}/  (peak RSS {metrics['peak_rss_mib']:.0f} MiB)")
        if args.diagnostics:  # the final model (checkpoint_last.pt) and its evaluation's detections.json
            from heads.detection.diagnostics import diagnose_checkpoint, report_text

            diag = diagnose_checkpoint(
                out / "checkpoint_last.pt", cfg.val_json, cfg.val_images, out / "detections.json", out,
                device=det_run.resolve_device(cfg.device), amp=args.amp, batch_size=cfg.batch_size, workers=cfg.workers,
                score_thresh=args.diagnostics_score_thresh, backend=cfg.coco_backend,
                per_class_ap=metrics["per_class_AP"], progress=cfg.progress)
            print(report_text(diag, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
