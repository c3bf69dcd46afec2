#!/usr/bin/env python
"""Export a trained model to ONNX, torch.export (.pt2) or TorchScript, then check the file against PyTorch.

    python tools/export.py --checkpoint runs/demo/checkpoint_best.pt --format onnx --output model.onnx
    python tools/export.py --checkpoint runs/cls/checkpoint_best.pt --format torchscript --output cls.ts
    python tools/export.py --checkpoint runs/demo/checkpoint_best.pt --what backbone --format pt2 --output feats.pt2

Detectors (FPN or C4) carry decoding, NMS and top-k inside the graph; height and width are dynamic in every
file, the batch too except for detectors (one image per call). The class list (ids and names), mean/std,
trained size and input contract are stored in the file, so tools/predict.py needs nothing else. TorchScript is
offered for classifiers, localizers and backbones (traced), not for detectors.

After writing, the file runs on real images next to the eager model (the checkpoint's val images, else
--verify-images; each at two sizes, plus a uniform grey image, where a detector usually finds nothing) and the
largest differences are printed and written to OUTPUT.verify.json. Exit codes: 0 done and verified, 1 the file
differs (labels, boxes by more than --box-tol px or scores by more than --score-tol), 2 bad input or arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from res_backbone.engine.run_config import tool_main

log = logging.getLogger("export")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train_det.py, train_cls.py or train_loc.py checkpoint")
    p.add_argument("--format", required=True, choices=("onnx", "pt2", "torchscript"), help="the file format")
    p.add_argument("--output", required=True, help="the file to write (e.g. model.onnx, model.pt2, model.ts)")
    p.add_argument("--what", default="model", choices=("model", "backbone"),
                   help="model: the whole task model (default); backbone: its feature extractor (one output per level)")
    p.add_argument("--verify-images", help="a folder of images to verify on (default: the checkpoint's val images)")
    p.add_argument("--verify-count", type=int, default=4, help="images verified on (default 4)")
    p.add_argument("--box-tol", type=float, default=1e-3, help="largest box difference allowed, px (default 1e-3)")
    p.add_argument("--score-tol", type=float, default=1e-4, help="largest score difference allowed (default 1e-4)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="write the file without checking it")
    return p


def main(argv=None) -> int:
    return tool_main(build_parser(), _export, log, argv)


def _images(args, ckpt_config: dict):
    from res_backbone.data.classification import IMG_EXTENSIONS

    folder = args.verify_images or ckpt_config.get("val_images") or ckpt_config.get("val_dir")
    if not folder or not Path(folder).is_dir():
        raise ValueError(f"nothing to verify on: the checkpoint names no val images ({folder!r}); pass "
                         "--verify-images DIR (or --no-verify)")
    files = sorted(f for f in Path(folder).rglob("*") if f.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no images to verify on")
    return files[: args.verify_count]


def _export(args: argparse.Namespace) -> int:
    import torch

    from heads.export import compare, export_model, graph_module, load_checkpoint_model, verification_batches
    from heads.exported import load_exported
    from res_backbone.io import atomic_write_text

    model, meta = load_checkpoint_model(args.checkpoint, args.what)
    path = export_model(model, meta, args.format, args.output)
    log.info("wrote %s (%s, %s, %.1f MB)", path, args.format, meta["task"], path.stat().st_size / 2**20)
    if not args.verify:
        return 0
    exported = load_exported(path)
    config = torch.load(args.checkpoint, map_location="cpu", weights_only=True).get("config") or {}
    batches = verification_batches(exported.meta, _images(args, config))
    eager = graph_module(model, meta).model  # what was exported (a detector's inference copy)
    report = compare(eager, exported, batches, meta)
    failed = (not report["labels_equal"] or report["max_box_px"] > args.box_tol
              or report["max_score"] > args.score_tol or report["max_abs"] > args.score_tol)
    report.update(passed=not failed, box_tol=args.box_tol, score_tol=args.score_tol, format=args.format,
                  checkpoint=str(args.checkpoint))
    atomic_write_text(json.dumps(report, indent=2) + "\n", Path(str(path) + ".verify.json"))
    print(f"verified {report['cases']} input(s) against PyTorch: labels {'equal' if report['labels_equal'] else 'DIFFER'}, "
          f"max box diff {report['max_box_px']:.2e} px, max score diff {report['max_score']:.2e}, max output diff "
          f"{report['max_abs']:.2e}; {report['zero_detection_images']} input(s) with zero detections  ->  "
          f"{'OK' if not failed else 'FAILED'}")
    for err in report.get("errors", []):
        log.error("%s", err)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
