#!/usr/bin/env python
"""The degradation experiment (ResNet paper, section 4.2 and Fig. 6) on Fashion-MNIST.

Plain and residual nets of the same depths (the paper's CIFAR nets: 3x3 stem, three stages of
16/32/64 filters, BatchNorm after every conv, option-A shortcuts for the residual nets, none for
the plain twins) are trained with one recipe (SGD, momentum 0.9, weight decay 1e-4, lr 0.1, batch
128, x0.1 steps at --milestones), the same seed and the same mini-batch order. Recorded: training
error (mean over each --log-every window of the mini-batches; dashed, as in the paper's figure)
and test error on the first --limit-test test images every --eval-every iterations (bold).

    python tools/degradation.py                      # plain/resnet 20 and 56, 600 iterations: ~25 min on 2 CPU cores
    python tools/degradation.py --device cuda --iters 4000 --eval-every 200 --limit-test none --output runs/deg4000
    python tools/degradation.py --depths 20,32,44,56 --iters 3000 --output runs/degradation

Writes into --output: degradation.png (two panels, plain | residual; one colour per depth) and
degradation.json (per net: name, depth, residual, params, final train and test error, curves,
seconds; plus the options and a summary of deeper-minus-shallower final errors). The JSON is
rewritten after every net, so a stopped run keeps what it finished.

Exit codes: 0 done, 2 bad arguments or data not found, 3 non-finite losses.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from res_backbone.engine.config import opt_int
from studies.cli import add_fashion_mnist_sgd_args, setup_logging

log = logging.getLogger("degradation")


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one depth")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--depths", type=_int_list, default=[20, 56],
      help="comma-separated depths 6n+2; each is trained as plain and as ResNet (default 20,56)")
    a("--iters", type=int, default=600, help="SGD iterations per net (default 600, ~1.3 epochs of the 60k set)")
    a("--batch-size", type=int, default=128, help="mini-batch size (default 128, the paper's)")
    a("--lr", type=float, default=0.1, help="base learning rate (default 0.1, the paper's)")
    a("--milestones", type=float, nargs="+", default=[0.5, 0.75],
      help="x0.1 at these fractions of --iters (or absolute iterations if >= 1); default 0.5 0.75 (the paper's 32k, 48k of 64k)")
    a("--eval-every", type=int, default=60, help="test error every N iterations and at the end (default 60)")
    a("--log-every", type=int, default=None, help="training-error window in iterations (default: --eval-every)")
    a("--limit-test", type=opt_int, default=2000, help="test error on the first N test images (default 2000; none = all 10,000)")
    a("--output", default="docs/degradation", help="folder for degradation.png and degradation.json (default docs/degradation)")
    add_fashion_mnist_sgd_args(p, seed_help="seed of the initialisation and the mini-batch order")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iters <= 0 or args.batch_size <= 0 or args.eval_every < 0 or (args.log_every or 1) <= 0:
        parser.error("--iters, --batch-size and --log-every must be positive, --eval-every >= 0")
    import torch
    from tqdm import tqdm

    from res_backbone import __version__
    from studies.analysis import (
        build_twin, load_fashion_mnist_normalized, plot_degradation, resolve_device, train_recording_errors,
        degradation_summary, twin_name,
    )
    from res_backbone.complexity import count_params
    from res_backbone.data.fashion_mnist import FashionMNISTNotFoundError
    from res_backbone.engine.checkpoint import atomic_write_text
    from res_backbone.engine.optim_step import NonFiniteLossError

    if args.threads:
        torch.set_num_threads(args.threads)
    log_every = args.log_every or args.eval_every or 50
    out = Path(args.output)
    try:
        device = resolve_device(args.device)
        for depth in args.depths:  # fail on a bad depth before any training
            for residual in (False, True):
                build_twin(depth, residual)
        x_train, y_train = load_fashion_mnist_normalized("train", args.data_dir, args.limit_train)
        x_test, y_test = load_fashion_mnist_normalized("test", args.data_dir, args.limit_test)
    except (FashionMNISTNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    config = {k: v for k, v in vars(args).items() if k != "progress"}
    config.update(log_every=log_every, n_train=len(x_train), n_test=len(x_test),
                  torch_threads=torch.get_num_threads(), library_version=__version__, dataset="Fashion-MNIST")
    runs = [(d, r) for d in args.depths for r in (False, True)]
    results: List[dict] = []
    bar = tqdm(total=args.iters * len(runs), unit="it", disable=not args.progress, dynamic_ncols=True)
    for depth, residual in runs:
        name = twin_name(depth, residual)
        torch.manual_seed(args.seed)  # twins start from the same random stream
        model = build_twin(depth, residual).to(device)
        bar.set_description(name)
        try:
            curves = train_recording_errors(
                model, x_train, y_train, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                momentum=args.momentum, weight_decay=args.weight_decay, milestones=args.milestones,
                log_every=log_every, eval_every=args.eval_every, test_images=x_test, test_labels=y_test,
                seed=args.seed, progress=bar,
            )
        except NonFiniteLossError as e:
            bar.close()
            log.error("%s: %s", name, e)
            return 3
        results.append({
            "name": name, "depth": depth, "residual": residual, "params": count_params(model),
            "final_train_error": curves.final_train_error, "final_test_error": curves.final_test_error,
            "time_s": round(curves.seconds, 1), "s_per_iter": round(curves.seconds / args.iters, 4),
            "curves": curves.to_dict(),
        })
        log.info("%s: train error %.2f%%, test error %.2f%% (%.0f s)", name, curves.final_train_error,
                 curves.final_test_error if curves.final_test_error is not None else float("nan"), curves.seconds)
        report = {"experiment": "degradation (He et al. 2015, Fig. 6)", "config": config, "nets": results,
                  "summary": degradation_summary(results)}
        atomic_write_text(json.dumps(report, indent=1) + "\n", out / "degradation.json")
    bar.close()
    steps = ", ".join(str(round(m * args.iters if m < 1 else m)) for m in args.milestones) or "none"
    title = (f"Fashion-MNIST, {args.iters} iterations of batch {args.batch_size}, lr {args.lr:g} (x0.1 at {steps}); "
             f"dashed: train, bold: test ({len(x_test)} images)")
    plot_degradation(results, out / "degradation.png", title=title)
    print(f"{'net':<10}{'params':>10}{'train err %':>13}{'test err %':>12}{'time s':>9}")
    for r in results:
        test = f"{r['final_test_error']:.2f}" if r["final_test_error"] is not None else "-"
        print(f"{r['name']:<10}{r['params']:>10,}{r['final_train_error']:>13.2f}{test:>12}{r['time_s']:>9.0f}")
    print(f"-> {out / 'degradation.png'}, {out / 'degradation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
