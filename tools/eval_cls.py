#!/usr/bin/env python
"""Top-1/top-5 error of classification checkpoints under the ResNet paper's testing protocols.

    python tools/eval_cls.py --checkpoint runs/cls/resnet20/checkpoint_best.pt
    python tools/eval_cls.py --checkpoint a.pt b.pt c.pt --protocol 10crop,multiscale   # + the ensemble row
    python tools/eval_cls.py --checkpoint in1k.pt --val-dir imagenet/val --scales 224,256,384,480,640

Protocols (res_backbone.evaluation.classification): "center" (one crop), "10crop" (four corners,
centre and their mirrors, softmax averaged), "multiscale" (fully convolutional: shorter side resized
to each of --scales, the classifier as a 1x1 convolution over the last feature map, softmax averaged
over positions and scales). Several checkpoints also give an "ensemble" row (mean softmax).

Sizes default to the paper's scaled to the checkpoint's training size t = pretrained_cfg input_size:
crop t, 10-crop source round(t * 256/224), scales round(s * t/224) for s in 224,256,384,480,640
(for Fashion-MNIST's 28: crop 28, source 32, scales 28,32,48,60,80). Data: the Fashion-MNIST test
split (--data-dir), whose 10-crop source is the image zero-padded to 32 like the training crops, or
an ImageFolder tree (--val-dir), whose images are resized and centre-cropped to a square of the
largest size any protocol needs, then resized per protocol. Prints a markdown table and writes
eval_cls.json into --output (default: the first checkpoint's folder). Exit codes: 0 done, 1 unexpected error, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from res_backbone.engine.run_config import run_tool

log = logging.getLogger("eval_cls")


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _protocol_list(text: str) -> List[str]:
    from res_backbone.evaluation.classification import check_protocols

    try:
        return check_protocols(v for v in text.replace(" ", "").split(",") if v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="one or more train_cls.py checkpoints (several: also their ensemble; same classes and "
                        "normalisation required)")
    p.add_argument("--protocol", type=_protocol_list, default=["center", "10crop", "multiscale"],
                   help="comma-separated protocols from center,10crop,multiscale (default: all three)")
    p.add_argument("--scales", type=_int_list,
                   help="shorter sides for multiscale, e.g. 28,32,48,60,80 (default: 224,256,384,480,640 x t/224)")
    p.add_argument("--crop", type=int, help="center / 10-crop view size (default: the training size t)")
    p.add_argument("--resize", type=int, help="size of the image the center / 10-crop views are cut from "
                                              "(default: round(t * 256/224))")
    p.add_argument("--resize-mode", choices=("pad", "resize"),
                   help="how that image is made: 'pad' = zero-pad to --resize (default for Fashion-MNIST: the "
                        "views are the shifts of pad-4 crop training, section 4.2), 'resize' = shorter side to "
                        "--resize (default for --val-dir)")
    p.add_argument("--average", choices=("probs", "logits"), default="probs",
                   help="multiscale: 'probs' = softmax at every position, then the mean (default, the paper's "
                        "score averaging); 'logits' = mean logits per scale, then softmax (= global pooling)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $RB_FASHION_MNIST or the installed package)")
    p.add_argument("--val-dir", help="evaluate on this ImageFolder tree (root/<class>/<image>) instead")
    p.add_argument("--limit", type=int, help="evaluate on the first N images only (a quick run)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per batch (10-crop runs 10x as many views; default 256)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0; use 4+ with --val-dir)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (torch.set_num_threads; default 0 = torch's default). On a busy machine 1 "
                        "is often faster")
    p.add_argument("--no-ensemble", dest="ensemble", action="store_false",
                   help="with several checkpoints, skip the ensemble row")
    p.add_argument("--output", help="folder for eval_cls.json (default: the first checkpoint's folder)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


def _row_names(paths: Sequence[str]) -> List[str]:
    """Short unique names for the table: file names, with parent folders added until unique."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _check_compatible(paths: Sequence[str], models) -> Optional[str]:
    """Why the checkpoints cannot share one data pipeline / ensemble, or None."""
    ref = models[0].pretrained_cfg
    for path, m in zip(paths[1:], models[1:]):
        cfg = m.pretrained_cfg
        for key in ("mean", "std"):
            if [float(v) for v in cfg.get(key, ())] != [float(v) for v in ref.get(key, ())]:
                return f"{path} normalises with {key}={cfg.get(key)}, {paths[0]} with {ref.get(key)}"
        if m.num_classes != models[0].num_classes:
            return f"{path} has {m.num_classes} classes, {paths[0]} has {models[0].num_classes} classes"
        if m.in_chans != models[0].in_chans:
            return f"{path} takes {m.in_chans} input channels, {paths[0]} takes {models[0].in_chans}"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _evaluate(args), log)


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from heads.classification import load_classifier
    from res_backbone.data.classification import ClassificationDataError, build_cls_datasets
    from res_backbone.data.fashion_mnist import FashionMNISTNotFoundError
    from res_backbone.engine.checkpoint import atomic_write_text
    from res_backbone.evaluation.classification import (
        collect_protocol_probs, default_protocol_sizes, errors_from_probs, markdown_table,
    )
    from res_backbone.weights.files import CheckpointMismatchError

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        loaded = [load_classifier(p, map_location=device) for p in args.checkpoint]
    except (FileNotFoundError, CheckpointMismatchError, ValueError, RuntimeError) as e:
        log.error("%s", e)
        return 2
    models = [m for m, _ in loaded]
    problem = _check_compatible(args.checkpoint, models)
    if problem:
        log.error("checkpoints cannot be evaluated together: %s", problem)
        return 2
    cfg, meta = models[0].pretrained_cfg, loaded[0][1]
    train_size = int(cfg.get("input_size", (3, 224, 224))[-1])
    defaults = default_protocol_sizes(train_size)
    crop = args.crop or defaults["crop"]
    resize = args.resize or defaults["resize"]
    scales = args.scales or defaults["scales"]
    mode = args.resize_mode or ("resize" if args.val_dir else "pad")
    mean, std = [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]
    in_chans = models[0].in_chans
    classes = meta.get("classes")
    # The largest image any protocol cuts or resizes from: ImageFolder images are loaded at that square size.
    load_size = max([resize, crop] + (list(scales) if "multiscale" in args.protocol else []))
    try:
        data = build_cls_datasets(data_dir=args.data_dir, val_dir=args.val_dir, in_chans=in_chans, train=False,
                                  limit_val=args.limit, mean=mean, std=std, resize=load_size, crop=load_size,
                                  classes=classes if args.val_dir else None,
                                  interpolation=cfg.get("interpolation", "bilinear"))
    except (FileNotFoundError, ClassificationDataError, ValueError) as e:  # FashionMNISTNotFoundError included
        hint = "" if not isinstance(e, FashionMNISTNotFoundError) else " (or pass --val-dir)"
        log.error("%s%s", e, hint)
        return 2
    if len(data.classes) != models[0].num_classes:
        log.error("the data has %d classes (%s) but the classifier of %s has num_classes=%d: evaluate it on data "
                  "with its classes, or fine-tune it first (tools/train_cls.py --pretrained %s, which starts a "
                  "new %d-class classifier)", len(data.classes), args.val_dir or "Fashion-MNIST", args.checkpoint[0],
                  models[0].num_classes, args.checkpoint[0], len(data.classes))
        return 2
    loader = torch.utils.data.DataLoader(data.val, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers)
    names = _row_names(args.checkpoint)
    fill = [(0.0 - m) / s for m, s in zip(data.mean, data.std)]  # a black pixel, as the training padding
    probs, labels, sizes = collect_protocol_probs(
        dict(zip(names, models)), loader, args.protocol, crop=crop, resize=resize, scales=scales, source_mode=mode,
        fill=fill, average=args.average, interpolation=cfg.get("interpolation", "bilinear"), device=device,
        progress=args.progress,
    )
    results = errors_from_probs(probs, labels, ensemble=args.ensemble)
    table = markdown_table(results)
    print(table)
    out_dir = Path(args.output) if args.output else Path(args.checkpoint[0]).resolve().parent
    report = {
        "checkpoints": {name: {"path": str(path), "model_name": m.get("model_name"), "epoch": m.get("epoch"),
                               "iter": m.get("iter"), "train_metrics": m.get("metrics")}
                        for name, path, (_, m) in zip(names, args.checkpoint, loaded)},
        "data": {"source": args.val_dir or "fashion_mnist_test", "n_images": int(labels.numel()),
                 "classes": data.classes, "mean": list(data.mean), "std": list(data.std)},
        "protocols": {"names": list(args.protocol), "train_size": train_size, **sizes,
                      "interpolation": cfg.get("interpolation", "bilinear"), "fill": fill, "load_size": load_size},
        "results": results,
        "table": table,
    }
    path = atomic_write_text(json.dumps(report, indent=2) + "\n", out_dir / "eval_cls.json")
    log.info("%d images, %d checkpoint(s) -> %s", labels.numel(), len(models), path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
