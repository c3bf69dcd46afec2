#!/usr/bin/env python
"""Anchors fitted to the data against the default anchors, on small objects (issue 17): coverage, AP, RPN recall.

    python tools/studies/anchor_study.py --output runs/anchor_study --json docs/anchors.json   # ~4.5 min on 2 idle CPU cores

1. A synthetic set of small objects: shapes of 8-26 px in ~160 px images (make_synthetic_coco with
   object_size=(0.05, 0.16), up to 12 objects an image), about 7-24 px at the training size 160.
2. tools/analyze_data.py's analysis of the training json for a ResNet-18 FPN at --image-size 160: the anchor
   coverage of the default anchors (32-512 px) and of the fitted ones.
3. Two tools/train_det.py runs that differ only in the anchors, default vs --anchor-sizes auto --aspect-ratios auto,
   the same number of iterations, seed and data; then COCO AP on the val split (metrics.json) and the RPN
   recall of each checkpoint: the share of val boxes that one of the first 100 / 300 proposals of their image
   covers at IoU >= 0.5 / 0.7 (proposals at the training size, the RPN in eval mode, best first).

Writes --json (every number, the commands) and, in --output, the data, the analysis and both runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("anchor_study")
OBJECT_SIZE = (0.05, 0.16)
MAX_OBJECTS = 12
ARMS = {"default": [], "auto": ["--anchor-sizes", "auto", "--aspect-ratios", "auto"]}


def common_flags(args: argparse.Namespace) -> List[str]:
    """The recipe both runs share: configs/det/demo.yaml's small detector, no anchor flags."""
    return ["--backbone", "resnet18", "--image-size", str(args.image_size), "--batch-size", "4",
            "--max-iters", str(args.iters), "--fpn-channels", "64", "--representation-size", "256",
            "--rpn-pre-nms-top-n-train", "600", "--rpn-post-nms-top-n-train", "300", "--rpn-pre-nms-top-n-test", "300",
            "--rpn-post-nms-top-n-test", "300", "--rpn-batch-size-per-image", "128", "--box-batch-size-per-image", "128",
            "--lr", "0.02", "--schedule", "cosine", "--warmup-iters", "50", "--workers", "0", "--eval-every", "1000",
            "--checkpoint-every", "0", "--num-pictures", "4", "--check-images", "none", "--device", "cpu",
            "--seed", str(args.seed), "--no-progress"]


