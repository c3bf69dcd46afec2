"""Optimisation diagnostics of the ResNet paper's section 4.2: plain vs residual nets.

* :func:`train_recording_errors` trains a classifier for a fixed number of iterations with the
  paper's recipe (SGD, momentum 0.9, weight decay 1e-4, lr 0.1, step decay) and records the curves
  of Fig. 6: training error (mean over each logging window of the mini-batches seen; dashed in the
  paper's figure) and test error at fixed intervals (bold there).
* :func:`layer_grad_norms` gives the gradient norm of every convolution weight in forward order,
  from one backward pass: how well the loss signal reaches the early layers.
* :func:`plot_degradation` and :func:`plot_grad_flow` draw both (matplotlib, Agg backend).

Images are float tensors ``(N, C, H, W)``, already normalised; labels are int64 ``(N,)``.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from res_backbone.data.classification import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from res_backbone.data.fashion_mnist import load_fashion_mnist
from heads.classification.loop import evaluate, train_one_epoch
from res_backbone.engine.optim import build_optimizer, lr_factor, set_lr

__all__ = [
    "TrainCurves", "build_twin", "classification_error", "conv_layers", "degradation_summary", "first_last_ratio", "layer_grad_norms",
    "load_fashion_mnist_normalized", "normalize_images", "plot_degradation", "plot_grad_flow", "resolve_device",
    "train_recording_errors", "twin_name",
]

PathLike = Union[str, os.PathLike]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def normalize_images(images: torch.Tensor, mean: Sequence[float] = FASHION_MNIST_MEAN,
                     std: Sequence[float] = FASHION_MNIST_STD) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, C, H, W)`` -> float32 ``(N, C, H, W)`` of ``(x / 255 - mean) / std``
    (one mean and std per channel; default Fashion-MNIST's)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(f"expected images (N, H, W) or (N, C, H, W) with one mean/std per channel, got shape "
                         f"{tuple(images.shape)}, mean {tuple(mean)}, std {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def load_fashion_mnist_normalized(split: str, root: Optional[PathLike] = None,
                                  limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` as float ``(N, 1, 28, 28)`` normalised images and int64 ``(N,)`` labels
    (``limit``: the first ``limit`` items). Raises ``FashionMNISTNotFoundError`` with install help."""
    images, labels = load_fashion_mnist(split, root=root, limit=limit)
    return normalize_images(images), labels


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, with a clear error when CUDA is asked for but not available."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch {torch.__version__} sees no CUDA device")
    return device


def twin_name(depth: int, residual: bool) -> str:
    """The registry name of the paper's CIFAR-style net of ``depth`` (6n+2): ``resnet56`` / ``plain56``."""
    return f"{'resnet' if residual else 'plain'}{depth}"


def build_twin(depth: int, residual: bool, *, in_chans: int = 1, num_classes: int = 10) -> nn.Module:
    """``create_model(twin_name(depth, residual))``: BatchNorm after every conv, option-A shortcuts
    (residual) or none (plain), the same layers otherwise."""
    from res_backbone.registry import create_model, list_models

    name = twin_name(depth, residual)
    if name not in list_models():
        known = sorted({int(n[5:]) for n in list_models("plain*")} & {int(n[6:]) for n in list_models("resnet*")})
        raise ValueError(f"no registered {name}; depths with both a plain and a residual net: {known}")
    return create_model(name, in_chans=in_chans, num_classes=num_classes)


