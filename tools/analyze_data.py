#!/usr/bin/env python
"""Know a COCO detection set before training on it: classes, boxes, sizes at the training size, anchor coverage.

    python tools/analyze_data.py --json train.json --images train/ --output runs/analysis
    python tools/analyze_data.py --json train.json --images train/ --config configs/det/demo.yaml --output o
    python tools/analyze_data.py --json train.json --images train/ --backbone resnet50 --image-size 800 \\
        --anchor-sizes 16 32 64 128 256 --output o

Reports images and boxes per class, boxes per image, box sizes (COCO small/medium/large, and sqrt(area) after
the training resize: longer side -> --image-size), aspect ratios, boxes at the image borders, empty images,
duplicated boxes, image files whose size differs from the json (headers only, nothing decoded), and the anchor
coverage of the detector the model flags describe: the share of boxes whose best anchor has IoU >= 0.5 and >= 0.7
(the RPN's positive threshold), per size bucket, for the current anchors and for anchors fitted to the data
(what train_det.py --anchor-sizes auto --aspect-ratios auto would choose). Prints a table and concrete advice.

Writes into --output: analysis.json (every number), sizes.png, aspect.png, coverage.png.
The json is read by the training reader (res_backbone/data/coco.py): bad input gives its errors.
Exit codes: 0 done, 2 bad arguments or input (missing or malformed json), 1 unexpected error.
"""
from __future__ import annotations

import argparse
import logging
import sys

from heads.detection.anchor_fit import add_anchor_args, anchor_kwargs, number_or_auto
from res_backbone.engine.run_config import run_tool

log = logging.getLogger("analyze_data")
MODEL_KEYS = ("backbone", "arch", "image_size", "anchor_sizes", "aspect_ratios")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="COCO annotations to analyse (e.g. the training split)")
    p.add_argument("--images", required=True, help="folder the json's file_name entries are relative to")
    p.add_argument("--output", required=True, help="folder for analysis.json and the plots")
    g = p.add_argument_group("detector (as train_det.py; flags override --config)")
    g.add_argument("--config", help="a train_det.py YAML (configs/det/*.yaml or a run's config.yaml): its backbone, "
                                    "arch, image_size, anchor_sizes and aspect_ratios are used, other keys ignored")
    g.add_argument("--backbone", default=None, help="registered backbone name (default resnet50): sets the strides")
    g.add_argument("--arch", default=None, choices=("fpn", "c4"), help="fpn (P2-P6) or c4 (res4) (default fpn)")
    g.add_argument("--image-size", type=number_or_auto, default=None,
                   help="training size: the longer image side after resizing (default 512); 'auto': the suggested one")
    add_anchor_args(g)
    p.add_argument("--no-image-check", dest="check_files", action="store_false",
                   help="skip reading the image headers (sizes against the json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the box sample the anchors are fitted on (default 0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


def resolve_model_flags(args: argparse.Namespace) -> dict:
    """The detector options: flags, else --config's values, else train_det.py's defaults."""
    from res_backbone.engine.config import load_yaml

    given = load_yaml(args.config) if args.config else {}
    opts = {"backbone": "resnet50", "arch": "fpn", "image_size": 512, "anchor_sizes": None, "aspect_ratios": None}
    for key in MODEL_KEYS:
        flag = getattr(args, key)
        value = flag if flag is not None else given.get(key, opts[key])
        if key in ("anchor_sizes", "aspect_ratios") and value is not None and flag is None:
            value = value if isinstance(value, list) else [value]
        opts[key] = number_or_auto(value) if key == "image_size" else value
    opts.update(anchor_kwargs(opts.pop("anchor_sizes"), opts.pop("aspect_ratios"), opts["arch"]))
    for key in ("anchor_sizes", "aspect_ratios"):
        if opts.get(key) == "auto":  # the analysis fits them anyway; compare with the defaults
            opts.pop(key)
    return opts


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _analyze(args), log)


def _analyze(args: argparse.Namespace) -> int:
    from heads.detection.data_report import analyze_data

    report = analyze_data(args.json, args.images, args.output, check_files=args.check_files, progress=args.progress,
                          seed=args.seed, **resolve_model_flags(args))
    print("\n".join(report["lines"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
