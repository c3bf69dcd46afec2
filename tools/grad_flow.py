#!/usr/bin/env python
"""Gradient flow of plain vs residual nets of equal depth (ResNet paper, section 4.1/4.2).

For a plain net and its residual twin (the paper's CIFAR nets, BatchNorm after every conv,
option-A shortcuts for the residual one), built from the same seed, this measures the L2 norm of the
loss gradient of every conv weight, in forward order, on one fixed mini-batch of Fashion-MNIST:
at initialisation, and again after --steps SGD steps of the paper's recipe (lr 0.1, momentum 0.9,
weight decay 1e-4, constant learning rate). One backward pass each, BatchNorm in training mode.

    python tools/grad_flow.py                          # depth 56, 100 steps: a few minutes on 2 CPU cores
    python tools/grad_flow.py --depth 110 --steps 200 --output runs/grad_flow_110.png

Writes --output (PNG: per-layer gradient norms on a log axis, one panel per phase) and a JSON next to
it (--json; default the PNG's name with .json): per net the layer names and norms at both phases,
and a summary of the first-to-last-layer gradient-norm ratio, plain vs residual, at both phases.

Exit codes: 0 done, 2 bad arguments or data not found, 3 non-finite losses.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from studies.cli import add_fashion_mnist_sgd_args, setup_logging

log = logging.getLogger("grad_flow")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--depth", type=int, default=56, help="depth 6n+2 of both nets (default 56: plain56 vs resnet56)")
    a("--steps", type=int, default=100, help="SGD steps between the two measurements (default 100; 0: only at init)")
    a("--batch-size", type=int, default=128, help="mini-batch size of the probe batch and of training (default 128)")
    a("--lr", type=float, default=0.1, help="learning rate of the --steps steps (default 0.1)")
    a("--output", default="docs/grad_flow.png", help="the PNG to write (default docs/grad_flow.png)")
    a("--json", default=None, help="the JSON to write (default: --output with the suffix .json)")
    add_fashion_mnist_sgd_args(p, seed_help="seed of the initialisation, the probe batch and the batch order")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 0 or args.batch_size <= 0:
        parser.error("--steps must be >= 0 and --batch-size positive")
    import torch
    from tqdm import tqdm

    from res_backbone import __version__
    from studies.analysis import (
        build_twin, first_last_ratio, layer_grad_norms, load_fashion_mnist_normalized, plot_grad_flow,
        resolve_device, train_recording_errors, twin_name,
    )
    from res_backbone.data.fashion_mnist import FashionMNISTNotFoundError
    from res_backbone.engine.checkpoint import atomic_write_text
    from res_backbone.engine.optim_step import NonFiniteLossError

    if args.threads:
        torch.set_num_threads(args.threads)
    png = Path(args.output)
    json_path = Path(args.json) if args.json else png.with_suffix(".json")
    try:
        device = resolve_device(args.device)
        for residual in (False, True):  # fail on a bad depth before loading data
            build_twin(args.depth, residual)
        x, y = load_fashion_mnist_normalized("train", args.data_dir, args.limit_train)
    except (FashionMNISTNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    # One probe batch for every measurement, so the four curves differ only by the network.
    probe = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: args.batch_size]
    x, y = x.to(device), y.to(device)
    px, py = x[probe.to(device)], y[probe.to(device)]
    phases = ["init"] + (["after"] if args.steps else [])
    phase_titles = {"init": "at initialisation", "after": f"after {args.steps} SGD steps (lr {args.lr:g})"}
    nets, plot_data = {}, {}
    bar = tqdm(total=2 * args.steps, unit="it", disable=not args.progress or not args.steps, dynamic_ncols=True)
    for residual in (False, True):
        name = twin_name(args.depth, residual)
        torch.manual_seed(args.seed)  # twins start from the same random stream
        model = build_twin(args.depth, residual).to(device)
        norms = {"init": layer_grad_norms(model, px, py)}
        entry = {"residual": residual, "layers": [n for n, _ in norms["init"]]}
        if args.steps:
            bar.set_description(name)
            try:
                curves = train_recording_errors(
                    model, x, y, iters=args.steps, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay, milestones=(), log_every=args.steps, eval_every=0,
                    seed=args.seed, progress=bar,
                )
            except NonFiniteLossError as e:
                bar.close()
                log.error("%s: %s", name, e)
                return 3
            norms["after"] = layer_grad_norms(model, px, py)
            entry["train_error_last_steps"] = curves.final_train_error
            entry["train_seconds"] = round(curves.seconds, 1)
        for phase in phases:
            entry[phase] = [v for _, v in norms[phase]]
        entry["first_last_ratio"] = {phase: first_last_ratio(norms[phase]) for phase in phases}
        nets[name] = entry
        plot_data[f"{'ResNet' if residual else 'plain'}-{args.depth}"] = norms
    bar.close()
    plain, res = nets[twin_name(args.depth, False)], nets[twin_name(args.depth, True)]
    summary = {
        "first_last_ratio": {n: e["first_last_ratio"] for n, e in nets.items()},
        "plain_over_residual": {p: plain["first_last_ratio"][p] / res["first_last_ratio"][p] for p in phases},
    }
    report = {
        "experiment": "gradient flow, plain vs residual",
        "config": {**{k: v for k, v in vars(args).items() if k != "progress"}, "library_version": __version__,
                   "torch_threads": torch.get_num_threads(), "dataset": "Fashion-MNIST"},
        "nets": nets, "summary": summary,
    }
    plot_grad_flow(plot_data, png, phase_titles=phase_titles,
                   title=f"|d loss / d W| per conv, depth {args.depth}, one Fashion-MNIST batch of {len(px)}")
    atomic_write_text(json.dumps(report, indent=1) + "\n", json_path)
    for phase in phases:
        print(f"{phase_titles[phase]}: first/last conv gradient norm  plain {plain['first_last_ratio'][phase]:.3g}"
              f"  residual {res['first_last_ratio'][phase]:.3g}")
    print(f"-> {png}, {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
