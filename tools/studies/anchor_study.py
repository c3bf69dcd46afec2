#!/usr/bin/env python
"""Anchors fitted to the data against the default anchors, on small objects (issue 17): coverage, AP, RPN recall.

    python tools/studies/anchor_study.py --output runs/anchor_study --json docs/anchors.json   # 3 seeds, ~12 min, 2 idle cores

For each of --seeds (each seed draws its own data set and initialisation):

1. A synthetic set of small objects: shapes of 8-26 px in ~160 px images (make_synthetic_coco with
   object_size=(0.05, 0.16), up to 12 objects an image), about 7-24 px at the training size 160.
2. tools/analyze_data.py's analysis of the training json for a ResNet-18 FPN at --image-size 160: the anchor
   coverage of the default anchors (32-512 px) and of the fitted ones.
3. Two tools/train_det.py runs that differ only in the anchors, default vs --anchor-sizes auto --aspect-ratios auto,
   the same number of iterations, seed and data (--jobs of them side by side, one torch thread each); then COCO
   AP on the val split (metrics.json) and the RPN recall of each checkpoint: the share of val boxes that one of
   the first 100 / 300 proposals of their image covers at IoU >= 0.5 / 0.7 (proposals at the training size, the
   RPN in eval mode, best first).

Writes --json (every number, the commands, and per arm the mean / min / max over seeds and the fitted
arm's AP gain per seed) and, in --output, per seed the data, the analysis and both runs.
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


def common_flags(args: argparse.Namespace, seed: int) -> List[str]:
    """The recipe both runs share: configs/det/demo.yaml's small detector, no anchor flags."""
    return ["--backbone", "resnet18", "--image-size", str(args.image_size), "--batch-size", "4",
            "--max-iters", str(args.iters), "--fpn-channels", "64", "--representation-size", "256",
            "--rpn-pre-nms-top-n-train", "600", "--rpn-post-nms-top-n-train", "300", "--rpn-pre-nms-top-n-test", "300",
            "--rpn-post-nms-top-n-test", "300", "--rpn-batch-size-per-image", "128", "--box-batch-size-per-image", "128",
            "--lr", "0.02", "--schedule", "cosine", "--warmup-iters", "50", "--workers", "0", "--eval-every", "1000",
            "--checkpoint-every", "0", "--num-pictures", "4", "--check-images", "none", "--device", "cpu",
            "--seed", str(seed), "--no-progress"]


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


def train_runs(jobs: Sequence[tuple], n_parallel: int) -> Dict[tuple, float]:
    """Run the ``(key, command)`` training jobs, ``n_parallel`` side by side (one torch thread each when
    more than one); returns each key's wall seconds."""
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ)
    if n_parallel > 1:
        env["OMP_NUM_THREADS"] = "1"

    def one(job):
        key, cmd = job
        log.info("%s: python %s", "/".join(map(str, key)), " ".join(cmd))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL)
        return key, round(time.perf_counter() - t0, 1)

    with ThreadPoolExecutor(max(1, n_parallel)) as pool:
        return dict(pool.map(one, jobs))


