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

from res_backbone.engine.run_config import add_image_check_args, run_tool

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
    add_image_check_args(p, training=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _evaluate(args), log)


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from heads.classification.evaluate import ProtocolOptions, evaluate_checkpoints
    from res_backbone.io import atomic_write_text

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output) if args.output else Path(args.checkpoint[0]).resolve().parent
    options = ProtocolOptions(protocols=args.protocol, scales=args.scales, crop=args.crop, resize=args.resize,
                              resize_mode=args.resize_mode, average=args.average)
    report = evaluate_checkpoints(args.checkpoint, options, data_dir=args.data_dir, val_dir=args.val_dir,
                                  limit=args.limit, batch_size=args.batch_size, workers=args.workers,
                                  device=args.device, ensemble=args.ensemble, progress=args.progress,
                                  check_images=args.check_images, on_bad_image=args.on_bad_image, output=str(out_dir))
    print(report["table"])
    path = atomic_write_text(json.dumps(report, indent=2) + "\n", out_dir / "eval_cls.json")
    log.info("%d images, %d checkpoint(s) -> %s", report["data"]["n_images"], len(args.checkpoint), path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
