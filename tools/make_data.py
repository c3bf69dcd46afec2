#!/usr/bin/env python
"""Render the built-in data sets in COCO layout (same seed and arguments -> byte-identical files).

    python tools/make_data.py shapes --out data/shapes                      # synthetic shapes (detection)
    python tools/make_data.py fmnist-loc --out data/fmnist_loc              # one Fashion-MNIST item per canvas
    python tools/make_data.py fmnist-det --out data/fmnist_det --num-train 2000 --num-val 150   # 1-4 test-split items

Each writes ``out/{train,val}/NNNNNN.png`` and ``out/annotations/instances_{train,val}.json`` and
reuses a finished set made with the same arguments (``--force`` regenerates). The Fashion-MNIST sets
read the idx files from --root (default ``$RB_FASHION_MNIST`` or /usr/share/datasets/fashion-mnist).

Exit codes: 0 done, 2 bad arguments or Fashion-MNIST not found.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from res_backbone.data.detection_fmnist import write_fmnist_detection
from res_backbone.data.fashion_mnist import FashionMNISTNotFoundError
from res_backbone.data.localization_fmnist import write_fmnist_localization
from res_backbone.data.synthetic import SHAPES, make_synthetic_coco


def _common(p: argparse.ArgumentParser, num_train: int, num_val: int, fmnist: bool) -> None:
    p.add_argument("--out", required=True, help="output folder")
    if fmnist:
        p.add_argument("--root", help="Fashion-MNIST folder (default: $RB_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--num-train", type=int, default=num_train, help=f"training images (default {num_train})")
    p.add_argument("--num-val", type=int, default=num_val, help=f"validation images (default {num_val})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="regenerate even if a matching set exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("shapes", help="synthetic shapes on textured backgrounds (res_backbone.data.synthetic)")
    _common(s, 1000, 200, fmnist=False)
    s.add_argument("--image-size", type=int, default=160, help="nominal image side in px (default 160)")
    s.add_argument("--num-classes", type=int, default=5, help=f"shape classes, 1..{len(SHAPES)} (default 5)")
    loc = sub.add_parser("fmnist-loc", help="one Fashion-MNIST item per textured canvas (localization)")
    _common(loc, 30000, 2000, fmnist=True)
    loc.add_argument("--canvas", type=int, default=64, help="canvas side in px (default 64)")
    loc.add_argument("--scale", type=float, nargs=2, default=[28.0, 56.0], metavar=("MIN", "MAX"),
                     help="side of the item's 28 px frame after scaling, px (default 28 56)")
    det = sub.add_parser("fmnist-det", help="1..--max-items Fashion-MNIST test-split items per canvas (detection)")
    _common(det, 2000, 200, fmnist=True)
    det.add_argument("--canvas", type=int, default=128, help="canvas side in px (default 128)")
    det.add_argument("--scale", type=float, nargs=2, default=[24.0, 56.0], metavar=("MIN", "MAX"),
                     help="side of an item's 28 px frame after scaling, px (default 24 56)")
    det.add_argument("--max-items", type=int, default=4, help="items per canvas: 1..this (default 4)")
    return parser


def make(args: argparse.Namespace) -> dict:
    """Render the set ``args.command`` names; return its paths."""
    common = dict(num_train=args.num_train, num_val=args.num_val, seed=args.seed, reuse=not args.force)
    if args.command == "shapes":
        return make_synthetic_coco(args.out, image_size=args.image_size, num_classes=args.num_classes, **common)
    if args.command == "fmnist-loc":
        return write_fmnist_localization(args.out, root=args.root, canvas=args.canvas, scale=args.scale, **common)
    return write_fmnist_detection(args.out, root=args.root, canvas=args.canvas, scale=args.scale,
                                  max_items=args.max_items, **common)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        paths = make(args)
    except (FashionMNISTNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.1f}s")
    for k, v in paths.items():
        print(f"  {k:12s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
