#!/usr/bin/env python
"""Predict with a trained model on your own images, folders, lists and videos; write the answers into a folder.

    python tools/predict.py --checkpoint runs/demo/checkpoint_best.pt --source photos/ --output runs/pred
    python tools/predict.py --checkpoint a.pt b.pt --tta-flip --source "shots/**/*.jpg" clip.mp4 --vid-stride 10 \\
        --output runs/pred --save-txt
    python tools/predict.py --checkpoint det.pt --source aerial.tif --slice 512 --slice-overlap 0.25 --output o
    python tools/predict.py --checkpoint det.pt --source val/ --coco-json val.json --output o   # loadRes-ready

--checkpoint takes train_det/train_cls/train_loc checkpoints or files of tools/export.py (.onnx, .pt2,
TorchScript); the model's task decides what is predicted (boxes; top-k classes; top-k classes with a box).
Writes OUTPUT/predictions.json (a JSON list: file_name, frame for videos, category_id, category_name,
bbox as COCO xywh in original pixels, score; with --coco-json its image_id), OUTPUT/skipped.json (files
that could not be read, and why), OUTPUT/summary.json, OUTPUT/pictures/*.png and OUTPUT/labels/*.txt
(--save-txt: one line per box "category_id x1 y1 x2 y2 score"). predictions.json is rewritten atomically
as batches finish: an interrupted run leaves a valid file of what it finished. A bad file is skipped and
named at the end, never a crash. Exit codes: 0 done, 1 crash, 2 bad input (message names the file),
143 stopped by SIGTERM/Ctrl-C (predictions.json then holds what was finished).
"""
from __future__ import annotations

import argparse
import logging
import sys

from res_backbone.engine.run_config import tool_main

log = logging.getLogger("predict")


def build_parser() -> argparse.ArgumentParser:
    from heads.predict_run import add_running_args, add_tta_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--checkpoint", nargs="+", required=True,
                    help="model file(s): a train_*.py checkpoint, .onnx, .pt2 or TorchScript; several = an ensemble "
                         "(same task and classes)")
    io.add_argument("--source", nargs="+", required=True,
                    help="image files, folders, globs (quote them), .txt lists of paths (one a line) or videos")
    io.add_argument("--recursive", action="store_true", help="also take images in subfolders of folder sources")
    io.add_argument("--vid-stride", type=int, default=1, help="predict every N-th video frame (default 1)")
    io.add_argument("--output", required=True, help="folder for predictions.json, skipped.json, pictures/, labels/")
    io.add_argument("--coco-json", help="COCO annotations of the images: records get its image_id (matched by "
                                        "file_name) so pycocotools' loadRes reads predictions.json as is; images "
                                        "are then read as stored (no EXIF rotation) and taken in id order")
    io.add_argument("--max-pictures", type=int, default=16,
                    help="draw the answers on the first N images (default 16; detectors: the boxes scoring >= 0.3, "
                         "or --score-thresh if higher)")
    io.add_argument("--no-pictures", dest="max_pictures", action="store_const", const=0, help="draw no pictures")
    io.add_argument("--save-txt", action="store_true", help="also write labels/<image>.txt, one answer per line")
    m = p.add_argument_group("model")
    m.add_argument("--score-thresh", type=float, default=0.05,
                   help="drop detections scoring below this (default 0.05, low enough for COCO AP)")
    m.add_argument("--classes", nargs="+", help="keep only these classes (names or category ids; detectors)")
    m.add_argument("--max-dets", type=int, help="keep the best N detections per image (default: all the model gives)")
    m.add_argument("--topk", type=int, default=5, help="classes per image for classifiers/localizers (default 5)")
    m.add_argument("--image-size", type=int, help="longer side (detectors) or side images are resized to "
                                                  "(default: the training size stored in the model file)")
    add_tta_args(m)
    m.add_argument("--slice", type=int, metavar="PX",
                   help="sliced prediction for very large images: square tiles of PX original pixels (e.g. the "
                        "training size), predicted in batches and merged so objects on seams count once")
    m.add_argument("--slice-overlap", type=float, default=0.2,
                   help="fraction of a tile its neighbours overlap (default 0.2; >= object size / tile size)")
    m.add_argument("--slice-full", action="store_true", help="with --slice: also one pass over the whole image "
                                                             "(objects larger than a tile)")
    r = p.add_argument_group("running")
    add_running_args(r)
    return p


def main(argv=None) -> int:
    return tool_main(build_parser(), _predict, log, argv)


def _predict(args: argparse.Namespace) -> int:
    import signal

    from heads.predict_run import PredictConfig, run_prediction
    from res_backbone.engine.runner import Preempted

    def stop(signum, frame):  # predictions.json is flushed on the way out; exit code 143
        raise Preempted(f"stopped by signal {signum}: {args.output}/predictions.json holds the images finished")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    s = run_prediction(PredictConfig(**vars(args)))
    what = {"detection": "detections", "classification": "classified images", "localization": "localized images"}
    print(f"{s['images']} image(s), {s['records']} {what[s['task']]} in {s['seconds']:.1f} s "
          f"({s['img_per_s'] or 0:.1f} img/s; the model waited for images {100 * (s['wait_share'] or 0):.1f}% "
          f"of the time)  ->  {s['output']}/predictions.json")
    if s["skipped"]:
        print(f"skipped {len(s['skipped'])} file(s) (listed in {s['output']}/skipped.json):")
        for sk in s["skipped"][:20]:
            print(f"  {sk['file_name']}: {sk['error']}")
        if len(s["skipped"]) > 20:
            print(f"  ... and {len(s['skipped']) - 20} more")
    if not s["images"]:
        log.error("no image could be predicted (%d skipped)", len(s["skipped"]))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
