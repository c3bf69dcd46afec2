"""Flags the plain-vs-residual studies share (``tools/degradation.py``, ``tools/grad_flow.py``)."""
from __future__ import annotations

import argparse
import logging

from res_backbone.engine.config import opt_int


def add_fashion_mnist_sgd_args(p: argparse.ArgumentParser, *, seed_help: str) -> None:
    """SGD recipe (momentum, weight decay), Fashion-MNIST source and run flags."""
    a = p.add_argument
    a("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    a("--weight-decay", type=float, default=1e-4, help="weight decay, not on norms and biases (default 1e-4)")
    a("--limit-train", type=opt_int, default=None, help="use the first N training images (default all 60,000)")
    a("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--device", default="cpu", help="cpu, cuda or cuda:N (the data set is moved there whole; default cpu)")
    a("--data-dir", default=None,
      help="Fashion-MNIST folder with the four idx files (default $RB_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    a("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
