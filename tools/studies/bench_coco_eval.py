#!/usr/bin/env python
"""COCO evaluation speed: pycocotools against faster-coco-eval on the same generated set, in one run.

    python tools/studies/bench_coco_eval.py --images 5000 --output docs/bench_coco_eval.json

The ground truth and detections come from :func:`synthetic_eval_set` (seeded): non-contiguous
category ids, crowd boxes, images without ground truth, images without detections, ~16 detections
per image (jittered copies of the ground truth, some with the wrong class, and background boxes).
Each backend runs :func:`res_backbone.evaluation.coco.coco_evaluate` end to end from the json file
(what ``tools/eval_det.py`` does), timed with ``time.perf_counter``; the 12 stats and the per-class
APs of the two are compared. Writes the timings, the ratio and the largest difference as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

#: non-contiguous on purpose: the evaluation must map ids, never assume 1..K
CATEGORY_IDS = (1, 3, 4, 9, 17, 23, 40, 41)


def synthetic_eval_set(images: int, dets_per_image: float = 16.0, seed: int = 0,
                       size: Tuple[int, int] = (640, 480)) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """A COCO ground truth and a detection list that exercise every branch of COCO evaluation.

    Args:
        images: number of images (ids 1..images, sizes ``size`` = (width, height)).
        dets_per_image: mean detections per image (jittered ground truth, then background boxes).
        seed: numpy seed.

    Returns:
        ``(gt, detections)``: a COCO dict (every 10th image has no ground truth, ~3% of boxes are
        crowd, sizes span COCO's small/medium/large) and ``[{"image_id", "category_id", "bbox": xywh,
        "score"}]``; every 25th image has no detections.
    """
    rng = np.random.default_rng(seed)
    W, H = size
    gt_imgs = [{"id": i, "file_name": f"{i:06d}.jpg", "width": W, "height": H} for i in range(1, images + 1)]
    anns: List[Dict[str, Any]] = []
    dets: List[Dict[str, Any]] = []
    cats = np.asarray(CATEGORY_IDS)
    for img in gt_imgs:
        i = img["id"]
        n_gt = 0 if i % 10 == 0 else int(rng.integers(1, 12))
        side = np.exp(rng.uniform(np.log(8), np.log(300), n_gt))
        w, h = side * np.exp(rng.normal(0, 0.3, n_gt)), side * np.exp(rng.normal(0, 0.3, n_gt))
        w, h = np.minimum(w, W - 1), np.minimum(h, H - 1)
        x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
        c = rng.choice(cats, n_gt)
        crowd = rng.random(n_gt) < 0.03
        for j in range(n_gt):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c[j]),
                         "bbox": [float(x[j]), float(y[j]), float(w[j]), float(h[j])],
                         "area": float(w[j] * h[j]), "iscrowd": int(crowd[j])})
        if i % 25 == 0:
            continue
        n_det = int(rng.poisson(dets_per_image))
        n_tp = min(n_det, 2 * n_gt)
        src = rng.integers(0, max(n_gt, 1), n_tp)
        for k in range(n_det):
            if k < n_tp and n_gt:  # a jittered copy of a ground-truth box (sometimes the wrong class)
                j = src[k]
                jit = rng.normal(0, 0.12, 4)
                bw, bh = w[j] * np.exp(jit[2]), h[j] * np.exp(jit[3])
                bx, by = x[j] + jit[0] * w[j], y[j] + jit[1] * h[j]
                cat = int(c[j]) if rng.random() > 0.1 else int(rng.choice(cats))
            else:  # background
                bw, bh = rng.uniform(8, 200, 2)
                bx, by = rng.uniform(0, W - bw), rng.uniform(0, H - bh)
                cat = int(rng.choice(cats))
            dets.append({"image_id": i, "category_id": cat, "bbox": [float(bx), float(by), float(bw), float(bh)],
                         "score": float(rng.random())})
    gt = {"images": gt_imgs, "annotations": anns,
          "categories": [{"id": int(c), "name": f"class{c}"} for c in CATEGORY_IDS]}
    return gt, dets


def compare(a: Dict[str, Any], b: Dict[str, Any]) -> float:
    """The largest absolute difference between two ``coco_evaluate`` results (12 stats and per-class values)."""
    from res_backbone.evaluation.coco import STAT_NAMES

    diffs = [abs(a[k] - b[k]) for k in STAT_NAMES]
    for key in ("per_class_AP", "per_class_AP50", "per_class_recall"):
        diffs += [abs(a[key][n] - b[key][n]) for n in a[key]]
    return float(max(diffs))


def bench(images: int, dets_per_image: float = 16.0, seed: int = 0) -> Dict[str, Any]:
    """Both backends on one generated set; ``{"seconds": {backend: s}, "speedup", "max_abs_diff", ...}``."""
    from res_backbone.evaluation.coco import COCO_BACKENDS, STAT_NAMES, coco_evaluate

    gt, dets = synthetic_eval_set(images, dets_per_image, seed)
    seconds, metrics = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gt.json"
        path.write_text(json.dumps(gt))
        for backend in COCO_BACKENDS:
            t0 = time.perf_counter()
            metrics[backend] = coco_evaluate(path, dets, backend=backend)
            seconds[backend] = time.perf_counter() - t0
    import faster_coco_eval
    import pycocotools

    ref = metrics["pycocotools"]
    return {
        "images": images, "ground_truth_boxes": len(gt["annotations"]),
        "crowd_boxes": sum(a["iscrowd"] for a in gt["annotations"]), "detections": len(dets),
        "categories": list(CATEGORY_IDS), "seed": seed,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "speedup": round(seconds["pycocotools"] / seconds["faster"], 2),
        "max_abs_diff": compare(ref, metrics["faster"]),
        "stats": {k: ref[k] for k in STAT_NAMES},
        "versions": {"pycocotools": getattr(pycocotools, "__version__", "?"),
                     "faster_coco_eval": faster_coco_eval.__version__, "python": platform.python_version()},
        "machine": platform.processor() or platform.machine(),
        "timed": "coco_evaluate(json path, detections, backend=...) end to end: json load, index, checks, "
                 "evaluate, accumulate, summarize",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000, help="generated images (default 5000)")
    p.add_argument("--dets-per-image", type=float, default=16.0, help="mean detections per image (default 16)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--output", help="write the result JSON here (default: print only)")
    args = p.parse_args(argv)
    from res_backbone.evaluation.coco import require_backend
    from res_backbone.io import atomic_write_json

    try:
        require_backend("faster")
    except ImportError as e:
        print(e, file=sys.stderr)
        return 2
    out = bench(args.images, args.dets_per_image, args.seed)
    out["command"] = "python tools/studies/bench_coco_eval.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    s = out["seconds"]
    print(f"{out['images']} images, {out['detections']} detections: pycocotools {s['pycocotools']:.2f} s, "
          f"faster-coco-eval {s['faster']:.2f} s -> {out['speedup']:.1f}x; largest difference "
          f"{out['max_abs_diff']:.1e}")
    if args.output:
        atomic_write_json(out, args.output, indent=2)
    return 0 if out["max_abs_diff"] <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
