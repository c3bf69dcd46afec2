#!/usr/bin/env python
"""Model summary and speed comparison against torchvision and timm.

    python tools/bench.py summary --output summary.json
    python tools/bench.py backbone --models resnet50 --repeats 7 --output docs/bench_cpu.json
    python tools/bench.py report docs/bench_cpu.json > tables.md
    python tools/bench.py detector --models resnet18,resnet50 --image-size 512 --output det_bench.json
    python tools/bench.py deploy --checkpoint runs/demo/checkpoint_best.pt --files runs/demo/model.onnx --sizes 160,512
    python tools/bench.py deploy --models resnet18,resnet50 --sizes 512,800 --repeats 5 --threads 2

``summary`` prints parameters and multiply-adds of every registered model for both bottleneck
stride placements; ``report`` turns a ``backbone`` JSON into markdown tables. ``backbone`` times inference and one training step of torchvision's, timm's and
our same-depth ResNet in one process, each library in NCHW and in channels-last, and splits our gain
into memory format and BatchNorm folding (see :mod:`studies.bench_backbone` for the protocol).
``detector`` exits 1 when float32 detections differ from torchvision's beyond the stated tolerance
(:mod:`studies.bench_detector`).
"""
from __future__ import annotations

import argparse

from studies.bench_commands import (_csv, cmd_architectures, cmd_backbone, cmd_deploy, cmd_detector, cmd_report,
                                   cmd_summary)
from studies.timing import AMP_DTYPES