# ---------------------------------------------------------------------- gradient flow
@contextlib.contextmanager
def _recording_conv_order(model: nn.Module) -> Iterator[List[Tuple[str, nn.Conv2d]]]:
    """Within the block, every forward pass appends each ``nn.Conv2d`` it runs (first call only)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    order: List[Tuple[str, nn.Conv2d]] = []

    def hook(m: nn.Module, inp, out) -> None:
        if all(m is not seen for _, seen in order):
            order.append((names[m], m))

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        yield order
    finally:
        for h in handles:
            h.remove()


def conv_layers(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, nn.Conv2d]]:
    """The model's ``nn.Conv2d`` layers in the order the forward pass runs them (one no-grad pass in
    eval mode on ``example``; a layer run twice is listed once, at its first call). Convs the pass
    never reaches are left out."""
    was_training = model.training
    try:
        with _recording_conv_order(model) as order, torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
    return order


def _buffer_snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def _buffer_restore(model: nn.Module, snapshot: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(snapshot[k])


def layer_grad_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     loss_fn: LossFn = F.cross_entropy) -> List[Tuple[str, float]]:
    """The L2 norm of ``d loss / d weight`` of every convolution, in forward order.

    One forward and one backward pass in training mode (BatchNorm uses the batch's statistics, as
    during training). Nothing of the model changes: ``.grad`` fields are not touched (the gradients
    come from ``torch.autograd.grad``), running statistics are restored, and the train/eval mode is
    put back.

    Args:
        model: a classifier, ``model(images) -> logits (N, num_classes)``.
        images: ``(N, C, H, W)`` normalised. labels: ``(N,)`` class indices.
        loss_fn: ``loss_fn(logits, labels) -> scalar`` (default cross-entropy).

    Returns:
        ``[(module name, gradient norm), ...]``, one entry per conv the forward pass runs whose
        weight requires a gradient.
    """
    was_training, buffers = model.training, _buffer_snapshot(model)
    try:
        model.train()
        with _recording_conv_order(model) as order:
            loss = loss_fn(model(images), labels)
        layers = [(n, m) for n, m in order if m.weight.requires_grad]
        if not layers:
            raise ValueError(f"{type(model).__name__} has no trainable nn.Conv2d reached by its forward pass")
        grads = torch.autograd.grad(loss, [m.weight for _, m in layers], allow_unused=True)
    finally:
        model.train(was_training)
        _buffer_restore(model, buffers)
    return [(n, float(g.norm()) if g is not None else 0.0) for (n, _), g in zip(layers, grads)]


def first_last_ratio(norms: Sequence[Tuple[str, float]]) -> float:
    """Gradient norm of the first conv divided by that of the last (small: the signal fades towards
    the input; large: it grows)."""
    if len(norms) < 2:
        raise ValueError(f"need at least two layers, got {len(norms)}")
    last = norms[-1][1]
    return norms[0][1] / last if last > 0 else math.inf


# ---------------------------------------------------------------------- training curves
@dataclass
class TrainCurves:
    """What :func:`train_recording_errors` measured. Errors are in percent.

    ``iters[i]`` is the last iteration (1-based count) of the i-th logging window and
    ``train_error[i]`` the mean error of that window's training mini-batches (in train mode, before
    each step); ``test_iters``/``test_error`` are the evaluation points.
    """

    iters: List[int] = field(default_factory=list)
    train_error: List[float] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    test_iters: List[int] = field(default_factory=list)
    test_error: List[float] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_train_error(self) -> Optional[float]:
        return self.train_error[-1] if self.train_error else None

    @property
    def final_test_error(self) -> Optional[float]:
        return self.test_error[-1] if self.test_error else None

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(images), batch_size):
        yield images[i: i + batch_size], labels[i: i + batch_size]


def _shuffled_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                      gen: torch.Generator) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless mini-batches without replacement; a new permutation every epoch, incomplete tail dropped."""
    n = len(images)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i: i + batch_size]
            yield images[idx], labels[idx]


