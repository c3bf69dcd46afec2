#!/usr/bin/env python
"""Model summary and speed comparison against torchvision and timm.

    python tools/bench.py summary --output summary.json
    python tools/bench.py backbone --models resnet50 --repeats 7 --output docs/bench_cpu.json
    python tools/bench.py report docs/bench_cpu.json > tables.md
    python tools/bench.py detector --models resnet18,resnet50 --image-size 512 --output det_bench.json

``summary`` prints parameters and multiply-adds of every registered model for both bottleneck
stride placements; ``report`` turns a ``backbone`` JSON into markdown tables. ``backbone`` times inference and one training step of torchvision's, timm's and
our same-depth ResNet in one process (see :mod:`res_backbone.benchmark` for the protocol).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from res_backbone import benchmark, create_model, get_arch, list_models  # noqa: E402
from res_backbone.complexity import count_macs, count_params  # noqa: E402


def _csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def _write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def _environment(threads: int) -> dict:
    import timm
    import torchvision

    return {
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": threads,
    }


def cmd_summary(args: argparse.Namespace) -> None:
    rows = []
    for name in args.models or list_models():
        # CIFAR nets are counted at their own 32x32 input (the paper's Table 6 setting).
        side = get_arch(name).get("default_cfg", {}).get("input_size", (3, args.image_size))[-1]
        size = (3, side, side)
        row = {"model": name, "input_size": side, "params": count_params(create_model(name))}
        row["macs_v1_5"] = count_macs(create_model(name), size)
        row["macs_stride_in_1x1"] = count_macs(create_model(name, stride_in_1x1=True), size)
        rows.append(row)
    print(f"{'model':<10} {'input':>5} {'params (M)':>10} {'GMACs v1.5':>11} {'GMACs paper':>12}")
    for r in rows:
        print(f"{r['model']:<10} {r['input_size']:>5} {r['params'] / 1e6:>10.3f} {r['macs_v1_5'] / 1e9:>11.3f} "
              f"{r['macs_stride_in_1x1'] / 1e9:>12.3f}")
    if args.output:
        _write_json(args.output, {"image_size": args.image_size, "models": rows})


def _print_model(run: dict) -> None:
    print(f"\n{run['model']}  (img/s, median)")
    print(f"{'mode':<6} {'batch':>5} {'contender':<12} {'img/s':>8} {'ms/call':>9} {'vs tv':>7} {'vs timm':>8}")
    rat = {(r["mode"], r["batch_size"], r["contender"]): r for r in run["ratios"]}
    for r in run["results"]:
        q = rat.get((r["mode"], r["batch_size"], r["contender"]))
        vs = f"{q['vs_torchvision']:>7.2f} {q['vs_timm']:>8.2f}" if q else f"{'':>7} {'':>8}"
        print(f"{r['mode']:<6} {r['batch_size']:>5} {r['contender']:<12} {r['img_per_s']:>8.2f} {r['median_ms']:>9.1f} {vs}")


def cmd_backbone(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    train_bs = 0 if args.no_train else args.train_batch_size
    total = len(args.models) * benchmark.count_calls(
        args.batch_sizes, bool(train_bs), args.repeats, args.warmup, args.ablation)
    from tqdm import tqdm

    runs = []
    with tqdm(total=total, desc="bench", unit="call", disable=args.no_progress) as bar:
        for name in args.models:
            bar.set_postfix_str(name)
            runs.append(benchmark.bench_model(
                name, batch_sizes=args.batch_sizes, train_batch_size=train_bs, image_size=args.image_size,
                repeats=args.repeats, warmup=args.warmup, device=args.device, amp=args.amp,
                ablation=args.ablation,
                progress=lambda _: bar.update(),
            ))
    for run in runs:
        _print_model(run)
    if args.output:
        config = {k: v for k, v in vars(args).items() if k not in ("func", "output", "no_progress")}
        payload = {
            "command": " ".join(["python", "tools/bench.py"] + sys.argv[1:]),
            "environment": _environment(torch.get_num_threads()),
            "config": config,
            "runs": runs,
        }
        _write_json(args.output, payload)


def cmd_detector(args: argparse.Namespace) -> None:
    from heads.detection.benchmark import bench_detector

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    runs = []
    for name in args.models:
        print(f"{name}-FPN at {args.image_size}x{args.image_size} ...", flush=True)
        runs.append(bench_detector(
            name, image_size=args.image_size, batch_size=args.batch_size,
            train_batch_size=0 if args.no_train else args.train_batch_size, num_classes=args.num_classes,
            repeats=args.repeats, warmup=args.warmup, device=args.device, amp=args.amp, roi_align=args.roi_align,
            count_ops=args.count_ops or args.count_only, timed=not args.count_only,
        ))
    for run in runs:
        speed = {(q["mode"], q["contender"]): q for q in run["ratios"]}
        if run["results"]:
            print(f"\n{run['model']}  (ms per call, median; speed-up = torchvision time / ours, of the medians and "
                  "the median of the per-repeat ratios)")
            print(f"{'mode':<6} {'batch':>5} {'contender':<12} {'ms/call':>9} {'speed-up':>9} {'paired':>7}")
        else:
            print(f"\n{run['model']}  (not timed: --count-only)")
        for r in run["results"]:
            q = speed.get((r["mode"], r["contender"]))
            print(f"{r['mode']:<6} {r['batch_size']:>5} {r['contender']:<12} {r['median_ms']:>9.1f} "
                  + (f"{q['speedup_vs_torchvision']:>9.2f} {q['speedup_paired_median']:>7.2f}" if q else f"{'':>9}"))
        if "dispatch" in run:
            print(f"\n{'mode':<6} {'contender':<12} {'ops':>6} {'syncs':>6} {'ops ratio':>9}   "
                  "(ATen operators dispatched per call and host syncs among them; ratio = torchvision's / ours)")
            for mode, counts in run["dispatch"].items():
                for k, c in counts.items():
                    q = speed.get((mode, k))
                    print(f"{mode:<6} {k:<12} {c['ops']:>6} {c['syncs']:>6} "
                          + (f"{q['ops_ratio']:>9.2f}" if q else f"{'':>9}"))
        for k, e in run["equivalence"].items():
            print(f"equivalence torchvision vs {k}: same labels {e['same_labels']}, detections {e['num_detections']}, "
                  f"max |box diff| {e['max_box_diff_px']} px, max |score diff| {e['max_score_diff']}")
    if args.output:
        config = {k: v for k, v in vars(args).items() if k not in ("func", "output")}
        _write_json(args.output, {
            "command": " ".join(["python", "tools/bench.py"] + sys.argv[1:]),
            "environment": _environment(torch.get_num_threads()), "config": config, "runs": runs,
        })


def cmd_report(args: argparse.Namespace) -> None:
    try:
        payload = json.loads(Path(args.json).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{args.json}: cannot read a bench JSON ({e})")
    if "runs" not in payload:
        raise SystemExit(f"{args.json}: no 'runs' key; expected the output of 'bench.py backbone --output'")
    print(benchmark.markdown_report(payload), end="")


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
                    "interleaved and the median over --repeats is reported. 'ours' is "
                    "prepare_for_inference(model) (BN folded, channels-last) on channels-last input, 'ours_eager' our model run "
                    "like the baselines (eval, inference_mode, NCHW).",
    )
    b.add_argument("--models", type=_csv(str), default=["resnet50"],
                   help="comma-separated ResNets provided by all three libraries (default resnet50)")
    b.add_argument("--batch-sizes", type=_csv(int), default=[1, 8], help="inference batch sizes (default 1,8)")
    b.add_argument("--train-batch-size", type=int, default=8, help="batch of the timed training step (default 8)")
    b.add_argument("--no-train", action="store_true", help="skip the training step")
    b.add_argument("--image-size", type=int, default=224, help="square input side (default 224)")
    b.add_argument("--repeats", type=int, default=5, help="timed calls per contender and setting; the median is reported (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="untimed calls per contender and setting first (default 1)")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    b.add_argument("--amp", choices=tuple(benchmark.AMP_DTYPES), default="none",
                   help="autocast dtype for every contender, inference and training (default none = fp32)")
    b.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0 = torch's default)")
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
                    "weights (converted); 'ours' is heads.detection.prepare_for_inference (BN folded, channels-last), "
                    "'ours_eager' our model as is. Also reports how far the detections differ.",
    )
    d.add_argument("--models", type=_csv(str), default=["resnet18", "resnet50"],
                   help="comma-separated ResNet depths (default resnet18,resnet50)")
    d.add_argument("--image-size", type=int, default=512, help="square input side (default 512)")
    d.add_argument("--batch-size", type=int, default=1, help="inference batch (default 1)")
    d.add_argument("--train-batch-size", type=int, default=2, help="batch of the timed training step (default 2)")
    d.add_argument("--no-train", action="store_true", help="skip the training step")
    d.add_argument("--num-classes", type=int, default=80, help="foreground classes (default 80)")
    d.add_argument("--repeats", type=int, default=5, help="timed calls per contender; the median is reported (default 5)")
    d.add_argument("--warmup", type=int, default=1, help="untimed calls per contender first (default 1)")
    d.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    d.add_argument("--amp", choices=tuple(benchmark.AMP_DTYPES), default="none",
                   help="autocast dtype for every contender (default none = fp32)")
    d.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0 = torch's default)")
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

    r = sub.add_parser("report", help="print the markdown tables of a 'backbone --output' JSON file")
    r.add_argument("json", metavar="FILE.json", help="a JSON file written by 'bench.py backbone --output'")
    r.set_defaults(func=cmd_report)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
