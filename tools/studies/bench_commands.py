"""The ``tools/bench.py`` subcommands (the tool parses the flags; each ``cmd_*`` runs one study and writes its JSON)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from res_backbone import list_models
from studies import bench_backbone
from studies.timing import environment, write_json


def _csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def _set_up(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")


def _write(args: argparse.Namespace, runs: list, leave_out=("func", "output")) -> None:
    if args.output:
        config = {k: v for k, v in vars(args).items() if k not in leave_out}
        write_json(args.output, {"command": " ".join(["python", "tools/bench.py"] + sys.argv[1:]),
                                 "environment": environment(torch.get_num_threads()), "config": config, "runs": runs})


def cmd_summary(args: argparse.Namespace) -> None:
    rows = bench_backbone.model_summary(args.models or list_models(), args.image_size)
    bench_backbone.print_model_summary(rows)
    if args.output:
        write_json(args.output, {"image_size": args.image_size, "models": rows})


def cmd_backbone(args: argparse.Namespace) -> None:
    _set_up(args)
    train_bs = 0 if args.no_train else args.train_batch_size
    total = len(args.models) * bench_backbone.count_calls(
        args.batch_sizes, bool(train_bs), args.repeats, args.warmup, args.ablation)
    runs = []
    with tqdm(total=total, desc="bench", unit="call", disable=args.no_progress) as bar:
        for name in args.models:
            bar.set_postfix_str(name)
            runs.append(bench_backbone.bench_model(
                name, batch_sizes=args.batch_sizes, train_batch_size=train_bs, image_size=args.image_size,
                repeats=args.repeats, warmup=args.warmup, device=args.device, amp=args.amp,
                ablation=args.ablation,
                progress=lambda _: bar.update(),
            ))
    for run in runs:
        bench_backbone.print_run(run)
    _write(args, runs, leave_out=("func", "output", "no_progress"))


def cmd_detector(args: argparse.Namespace) -> None:
    from studies.bench_detector import bench_detector, equivalence_failures, print_run

    _set_up(args)
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
        print_run(run)
    _write(args, runs)
    failures = [line for run in runs for line in equivalence_failures(run)]
    if failures:
        print("detections beyond the stated float32 tolerance:\n  " + "\n  ".join(failures), file=sys.stderr)
        raise SystemExit(1)


def cmd_report(args: argparse.Namespace) -> None:
    try:
        payload = json.loads(Path(args.json).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{args.json}: cannot read a bench JSON ({e})")
    if "runs" not in payload:
        raise SystemExit(f"{args.json}: no 'runs' key; expected the output of 'bench.py backbone --output'")
    print(bench_backbone.markdown_report(payload), end="")


def cmd_deploy(args: argparse.Namespace) -> None:
    from studies.bench_deploy import bench_deploy, bench_deploy_models, markdown, markdown_models

    if args.models:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        with tqdm(desc="deploy", unit="call", disable=args.no_progress) as bar:
            result = bench_deploy_models(args.models, args.sizes, repeats=args.repeats, warmup=args.warmup,
                                         threads=args.threads, compile=not args.no_compile, int8=not args.no_int8,
                                         workdir=args.workdir, on_step=lambda _: bar.update())
        table = markdown_models(result)
    else:
        result = bench_deploy(args.checkpoint, args.files, args.sizes, repeats=args.repeats, warmup=args.warmup,
                              threads=args.threads)
        table = markdown(result)
    print(f"fp32 peak (torch.mm): {result['peak_gflops']} GFLOP/s on {torch.get_num_threads()} thread(s)")
    print(table)
    if args.output:
        write_json(args.output, result)


def cmd_architectures(args: argparse.Namespace) -> None:
    from studies import bench_architectures as ba

    if args.threads:
        torch.set_num_threads(args.threads)
    with tqdm(total=0 if args.no_time else 6 * (args.repeats + args.warmup), desc="architectures", unit="call",
              disable=args.no_progress) as bar:
        table = ba.architecture_table(args.image_size, vgg_bn=args.vgg_bn, batch_size=args.batch_size,
                                      repeats=args.repeats, warmup=args.warmup,
                                      channels_last=not args.no_channels_last, timed=not args.no_time,
                                      on_step=lambda _: bar.update())
    comparison = None
    if args.train_minutes > 0:
        from res_backbone.data.fashion_mnist import load_fashion_mnist

        train = load_fashion_mnist("train", args.fmnist_root, limit=args.train_limit)
        test = load_fashion_mnist("test", args.fmnist_root, limit=args.test_limit)
        with tqdm(total=3 * args.evals, desc="train", unit="point", disable=args.no_progress) as bar:
            comparison = ba.train_comparison(
                train, test, args.train_minutes, image_size=args.train_size, lr=args.lr, evals=args.evals,
                on_eval=lambda name, p: (bar.set_postfix_str(f"{name} test err {100 * p['test_error']:.1f}%"),
                                         bar.update()))
        if args.plot:
            ba.plot_comparison(comparison, args.plot)
    text = ba.markdown(table, comparison)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.output:
        write_json(args.output, {"command": " ".join(["python", "tools/bench.py"] + sys.argv[1:]), **table,
                                 "training": comparison})