def classification_error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         batch_size: int = 500) -> float:
    """Top-1 error in percent on ``images``/``labels`` (the engine's ``evaluate``; the model's
    train/eval mode is put back)."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images, and some: got {len(images)} images, {len(labels)} labels")
    was_training = model.training
    device = next(model.parameters()).device
    try:
        return float(evaluate(model, _batches(images, labels, batch_size), device)["top1_err"])
    finally:
        model.train(was_training)


class _CurveRecorder:
    """Takes the training loop's ``train/`` log records (the logger interface of
    :class:`~res_backbone.engine.logger.RunLogger`) into a :class:`TrainCurves`."""

    def __init__(self, curves: TrainCurves):
        self.curves = curves

    def log(self, record: Mapping, step: Optional[int] = None, prefix: str = "") -> None:
        if prefix == "train/" and "top1_err" in record and step is not None:
            self.curves.iters.append(int(step))
            self.curves.train_error.append(float(record["top1_err"]))
            self.curves.train_loss.append(float(record["loss"]))
            self.curves.lr.append(float(record["lr"]))


def train_recording_errors(
    model: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    iters: int,
    batch_size: int = 128,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    milestones: Sequence[float] = (0.5, 0.75),
    warmup_iters: int = 0,
    log_every: int = 50,
    eval_every: int = 50,
    test_images: Optional[torch.Tensor] = None,
    test_labels: Optional[torch.Tensor] = None,
    eval_batch_size: int = 500,
    seed: int = 0,
    progress=None,
) -> TrainCurves:
    """Train ``model`` in place for ``iters`` SGD steps, recording Fig. 6's curves.

    The loop is the engine's :func:`~heads.classification.loop.train_one_epoch` over an
    endless stream of mini-batches drawn without replacement from a seeded permutation (reshuffled
    every epoch). The learning rate is ``lr`` times :func:`~res_backbone.engine.optim.lr_factor`
    (step decay x0.1 at ``milestones``, fractions of ``iters`` or absolute iterations; the paper's
    CIFAR schedule is 32k and 48k of 64k, i.e. 0.5 and 0.75). Norms and biases get no weight decay.

    Args:
        model: a classifier returning logits ``(N, num_classes)``, on the device of the data.
        train_images, train_labels: the training set, ``(N, C, H, W)`` normalised, ``(N,)``.
        iters: SGD steps. batch_size: images per step (at most N).
        log_every: iterations per training-error window (the last window may be shorter).
        eval_every: test error every this many iterations and after the last one (0: only at the
            end); skipped without test data.
        test_images, test_labels: held-out data for the test error.
        seed: seeds the mini-batch order (the model's initialisation is the caller's).
        progress: an optional tqdm bar, advanced by one per iteration.

    Returns:
        :class:`TrainCurves`.

    Raises:
        NonFiniteLossError: several steps in a row had a NaN or infinite loss or gradient.
    """
    if iters <= 0 or batch_size <= 0 or log_every <= 0 or eval_every < 0:
        raise ValueError(f"iters, batch_size, log_every must be positive and eval_every >= 0; got "
                         f"{iters}, {batch_size}, {log_every}, {eval_every}")
    n = len(train_images)
    if n != len(train_labels) or n == 0:
        raise ValueError(f"need as many labels as images, and some: got {n} images, {len(train_labels)} labels")
    has_test = test_images is not None and test_labels is not None and len(test_images) > 0
    optimizer = build_optimizer(model, lr=lr, momentum=momentum, weight_decay=weight_decay)
    curves = TrainCurves()

    def lr_at(it: int) -> float:
        return set_lr(optimizer, lr, lr_factor(it, max_iters=iters, warmup_iters=warmup_iters, milestones=milestones))

    def after(done: int) -> None:
        if has_test and ((eval_every and done % eval_every == 0) or done == iters):
            curves.test_iters.append(done)
            curves.test_error.append(classification_error(model, test_images, test_labels, eval_batch_size))
            if progress is not None:
                progress.set_description(f"{base_desc} test_err {curves.test_error[-1]:.1f}%")

    base_desc = progress.desc if progress is not None else ""
    start = time.perf_counter()
    stream = _shuffled_batches(train_images, train_labels, min(batch_size, n), torch.Generator().manual_seed(seed))
    train_one_epoch(
        model, stream, optimizer, device=next(model.parameters()).device, start_iter=0, max_iters=iters,
        lr_at=lr_at, logger=_CurveRecorder(curves), log_every=log_every, on_iteration_end=after, progress=progress,
    )
    curves.seconds = time.perf_counter() - start
    return curves


# ---------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    """A matplotlib ``Figure`` outside pyplot: rendered by Agg on save, no global backend or state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig, path: PathLike) -> str:
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_degradation(nets: Sequence[Mapping], path: PathLike, title: Optional[str] = None) -> str:
    """Fig. 6 of the paper: two panels (plain | residual), one colour per depth, x = iterations,
    y = error (%). As in the paper's caption, dashed lines are training error and bold lines test
    error.

    Args:
        nets: one mapping per net with ``depth`` (int), ``residual`` (bool) and ``curves``
            (a :class:`TrainCurves` or its ``to_dict()``).
        path: the PNG to write.
        title: an optional figure title (the recipe, say).

    Returns:
        ``path`` as a string.
    """
    depths = sorted({int(n["depth"]) for n in nets})
    colours = {d: f"C{i % 10}" for i, d in enumerate(depths)}
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    top = 0.0
    for ax, residual in zip(axes, (False, True)):
        kind = "ResNet" if residual else "plain"
        for net in sorted((n for n in nets if bool(n["residual"]) == residual), key=lambda n: n["depth"]):
            c = net["curves"]
            c = c.to_dict() if isinstance(c, TrainCurves) else c
            colour, label = colours[int(net["depth"])], f"{kind}-{net['depth']}"
            ax.plot(c["iters"], c["train_error"], color=colour, lw=1.2, ls="--", label=f"{label} train")
            if c["test_error"]:
                ax.plot(c["test_iters"], c["test_error"], color=colour, lw=2.4, label=f"{label} test")
            top = max([top, *c["train_error"], *c["test_error"]])
        ax.set_title(f"{kind} nets")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, min(100.0, top * 1.05 + 1))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_grad_flow(nets: Mapping[str, Mapping[str, Sequence[Tuple[str, float]]]], path: PathLike,
                   phase_titles: Optional[Mapping[str, str]] = None, title: Optional[str] = None) -> str:
    """Per-layer gradient norms on a log axis: one panel per phase (e.g. at initialisation, after N
    steps), one line per net (e.g. plain-56 and ResNet-56), x = conv layer in forward order.

    Args:
        nets: ``{net label: {phase: [(layer name, norm), ...]}}``; every net has the same phases.
        path: the PNG to write.
        phase_titles: panel titles per phase (default: the phase keys).

    Returns:
        ``path`` as a string.
    """
    from matplotlib.ticker import MaxNLocator

    phases = list(next(iter(nets.values())))
    names = [n for n, _ in next(iter(nets.values()))[phases[0]]]
    # dotted lines where the top-level module changes (stem | layer1 | layer2 ...): the stages
    stage_starts = [i + 1 for i in range(1, len(names)) if names[i].split(".")[0] != names[i - 1].split(".")[0]]
    fig = _figure(5.5 * len(phases), 4.2)
    axes = fig.subplots(1, len(phases), sharey=True, squeeze=False)
    for ax, phase in zip(axes[0], phases):
        for i, (label, per_phase) in enumerate(nets.items()):
            norms = [v for _, v in per_phase[phase]]
            ax.plot(range(1, len(norms) + 1), norms, marker=".", ms=3, lw=1.4, color=f"C{i}", label=label)
        for x in stage_starts:
            ax.axvline(x - 0.5, color="grey", ls=":", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.set_title((phase_titles or {}).get(phase, phase))
        ax.set_xlabel("conv layer (input -> output)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("|d loss / d W|")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def degradation_summary(nets: Sequence[dict]) -> dict:
    """Per family (plain, resnet): final errors by depth and the deepest-minus-shallowest differences
    (positive training difference = the deeper net trains worse: degradation)."""
    out = {}
    for family, residual in (("plain", False), ("resnet", True)):
        rows = sorted((n for n in nets if n["residual"] == residual), key=lambda n: n["depth"])
        if not rows:
            continue
        entry = {"final_train_error": {str(n["depth"]): n["final_train_error"] for n in rows},
                 "final_test_error": {str(n["depth"]): n["final_test_error"] for n in rows}}
        if len(rows) > 1:
            entry["deeper_minus_shallower_train_error"] = rows[-1]["final_train_error"] - rows[0]["final_train_error"]
            if rows[0]["final_test_error"] is not None and rows[-1]["final_test_error"] is not None:
                entry["deeper_minus_shallower_test_error"] = rows[-1]["final_test_error"] - rows[0]["final_test_error"]
        out[family] = entry
    return out
