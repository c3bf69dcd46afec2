#!/usr/bin/env python
"""Check every image of a COCO json or an image folder before training: the training tools' pre-flight check alone.

    python tools/check_images.py --json train.json --images train/ --output runs/check
    python tools/check_images.py --folder data/train --mode full              # ImageFolder tree, every pixel

Reports every bad file at once, grouped by kind (missing, empty, outside_root, undecodable, truncated,
size_mismatch), writes the full list to OUTPUT/bad_images.json and caches the results in
OUTPUT/preflight_cache.json (by path, size and mtime), so a second run over the same files is instant.
Prints how long the check took per 1,000 images. Exit codes: 0 all good, 2 bad images (or bad arguments).
"""
from __future__ import annotations

import argparse
import logging
import sys

from res_backbone.engine.run_config import run_tool

log = logging.getLogger("check_images")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="COCO annotations whose images to check (with --images)")
    p.add_argument("--images", help="folder the json's file_name entries are relative to")
    p.add_argument("--folder", help="an ImageFolder tree (<folder>/<class>/<images>) instead of a json")
    p.add_argument("--mode", default="header", choices=("header", "full"),
                   help="header: exists, header decodes, size matches the json, JPEG/PNG not cut short (default); "
                        "full: decode every pixel")
    p.add_argument("--output", required=True, help="folder for bad_images.json and the cache")
    p.add_argument("--workers", type=int, default=8, help="reader threads (default 8)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    if bool(args.folder) == bool(args.json and args.images):
        build_parser().error("give --json with --images, or --folder")
    return run_tool(lambda: _check(args), log)


def _check(args: argparse.Namespace) -> int:
    from res_backbone.data import CocoDetection
    from res_backbone.data.classification import ImageFolderClassification
    from res_backbone.data.preflight import preflight

    ds = ImageFolderClassification(args.folder) if args.folder else CocoDetection(args.json, args.images, None)
    report = preflight({"images": ds}, mode=args.mode, policy="error", output=args.output, workers=args.workers,
                       progress=args.progress)
    per_k = 1000 * report.seconds / max(1, report.checked)
    print(f"{report.checked} images OK ({report.mode} mode, {report.from_cache} from the cache): "
          f"{report.seconds:.2f} s, {per_k:.2f} s per 1,000 images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
