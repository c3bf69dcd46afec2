#!/usr/bin/env python
"""Evaluate one detector checkpoint, or an ensemble, with COCO metrics; optional test-time augmentation.

    python tools/eval_det.py --checkpoint runs/demo/checkpoint_best.pt --output runs/demo/eval
    python tools/eval_det.py --checkpoint a.pt b.pt c.pt --tta-scales 384 512 640 --tta-flip --merge wbf \\
        --val-json val.json --val-images val/ --output runs/ensemble

The validation data defaults to the one the (first) checkpoint was trained with. Every
(checkpoint, scale, flip) variant runs over the split; per image and class their detections are
merged by NMS or weighted box fusion. Prints the COCO table (and a per-class AP / AP50 / recall
table) and writes into --output: metrics.json (12 COCO stats, per-class AP, AP50 and recall, the COCO
backend that ran), detections.json (COCO results format, original category ids; pycocotools' loadRes
reads it) and predictions/*.png; with --diagnostics also pr_curves.png, confusion.png/.json,
diagnostics.json (error breakdown, RPN recall) and worst/*.png. --coco-backend faster computes the same numbers with
faster-coco-eval (pip install 'res-backbone[eval]'), ~5x faster on large sets (docs/diagnostics.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from res_backbone.engine.run_config import add_image_check_args, tool_main
from res_backbone.evaluation.coco import add_coco_backend_arg
from res_backbone.evaluation.diagnostics import add_diagnostics_args

log = logging.getLogger("eval_det")


def build_parser() -> argparse.ArgumentParser:
    from heads.predict_run import add_running_args, add_tta_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="one or more train_det.py checkpoints or exported detectors (.onnx, .pt2, TorchScript; "
                        "several = an ensemble; same categories required)")
    p.add_argument("--val-json", help="COCO annotations to evaluate on (default: the checkpoint's val split)")
    p.add_argument("--val-images", help="image folder of --val-json (default: the checkpoint's)")
    p.add_argument("--image-size", type=int, help="longer image side (default: the checkpoint's training size)")
    add_tta_args(p)
    add_running_args(p)
    p.add_argument("--num-pictures", type=int, default=8, help="val images drawn into predictions/ (default 8)")
    add_coco_backend_arg(p)
    add_diagnostics_args(p)
    p.add_argument("--output", required=True, help="folder for metrics.json, detections.json, predictions/")
    add_image_check_args(p, training=False)
    return p


def main(argv=None) -> int:
    return tool_main(build_parser(), _evaluate, log, argv)


def _evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from heads.detection.predictor import DetectionPredictor, predict_coco
    from heads.detection.train import DetData, write_pictures
    from res_backbone.data import CocoDetection
    from res_backbone.data.preflight import preflight
    from res_backbone.engine.checkpoint import CorruptCheckpointError, atomic_write_text, load_checkpoint
    from res_backbone.evaluation.coco import coco_evaluate, require_backend, write_detections_json

    require_backend(args.coco_backend)  # before any image is read
    predictor = DetectionPredictor.from_files(
        args.checkpoint, device=args.device, amp=args.amp, batch_size=args.batch_size, workers=args.workers,
        fast=args.fast_path, image_size=args.image_size, tta_scales=args.tta_scales, tta_flip=args.tta_flip,
        merge=args.merge, merge_iou=args.merge_iou)
    val_json, val_images = args.val_json, args.val_images
    if not val_json or not val_images:
        try:
            first_cfg = load_checkpoint(args.checkpoint[0]).get("config", {})
        except CorruptCheckpointError:  # an exported file: it names no data
            first_cfg = {}
        val_json, val_images = val_json or first_cfg.get("val_json"), val_images or first_cfg.get("val_images")
    if not val_json or not val_images:
        log.error("no validation data: pass --val-json and --val-images (%s names none)", args.checkpoint[0])
        return 2
    dataset = CocoDetection(val_json, val_images, None)
    # every bad image at once; skip: the left-out images' objects count as missed in the COCO metrics
    checked = preflight({"val": dataset}, mode=args.check_images, policy=args.on_bad_image, output=args.output,
                        progress=args.progress)
    if list(dataset.cat_ids) != predictor.cat_ids:
        log.error("%s has categories %s but the model was trained on %s", val_json, list(dataset.cat_ids),
                  predictor.cat_ids)
        return 2
    bar = tqdm(total=len(dataset), desc="eval", unit="img", disable=not args.progress)
    results = predict_coco(predictor, dataset, progress=bar)
    bar.close()
    metrics = coco_evaluate(val_json, results, class_names=list(dataset.class_names), backend=args.coco_backend)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(metrics.get("summary", ""))
    n_variants = predictor.n_variants
    metrics_out = {k: v for k, v in metrics.items() if k != "summary"}
    metrics_out["evaluated"] = {"checkpoints": args.checkpoint, "scales": predictor.scales, "flip": args.tta_flip,
                                "merge": args.merge if n_variants > 1 else None, "val_json": val_json,
                                "fast_path": args.fast_path, "bad_images_left_out": len(checked.bad)}
    atomic_write_text(json.dumps(metrics_out, indent=2) + "\n", out_dir / "metrics.json")
    write_detections_json(results, out_dir / "detections.json")
    data = DetData(dataset, dataset, None, None, None, val_json, list(dataset.cat_ids), list(dataset.class_names))
    write_pictures(data, results, out_dir / "predictions", args.num_pictures, 0.3)
    if args.diagnostics:
        from heads.detection.diagnostics import diagnose, report_text

        diag = diagnose(predictor, dataset, results, val_json, out_dir, score_thresh=args.diagnostics_score_thresh,
                        backend=args.coco_backend, per_class_ap=metrics["per_class_AP"], progress=args.progress)
        print(report_text(diag, out_dir))
    print(f"AP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  ({n_variants} variant(s); COCO backend "
          f"{metrics['coco_backend']})  ->  {out_dir}/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