def rpn_recall(checkpoint: Path, val_json: str, val_images: str, image_size: int, *, tops: Sequence[int] = (100, 300),
               ious: Sequence[float] = (0.5, 0.7)) -> Dict[str, float]:
    """Share of the val boxes covered by one of the first ``k`` proposals of their image at IoU >= ``t``."""
    import torch
    from torchvision.ops import box_iou

    from heads.detection.ensemble import load_detector
    from res_backbone.data import CocoDetection, build_eval_transforms, collate_detection

    model, ckpt = load_detector(checkpoint)
    pcfg = ckpt["pretrained_cfg"]
    data = CocoDetection(val_json, val_images, build_eval_transforms(image_size, pcfg["mean"], pcfg["std"]))
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate_detection)
    hits = {f"recall@{k}_iou{t}": 0 for k in tops for t in ious}
    total = 0
    with torch.inference_mode():
        for images, sizes, targets in loader:
            (boxes, index), _ = model.rpn(model.backbone(images), torch.as_tensor(sizes, dtype=torch.long))
            for i, target in enumerate(targets):
                gt = target["boxes"]
                total += len(gt)
                if not len(gt):
                    continue
                mine = boxes[index == i]  # best first
                for k in tops:
                    best = box_iou(gt, mine[:k]).max(1).values if len(mine) else torch.zeros(len(gt))
                    for t in ious:
                        hits[f"recall@{k}_iou{t}"] += int((best >= t).sum())
    return {key: round(v / max(total, 1), 4) for key, v in hits.items()} | {"val_boxes": total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/anchor_study", help="work folder: data, analysis, the two runs")
    p.add_argument("--json", default="docs/anchors.json", help="where the results go (default docs/anchors.json)")
    p.add_argument("--iters", type=int, default=300, help="training iterations of each run (default 300)")
    p.add_argument("--num-train", type=int, default=400, help="training images (default 400)")
    p.add_argument("--num-val", type=int, default=100, help="validation images (default 100)")
    p.add_argument("--image-size", type=int, default=160, help="training size, longer side (default 160)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                   help="which runs to train (default both: default auto)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from heads.detection.data_report import analyze_data
    from res_backbone.data import make_synthetic_coco

    out, t_start = Path(args.output), time.perf_counter()
    data = make_synthetic_coco(out / "data", num_train=args.num_train, num_val=args.num_val, image_size=160,
                               object_size=OBJECT_SIZE, max_objects=MAX_OBJECTS, seed=args.seed)
    analysis = analyze_data(data["train_json"], data["train_images"], out / "analysis", backbone="resnet18",
                            image_size=args.image_size, progress=False, seed=args.seed)
    print("\n".join(analysis["lines"]))
    data_flags = ["--train-json", data["train_json"], "--train-images", data["train_images"],
                  "--val-json", data["val_json"], "--val-images", data["val_images"]]
    runs = {}
    for arm in args.arms:
        extra = ARMS[arm]
        run_dir = out / arm
        cmd = ["tools/train_det.py", *common_flags(args), *data_flags, "--output", str(run_dir), *extra]
        log.info("%s: python %s", arm, " ".join(cmd))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, env=dict(os.environ))
        seconds = time.perf_counter() - t0
        metrics = json.loads((run_dir / "metrics.json").read_text())
        chosen = run_dir / "auto_choices.json"
        runs[arm] = {
            "command": "python " + " ".join(cmd),
            "seconds": round(seconds, 1),
            "AP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics["AP75"], "APs": metrics["APs"],
            "AR100": metrics["AR100"],
            "rpn_recall": rpn_recall(run_dir / "checkpoint_last.pt", data["val_json"], data["val_images"],
                                     args.image_size),
            "auto_choices": json.loads(chosen.read_text()) if chosen.exists() else None,
        }
        log.info("%s: AP %.3f AP50 %.3f, RPN recall %s (%.0f s)", arm, metrics["AP"], metrics["AP50"],
                 runs[arm]["rpn_recall"], seconds)
    anchors = analysis["anchors"]
    result = {
        "study": "anchors fitted to the data vs default anchors on small objects (issue 17)",
        "command": "python tools/studies/anchor_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {"generator": "res_backbone.data.make_synthetic_coco", "num_train": args.num_train,
                 "num_val": args.num_val, "image_size": 160, "object_size": list(OBJECT_SIZE),
                 "max_objects": MAX_OBJECTS, "seed": args.seed, "train_boxes": analysis["num_boxes"],
                 "sqrt_area_px_at_training_size": analysis["sizes_train"]["sqrt_area_px"]},
        "analysis_command": f"python tools/analyze_data.py --json {data['train_json']} --images "
                            f"{data['train_images']} --backbone resnet18 --image-size {args.image_size} --output "
                            f"{out / 'analysis'}",
        "coverage": {"default": {k: anchors["current"]["coverage"][k] for k in ("iou_0.5", "iou_0.7", "mean_best_iou")},
                     "fitted": {k: anchors["fitted"]["coverage"][k] for k in ("iou_0.5", "iou_0.7", "mean_best_iou")},
                     "default_anchors": anchors["current"]["anchors"], "fitted_anchors": anchors["fitted"]["anchors"]},
        "advice": analysis["advice"],
        "runs": runs,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    from res_backbone.io import atomic_write_json

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, args.json, indent=2)
    print("\n".join(summary(result)) + f"\n-> {args.json}")
    return 0


def summary(result: dict) -> List[str]:
    """The printed result: coverage, then AP and RPN recall of each run."""
    cov = result["coverage"]
    lines = [f"coverage at IoU 0.5: default {cov['default']['iou_0.5']:.1%} -> fitted {cov['fitted']['iou_0.5']:.1%}"]
    lines += [f"{arm:8s} AP {r['AP']:.3f}  AP50 {r['AP50']:.3f}  RPN recall@300 IoU0.5 "
              f"{r['rpn_recall']['recall@300_iou0.5']:.1%}  ({r['seconds']:.0f} s)" for arm, r in result["runs"].items()]
    return lines + [f"total {result['total_seconds']:.0f} s"]

if __name__ == "__main__":
    sys.exit(main())