def aggregate(per_seed: Dict[int, dict]) -> dict:
    """Per arm, mean / min / max over seeds of AP, AP50, AP75, AR100 and the RPN recall at 300 proposals;
    and per seed the fitted arm's AP gain over the default arm (when both ran)."""
    keys = ("AP", "AP50", "AP75", "AR100", "recall@300_iou0.5", "recall@300_iou0.7")
    arms = sorted({a for r in per_seed.values() for a in r["runs"]})
    out = {"arms": {}, "ap_gain": {}}
    for arm in arms:
        rows = [r["runs"][arm] for r in per_seed.values() if arm in r["runs"]]
        vals = {k: [row[k] if k in row else row["rpn_recall"][k] for row in rows] for k in keys}
        out["arms"][arm] = {k: {"mean": round(sum(v) / len(v), 4), "min": min(v), "max": max(v)} for k, v in vals.items()}
        out["arms"][arm]["seeds"] = len(rows)
    for seed, r in per_seed.items():
        if {"default", "auto"} <= set(r["runs"]):
            out["ap_gain"][str(seed)] = round(r["runs"]["auto"]["AP"] - r["runs"]["default"]["AP"], 4)
    gains = list(out["ap_gain"].values())
    if gains:
        out["ap_gain_mean"] = round(sum(gains) / len(gains), 4)
        out["seeds_auto_better"] = sum(g > 0 for g in gains)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/anchor_study", help="work folder: data, analysis, the runs")
    p.add_argument("--json", default="docs/anchors.json", help="where the results go (default docs/anchors.json)")
    p.add_argument("--iters", type=int, default=300, help="training iterations of each run (default 300)")
    p.add_argument("--num-train", type=int, default=400, help="training images per seed (default 400)")
    p.add_argument("--num-val", type=int, default=100, help="validation images per seed (default 100)")
    p.add_argument("--image-size", type=int, default=160, help="training size, longer side (default 160)")
    p.add_argument("--seeds", default="0,1,2",
                   help="comma-separated seeds; each draws its own data set and initialisation (default 0,1,2)")
    p.add_argument("--jobs", type=int, default=2,
                   help="training runs side by side, one torch thread each (default 2, for a 2-core CPU; 1 = one at a "
                        "time with all threads)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                   help="which runs to train (default both: default auto)")
    args = p.parse_args(argv)
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not seeds:
        p.error("--seeds: give at least one seed")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from heads.detection.data_report import analyze_data
    from res_backbone.data import make_synthetic_coco

    out, t_start = Path(args.output), time.perf_counter()
    per_seed, jobs = {}, []
    for seed in seeds:
        root = out / f"seed{seed}"
        data = make_synthetic_coco(root / "data", num_train=args.num_train, num_val=args.num_val, image_size=160,
                                   object_size=OBJECT_SIZE, max_objects=MAX_OBJECTS, seed=seed)
        analysis = analyze_data(data["train_json"], data["train_images"], root / "analysis", backbone="resnet18",
                                image_size=args.image_size, progress=False, seed=seed)
        print(f"seed {seed}:\n" + "\n".join(analysis["lines"]))
        data_flags = ["--train-json", data["train_json"], "--train-images", data["train_images"],
                      "--val-json", data["val_json"], "--val-images", data["val_images"]]
        anchors = analysis["anchors"]
        per_seed[seed] = {
            "data": {"train_boxes": analysis["num_boxes"], "sqrt_area_px_at_training_size": analysis["sizes_train"]["sqrt_area_px"]},
            "analysis_command": f"python tools/analyze_data.py --json {data['train_json']} --images "
                                f"{data['train_images']} --backbone resnet18 --image-size {args.image_size} --output "
                                f"{root / 'analysis'}",
            "coverage": {"default": {k: anchors["current"]["coverage"][k] for k in ("iou_0.5", "iou_0.7", "mean_best_iou")},
                         "fitted": {k: anchors["fitted"]["coverage"][k] for k in ("iou_0.5", "iou_0.7", "mean_best_iou")},
                         "default_anchors": anchors["current"]["anchors"], "fitted_anchors": anchors["fitted"]["anchors"]},
            "advice": analysis["advice"], "runs": {}, "_data": data}
        for arm in args.arms:
            cmd = ["tools/train_det.py", *common_flags(args, seed), *data_flags, "--output", str(root / arm), *ARMS[arm]]
            jobs.append(((seed, arm), cmd))
    seconds = train_runs(jobs, args.jobs)
    for (seed, arm), cmd in jobs:
        run_dir, data = out / f"seed{seed}" / arm, per_seed[seed]["_data"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        chosen = run_dir / "auto_choices.json"
        run = per_seed[seed]["runs"][arm] = {
            "command": "python " + " ".join(cmd), "seconds": seconds[(seed, arm)],
            "AP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics["AP75"], "APs": metrics["APs"],
            "AR100": metrics["AR100"],
            "rpn_recall": rpn_recall(run_dir / "checkpoint_last.pt", data["val_json"], data["val_images"],
                                     args.image_size),
            "auto_choices": json.loads(chosen.read_text()) if chosen.exists() else None,
        }
        log.info("seed %d %s: AP %.3f AP50 %.3f, RPN recall %s (%.0f s)", seed, arm, run["AP"], run["AP50"],
                 run["rpn_recall"], run["seconds"])
    for r in per_seed.values():
        r.pop("_data")
    result = {
        "study": "anchors fitted to the data vs default anchors on small objects (issue 17)",
        "command": "python tools/studies/anchor_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {"generator": "res_backbone.data.make_synthetic_coco", "num_train": args.num_train,
                 "num_val": args.num_val, "image_size": 160, "object_size": list(OBJECT_SIZE),
                 "max_objects": MAX_OBJECTS, "seeds": seeds},
        "iters": args.iters, "jobs": args.jobs,
        "summary": aggregate(per_seed),
        "seeds": {str(k): v for k, v in per_seed.items()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    from res_backbone.io import atomic_write_json

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, args.json, indent=2)
    print("\n".join(summary(result)) + f"\n-> {args.json}")
    return 0


def summary(result: dict) -> List[str]:
    """The printed result: coverage per seed, then each arm's mean (min-max) over seeds and the AP gains."""
    lines = []
    for seed, r in result["seeds"].items():
        cov = r["coverage"]
        lines.append(f"seed {seed}: coverage at IoU 0.5 default {cov['default']['iou_0.5']:.1%} -> fitted "
                     f"{cov['fitted']['iou_0.5']:.1%}; " + ", ".join(
                         f"{arm} AP {run['AP']:.3f} recall@300 {run['rpn_recall']['recall@300_iou0.5']:.1%}"
                         for arm, run in r["runs"].items()))
    for arm, v in result["summary"]["arms"].items():
        lines.append(f"{arm:8s} over {v['seeds']} seeds: " + ", ".join(
            f"{k} {v[k]['mean']:.3f} ({v[k]['min']:.3f}-{v[k]['max']:.3f})" for k in ("AP", "AP50", "recall@300_iou0.5")))
    if "ap_gain_mean" in result["summary"]:
        g = result["summary"]
        lines.append(f"AP gain of fitted anchors: mean {g['ap_gain_mean']:+.3f}, per seed "
                     + ", ".join(f"{s}: {v:+.3f}" for s, v in g["ap_gain"].items()))
    return lines + [f"total {result['total_seconds']:.0f} s"]


if __name__ == "__main__":
    sys.exit(main())
