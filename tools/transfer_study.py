#!/usr/bin/env python
"""The transfer study: does Fashion-MNIST pre-training help detection and localization at equal time?

    python tools/transfer_study.py --output docs/transfer --budget-minutes 45     # the study, ~45 min, 2-core CPU
    python tools/transfer_study.py --cls-checkpoint runs/fmnist_cls_r18/checkpoint_best.pt ...   # reuse step 1
    python tools/transfer_study.py --quick --fmnist-root /tmp/fake --output /tmp/ts    # smoke test, seconds
    python tools/transfer_study.py --curve --output docs/transfer --clock cpu     # data-efficiency curve (issue 18)
    python tools/transfer_study.py --probe-only --output /tmp/probe               # pre-training sources + probe only

--curve (``studies.transfer_curve``) instead pre-trains two sources (plain Fashion-MNIST; its train items
rendered like the detection canvases, ``res_backbone.data.pretrain_fmnist``), probes their frozen features
(linear and k-NN on true-box crops of the val canvases) and trains scratch / fine-tune-all / frozen-BN arms
on N target images with equal iterations: transfer_curve.json/.md/.png. --smoke runs it at tiny sizes.

1. Pre-training: a resnet18 classifier on the Fashion-MNIST *train* split (``cls_run``, grey input,
   --pretrain-iters iterations, images inverted with probability --pretrain-invert), or the given
   --cls-checkpoint.
2. Detection: canvases of 1-4 Fashion-MNIST *test-split* items on textured backgrounds
   (``res_backbone.data.detection_fmnist``; items never seen in pre-training; train and val canvases
   use disjoint items). A resnet18-FPN Faster R-CNN is trained in four arms (``transfer_study.ARMS``:
   from scratch; pretrained with frozen BN; pretrained, fine-tune all; pretrained with the backbone
   frozen for the first quarter) for the SAME training time each, COCO AP on the val canvases
   measured --num-evals times (evaluation time not counted).
3. Localization: the same four arms on the built-in single-object set (``localization_fmnist``:
   train-split items for training, unseen test-split items for validation), ILSVRC top-1
   localization error.

The grey classifier feeds RGB canvases through the pipeline of ``res_backbone.transfer``: first conv
``w/3`` per colour channel, the grey mean/std repeated. Budget: what --budget-minutes leaves after
step 1, less 15% kept for rendering, model building and evaluation, is split between the tasks
(--det-share, 70% detection) and equally between the arms: about 6.5 and 2.8 minutes of training per
detection and localization arm at the defaults; --det-minutes / --loc-minutes set them directly.
--clock cpu counts this process's CPU time instead of wall-clock (with --threads 1, about an idle
machine's wall-clock: for measuring on a machine other jobs share).

Writes into --output: transfer.json (every number, the options, timings, the machine),
transfer_det.png (AP against iterations and training minutes, one curve per arm), transfer_loc.png
(top-1 localization error likewise) and transfer.md (tables of the final numbers). Checkpoints of
step 1 go to --work-dir; rendered data to --data-dir (reused while its options match).

Exit codes: 0 done, 2 bad arguments or data not found.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from res_backbone.engine.config import opt_float
from studies.cli import setup_logging
from studies.transfer_study import ARMS, apply_quick, markdown_report, run_study

log = logging.getLogger("transfer_study")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--output", default="docs/transfer", help="folder for transfer.json/.md and the two PNGs (default docs/transfer)")
    a("--work-dir", default="runs/transfer", help="pre-training run folder (checkpoints; default runs/transfer)")
    a("--data-dir", default=".cache/transfer", help="where the detection and localization sets are rendered")
    a("--fmnist-root", default=None,
      help="Fashion-MNIST idx folder (default $RB_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    a("--cls-checkpoint", default=None, help="skip step 1: use this train_cls.py checkpoint (resnet18, grey)")
    a("--tasks", default="det,loc", help="comma-separated subset of det,loc (default both)")
    a("--arms", default=None,
      help="comma-separated subset of the arms (scratch, pretrained_frozen_bn, pretrained_finetune_all, "
           "pretrained_freeze_25); default all four")
    b = p.add_argument_group("budget")
    b.add_argument("--budget-minutes", type=float, default=45.0,
                   help="wall-clock target of the whole study, steps 1-3 with data and evaluation (default 45)")
    b.add_argument("--det-share", type=float, default=0.7, help="share of the arms' time for detection (default 0.7)")
    b.add_argument("--det-minutes", type=opt_float, default=None, help="training minutes per detection arm (overrides)")
    b.add_argument("--loc-minutes", type=opt_float, default=None, help="training minutes per localization arm (overrides)")
    b.add_argument("--num-evals", type=int, default=6, help="evaluations per arm, evenly spaced in time (default 6)")
    b.add_argument("--pretrain-iters", type=int, default=None,
                   help="step 1: classifier iterations, batch 64 (default 1500, ~3.7 min here with bf16; 400 with "
                        "--curve, fp32)")
    b.add_argument("--pretrain-invert", type=float, default=0.5,
                   help="step 1: probability of inverting a training image (default 0.5: the canvases hold items of "
                        "both polarities, see --det-dark-prob; 0 trains on Fashion-MNIST's bright-on-dark only)")
    d = p.add_argument_group("detection")
    d.add_argument("--det-train", type=int, default=2000, help="training canvases (default 2000)")
    d.add_argument("--det-val", type=int, default=150, help="validation canvases (default 150)")
    d.add_argument("--det-canvas", type=int, default=128, help="canvas side = detector input side (default 128)")
    d.add_argument("--det-scale", type=float, nargs=2, default=[24.0, 56.0], metavar=("MIN", "MAX"),
                   help="an item's 28 px frame is scaled to a side in [MIN, MAX] px (default 24 56)")
    d.add_argument("--det-dark-prob", type=float, default=0.5,
                   help="share of canvases with a dark background and bright items, Fashion-MNIST's polarity; the "
                        "others are light with dark items (default 0.5)")
    d.add_argument("--det-batch", type=int, default=8, help="images per iteration (default 8)")
    d.add_argument("--det-lr", type=float, default=0.02, help="SGD learning rate (default 0.02)")
    lo = p.add_argument_group("localization")
    lo.add_argument("--loc-train", type=int, default=10000, help="training images (default 10000)")
    lo.add_argument("--loc-val", type=int, default=1000, help="validation images (default 1000)")
    lo.add_argument("--loc-canvas", type=int, default=64, help="canvas side (default 64)")
    lo.add_argument("--loc-batch", type=int, default=64, help="images per iteration (default 64)")
    lo.add_argument("--loc-lr", type=float, default=0.002, help="AdamW learning rate (default 0.002)")
    r = p.add_argument_group("run")
    r.add_argument("--amp", default=None, choices=("none", "bf16"),
                   help="mixed precision (default bf16 for the equal-time study; none for --curve/--probe-only: "
                        "bf16 is ~8x slower than fp32 on CPUs without bf16 instructions)")
    r.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared 2-core CPU)")
    r.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and order (default 0)")
    r.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="what the per-arm budgets count: wall-clock seconds (default), or this process's CPU seconds "
                        "(with --threads 1 about an idle machine's wall-clock; for measuring on a shared machine)")
    r.add_argument("--quick", action="store_true",
                   help="tiny sizes and seconds-long budgets (a smoke test; numbers mean nothing)")
    c = p.add_argument_group("data-efficiency curve (--curve; issue 18)")
    c.add_argument("--curve", action="store_true",
                   help="run the data-efficiency study instead: pre-training sources, probe, curves -> "
                        "transfer_curve.json/.md/.png in --output")
    c.add_argument("--probe-only", action="store_true",
                   help="pre-train the sources (or reuse via --cls-checkpoint / --rendered-checkpoint) and print the "
                        "linear-probe and k-NN accuracies only (about a minute with both checkpoints given)")
    c.add_argument("--smoke", action="store_true", help="--curve at tiny sizes, seconds (the test suite's)")
    c.add_argument("--sources", default="fmnist,rendered",
                   help="pre-training sources: fmnist (plain grey Fashion-MNIST), rendered (train items rendered "
                        "like the canvases); default both")
    c.add_argument("--rendered-checkpoint", default=None, help="reuse this rendered-source checkpoint (skip its training)")
    c.add_argument("--render-canvases", type=int, default=3000,
                   help="canvases of train items rendered for the rendered source (~2.5 crops each; default 3000)")
    c.add_argument("--render-iters", type=int, default=800, help="rendered-source iterations (default 800)")
    c.add_argument("--render-batch", type=int, default=32, help="rendered-source batch (default 32)")
    c.add_argument("--probe-train", type=int, default=400,
                   help="target train canvases whose true-box crops fit the probes (default 400)")
    c.add_argument("--probe-size", type=int, default=48, help="true-box crops resized to this side, px, for the probe and the rendered source (default 48)")
    c.add_argument("--curve-arms", default=None,
                   help="comma-separated arms: scratch, {fmnist,rendered}_{finetune_all,frozen_bn}; default scratch, "
                        "fmnist_finetune_all, rendered_finetune_all, rendered_frozen_bn")
    c.add_argument("--curve-det-n", default="50,200,2000", help="detection training sizes N (canvases; default 50,200,2000)")
    c.add_argument("--curve-loc-n", default="50,200,2000", help="localization training sizes N (images; default 50,200,2000)")
    c.add_argument("--jobs", type=int, default=2,
                   help="runs side by side, each in its own process of --threads torch threads (default 2: the two "
                        "pre-training sources, then the curve's runs, two at a time on a 2-core CPU; 1 = one at a time "
                        "in this process)")
    c.add_argument("--curve-seeds", type=int, default=2, help="seeds per arm and N (default 2)")
    c.add_argument("--curve-iters", type=int, default=None,
                   help="iterations of every run of both tasks (overrides the two below)")
    c.add_argument("--curve-det-iters", type=int, default=300,
                   help="detection iterations per run, the same for every arm and N (default 300)")
    c.add_argument("--curve-loc-iters", type=int, default=160,
                   help="localization iterations per run, the same for every arm and N (default 160)")
    c.add_argument("--curve-det-batch", type=int, default=4, help="detection images per iteration (default 4)")
    c.add_argument("--curve-loc-batch", type=int, default=16, help="localization images per iteration (default 16)")
    c.add_argument("--det-lrs", default="0.02,0.04", help="detection SGD learning rates swept per arm at --sweep-n "
                                                          "(one value: no sweep; default 0.02,0.04)")
    c.add_argument("--loc-lrs", default="0.0005,0.002",
                   help="localization AdamW learning rates swept likewise (default 0.0005,0.002)")
    c.add_argument("--sweep-n", type=int, default=200, help="the N at which learning rates are swept (default 200)")
    return p


def _ints(text: str, flag: str, parser) -> list:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag} takes comma-separated integers, got {text!r}")


def _floats(text: str, flag: str, parser) -> list:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag} takes comma-separated numbers, got {text!r}")


def curve_main(args, parser) -> int:
    """--curve / --probe-only / --smoke: the data-efficiency study (``studies.transfer_curve``)."""
    import torch

    from res_backbone.data.fashion_mnist import FashionMNISTNotFoundError
    from studies.transfer_curve import SOURCES, apply_curve_smoke, curve_arms, curve_markdown, run_curve_study

    args.amp = args.amp or "none"
    args.pretrain_iters = args.pretrain_iters or 400
    args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if not args.sources or set(args.sources) - set(SOURCES):
        parser.error(f"--sources takes a subset of {', '.join(SOURCES)}, got {args.sources}")
    default_arms = ["scratch"] + [f"{s}_finetune_all" for s in args.sources] + (
        ["rendered_frozen_bn"] if "rendered" in args.sources else ["fmnist_frozen_bn"])
    args.curve_arms = [a.strip() for a in args.curve_arms.split(",")] if args.curve_arms else default_arms
    try:
        curve_arms(args.curve_arms)
    except ValueError as e:
        parser.error(f"--curve-arms: {e}")
    args.curve_n = {"det": _ints(args.curve_det_n, "--curve-det-n", parser),
                    "loc": _ints(args.curve_loc_n, "--curve-loc-n", parser)}
    args.det_lrs, args.loc_lrs = _floats(args.det_lrs, "--det-lrs", parser), _floats(args.loc_lrs, "--loc-lrs", parser)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.smoke:
        args.quick = True
        apply_curve_smoke(args)
    iters = [args.curve_iters] if args.curve_iters is not None else [args.curve_det_iters, args.curve_loc_iters]
    if args.curve_seeds < 1 or min(iters) < 1 or not all(args.curve_n.values()) or not args.det_lrs \
            or not args.loc_lrs:
        parser.error("need --curve-seeds >= 1, --curve-iters >= 1, at least one N and one learning rate per task")
    torch.set_num_threads(args.threads)
    try:
        result = run_curve_study(args)
    except (FileNotFoundError, FashionMNISTNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(curve_markdown(result))
    out = Path(args.output)
    print(f"-> {out / 'transfer_curve.json'}, {out / 'transfer_curve.md'}"
          + ("" if args.probe_only else f", {out / 'transfer_curve.png'}"))
    return 0


def main(argv=None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - {"det", "loc"}:
        parser.error(f"--tasks takes det and/or loc, got {args.tasks!r}")
    names = [a.name for a in ARMS]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    if args.arms is not None and (not args.arms or set(args.arms) - set(names)):
        parser.error(f"--arms takes a subset of {', '.join(names)}")
    if args.curve or args.probe_only or args.smoke:
        return curve_main(args, parser)
    args.amp = args.amp or "bf16"
    args.pretrain_iters = args.pretrain_iters or 1500
    if not 0.0 < args.det_share < 1.0:
        parser.error(f"--det-share must be in (0, 1), got {args.det_share}")
    if args.quick:
        apply_quick(args)
    import torch

    from res_backbone.data.fashion_mnist import FashionMNISTNotFoundError

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    try:
        result = run_study(args, tasks)
    except (FileNotFoundError, FashionMNISTNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(markdown_report(result))
    print(f"-> {out / 'transfer.json'}, {out / 'transfer.md'}, {out}/transfer_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