def _timing_args(p: argparse.ArgumentParser, *, models: str, image_size: int, train_batch_size: int) -> None:
    """The flags 'backbone' and 'detector' share (what to build, how to time it)."""
    p.add_argument("--models", type=_csv(str), default=models.split(","),
                   help=f"comma-separated ResNets provided by every library (default {models})")
    p.add_argument("--image-size", type=int, default=image_size, help=f"square input side (default {image_size})")
    p.add_argument("--train-batch-size", type=int, default=train_batch_size,
                   help=f"batch of the timed training step (default {train_batch_size})")
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per contender and setting; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per contender and setting first (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none",
                   help="autocast dtype for every contender, inference and training (default none = fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0 = torch's default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("summary", help="parameters and multiply-adds of every registered model")
    s.add_argument("--models", type=_csv(str), default=None,
                   help="comma-separated model names (default: every registered model)")
    s.add_argument("--image-size", type=int, default=224, help="square input side for multiply-adds (default 224)")
    s.add_argument("--output", metavar="FILE.json", help="also write the numbers to this JSON file")
    s.set_defaults(func=cmd_summary)

    b = sub.add_parser(
        "backbone", help="img/s of torchvision's, timm's and our ResNet, interleaved in one run",
        description="Times eval inference at each --batch-sizes and one SGD training step; contenders run "
                    "interleaved and the median over --repeats is reported. Every library runs NCHW and "
                    "channels-last (torchvision_cl, timm_cl, ours_cl); 'ours' is prepare_for_inference(model) (BN "
                    "folded, channels-last), 'ours_eager' our model run like the baselines (eval, inference_mode, "
                    "NCHW). The attribution lines split ours / ours_eager into memory format and BN folding.",
    )
    _timing_args(b, models="resnet50", image_size=224, train_batch_size=8)
    b.add_argument("--batch-sizes", type=_csv(int), default=[1, 8], help="inference batch sizes (default 1,8)")
    b.add_argument("--ablation", action="store_true",
                   help="also time ours_fold (BN folded, NCHW input) and ours_fused (ours + ReLU/residual "
                        "add fused into the convs, prepare_for_inference(fuse=True)): what each step buys")
    b.add_argument("--output", metavar="FILE.json", help="write results, ratios and environment to this JSON file")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b.set_defaults(func=cmd_backbone)

    d = sub.add_parser(
        "detector", help="Faster R-CNN-FPN: ours vs torchvision's, same depth and weights, interleaved",
        description="Times inference and one SGD training step of torchvision's FasterRCNN (resnet_fpn_backbone, "
                    "frozen BN, min_size=max_size=--image-size, its transform included) and ours with the same "
                    "weights (converted); 'ours' is res_backbone.prepare_for_inference (BN folded, channels-last), "
                    "'ours_eager' our model as is. In float32 it checks the detections against torchvision's and "
                    "exits 1 beyond the stated tolerance; under --amp it reports each contender's difference from "
                    "its own float32 result.",
    )
    _timing_args(d, models="resnet18,resnet50", image_size=512, train_batch_size=2)
    d.add_argument("--batch-size", type=int, default=1, help="inference batch (default 1)")
    d.add_argument("--num-classes", type=int, default=80, help="foreground classes (default 80)")
    d.add_argument("--roi-align", choices=("auto", "bag", "torchvision"), default="auto",
                   help="our RoIAlign: 'bag' (fused embedding-bag gather, heads/detection/roi_align.py), "
                        "'torchvision' (torchvision.ops.roi_align per level), 'auto' = bag on CPU, torchvision's "
                        "kernel elsewhere (default auto)")
    d.add_argument("--count-ops", action="store_true",
                   help="also run each contender once under an operator counter: ATen operators dispatched per "
                        "call (views and allocations left out) and host-device syncs among them. At batch 1 a GPU "
                        "is bound by these launches, so their ratio predicts the GPU speed-up on any machine")
    d.add_argument("--count-only", action="store_true",
                   help="--count-ops without the timings (seconds instead of minutes): e.g. '--count-only --roi-align "
                        "torchvision --amp bf16' on a CPU counts what a GPU run would launch")
    d.add_argument("--output", metavar="FILE.json", help="write results, ratios, equivalence and environment here")
    d.set_defaults(func=cmd_detector)

    e = sub.add_parser("deploy", help="a detector's latency through every way of running it, against torchvision",
                       description="--checkpoint: times one image per call through a trained detector as trained, its "
                                   "inference copy and each --files export (onnxruntime CPU, .pt2, TorchScript). "
                                   "--models: builds torchvision's FasterRCNN and ours with the same weights for each "
                                   "depth and times torchvision (NCHW and channels-last), ours as built, its inference "
                                   "copy, torch.compile of it, its ONNX file in onnxruntime and that file quantized to "
                                   "int8; every contender's detections are compared with torchvision's. Interleaved, "
                                   "with the share of this machine's fp32 peak (torch.mm) each reaches.")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a train_det.py checkpoint")
    src.add_argument("--models", type=_csv(str), help="comma-separated ResNet depths, e.g. resnet18,resnet50 "
                                                      "(random weights shared with torchvision's model)")
    e.add_argument("--files", nargs="*", default=[], help="with --checkpoint: its exported files (tools/export.py)")
    e.add_argument("--sizes", type=_csv(int), default=[512, 800], help="square input sides (default 512,800)")
    e.add_argument("--repeats", type=int, default=15, help="timed calls per contender and size (default 15)")
    e.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    e.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0 = torch's default)")
    e.add_argument("--no-compile", action="store_true", help="with --models: leave out the torch.compile row")
    e.add_argument("--no-int8", action="store_true", help="with --models: leave out the int8 onnxruntime row")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.add_argument("--workdir", default=".cache/bench_deploy",
                   help="with --models: where the ONNX files are written (default .cache/bench_deploy)")
    e.add_argument("--output", metavar="FILE.json", help="write the rows and the environment here")
    e.set_defaults(func=cmd_deploy)

    a = sub.add_parser("architectures", help="the ResNet paper's VGG-19 / plain-34 / ResNet-34 comparison",
                       description="Parameters, multiply-adds (conv + FC, one 224x224 image), depth and measured "
                                   "throughput of VGG-19, the 34-layer plain net and ResNet-34, the bottleneck's saving "
                                   "(paper Fig. 5), and with --train-minutes a training comparison of the three on "
                                   "Fashion-MNIST at equal training time (docs/architectures.md).")
    a.add_argument("--image-size", type=int, default=224, help="input side of the table (default 224, the paper's)")
    a.add_argument("--vgg-bn", action="store_true", help="VGG-19 with BatchNorm (torchvision's vgg19_bn) in the table")
    a.add_argument("--batch-size", type=int, default=8, help="batch of the timed forward and training step (default 8)")
    a.add_argument("--repeats", type=int, default=3, help="timed calls per network and mode; median (default 3)")
    a.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    a.add_argument("--no-channels-last", action="store_true", help="time in NCHW instead of channels-last")
    a.add_argument("--no-time", action="store_true", help="counts only: leave out the throughput columns")
    a.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0 = torch's default)")
    a.add_argument("--train-minutes", type=float, default=0.0,
                   help="train each network this many minutes on Fashion-MNIST, interleaved (default 0: no training)")
    a.add_argument("--train-size", type=int, default=32, help="training image side (default 32: VGG's five poolings "
                                                               "leave 1x1)")
    a.add_argument("--train-limit", type=int, help="use only the first N training images (default all 60,000)")
    a.add_argument("--test-limit", type=int, default=2000, help="test images per evaluation (default 2000)")
    a.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of the training comparison (default 0.05)")
    a.add_argument("--evals", type=int, default=8, help="points per training curve (default 8)")
    a.add_argument("--fmnist-root", help="Fashion-MNIST folder (default: $FASHION_MNIST_ROOT or the Debian package's)")
    a.add_argument("--plot", metavar="FILE.png", help="training and test error curves (with --train-minutes)")
    a.add_argument("--markdown", metavar="FILE.md", help="write the tables as markdown here")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a.add_argument("--output", metavar="FILE.json", help="write one record per network, the blocks and the curves here")
    a.set_defaults(func=cmd_architectures)

    r = sub.add_parser("report", help="print the markdown tables of a 'backbone --output' JSON file")
    r.add_argument("json", metavar="FILE.json", help="a JSON file written by 'bench.py backbone --output'")
    r.set_defaults(func=cmd_report)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
