"""``tools/bench.py architectures``: the ResNet paper's comparison of VGG-19, a 34-layer plain net and ResNet-34.

Two parts:

* :func:`architecture_table`: parameters, multiply-adds (convolutions and fully-connected layers of one 224x224
  image, the convention of the paper's Table 1 and Fig. 3, where "FLOPs" are multiply-adds), depth (weighted layers
  on the main path: projection shortcuts are not counted) and forward / forward+backward throughput measured on this
  machine, timed interleaved. Plus the bottleneck's saving (the paper's Fig. 5): a basic block and a bottleneck block
  at the widths the figure draws, and a basic block at the bottleneck's 256-d width.
* :func:`train_comparison`: the three networks trained on Fashion-MNIST for the same wall time, round-robin in one
  process (each step goes to the network with the least training time so far, so a change in machine load hits all
  three alike), with training error and test error against training time.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from res_backbone import create_model
from res_backbone.complexity import count_macs, count_params

from .timing import environment, time_interleaved

__all__ = ["NETWORKS", "PAPER_GMACS", "architecture_table", "block_rows", "build_network", "depth_of",
           "train_comparison"]

NETWORKS = ("vgg19", "plain34", "resnet34")
#: multiply-adds of one 224x224 image in the paper (Fig. 3: 19.6 billion FLOPs for VGG-19, 3.6 billion for both
#: 34-layer nets)
PAPER_GMACS = {"vgg19": 19.6, "plain34": 3.6, "resnet34": 3.6}


class _SmallInputVGG(nn.Module):
    """A VGG trunk with global pooling and three fully-connected layers (512, 512, classes): still 19 layers."""

    def __init__(self, features: nn.Sequential, num_classes: int):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                        nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                        nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_network(name: str, num_classes: int = 1000, in_chans: int = 3, vgg_bn: bool = False,
                  small_input: bool = False) -> nn.Module:
    """One of :data:`NETWORKS`, randomly initialised.

    ``vgg19`` is ``torchvision.models.vgg19`` (``vgg19_bn`` with ``vgg_bn``). ``small_input`` (training on 32 px
    images) replaces VGG's 7x7 pooling and 4096-wide head by a global pooling and a 512-512-classes head, as
    CIFAR-size VGGs do; the convolutional trunk is torchvision's.
    """
    if name == "vgg19":
        import torchvision
        from torchvision.models.vgg import cfgs, make_layers

        if not small_input:
            model = (torchvision.models.vgg19_bn if vgg_bn else torchvision.models.vgg19)(num_classes=num_classes)
        else:  # torchvision's VGG-19 trunk, without building the 120M-parameter head it would replace
            model = _SmallInputVGG(make_layers(cfgs["E"], batch_norm=vgg_bn), num_classes)
        if in_chans != 3:
            first = model.features[0]
            model.features[0] = nn.Conv2d(in_chans, first.out_channels, 3, padding=1)
        return model
    if name in ("plain34", "resnet34"):
        return create_model(name, num_classes=num_classes, in_chans=in_chans)
    raise ValueError(f"unknown network {name!r}; choose from {', '.join(NETWORKS)}")


def depth_of(model: nn.Module) -> int:
    """Weighted layers (convolutions and fully-connected layers) on the main path: projection shortcuts
    (modules under a ``downsample``) are not counted, as the paper counts ResNet-34's 34 layers."""
    return sum(1 for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name)


def block_rows(side: int = 56) -> List[Dict]:
    """The paper's Fig. 5 at a ``side`` x ``side`` map: params and multiply-adds of the convolutions of a basic block
    (two 3x3, 64-d), a bottleneck block (1x1 256->64, 3x3 64, 1x1 64->256) and a basic block at 256-d."""
    def basic(width):
        return nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                             nn.Conv2d(width, width, 3, padding=1, bias=False))

    blocks = {
        "basic block, 64-d (Fig. 5 left)": (basic(64), 64),
        "bottleneck, 256-d (Fig. 5 right)": (nn.Sequential(nn.Conv2d(256, 64, 1, bias=False),
                                                           nn.Conv2d(64, 64, 3, padding=1, bias=False),
                                                           nn.Conv2d(64, 256, 1, bias=False)), 256),
        "basic block, 256-d (same width as the bottleneck)": (basic(256), 256),
    }
    return [{"name": name, "params": count_params(block), "macs": count_macs(block, (width, side, side)),
             "input": f"{width}x{side}x{side}"} for name, (block, width) in blocks.items()]


def architecture_table(image_size: int = 224, vgg_bn: bool = False, batch_size: int = 8, repeats: int = 3,
                       warmup: int = 1, channels_last: bool = True, timed: bool = True,
                       on_step: Optional[Callable[[str], None]] = None) -> Dict:
    """One record per network: params, multiply-adds at ``image_size``, depth, and (``timed``) forward and
    forward+backward images per second at ``batch_size``, interleaved, channels-last when ``channels_last``."""
    models = {n: build_network(n, vgg_bn=vgg_bn) for n in NETWORKS}
    records = []
    for name, model in models.items():
        macs = count_macs(model, (3, image_size, image_size))
        records.append({"name": name if not (name == "vgg19" and vgg_bn) else "vgg19_bn",
                        "params": count_params(model), "macs": macs, "depth": depth_of(model),
                        "paper_gmacs": PAPER_GMACS[name],
                        "macs_vs_paper": round(macs / 1e9 / PAPER_GMACS[name] - 1, 4) if image_size == 224 else None})
    if timed:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=fmt)
        for m in models.values():
            m.to(memory_format=fmt)
        target = torch.randint(0, 1000, (batch_size,))

        def train_step(m):
            m.train()
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), target).backward()

        def forward(m):
            m.eval()
            with torch.inference_mode():
                m(x)

        fns = {f"{n}:forward": (lambda m=m: forward(m)) for n, m in models.items()}
        fns.update({f"{n}:train": (lambda m=m: train_step(m)) for n, m in models.items()})
        times = time_interleaved(fns, repeats, warmup, on_step=on_step)
        for rec, name in zip(records, models):
            rec["img_per_s_forward"] = round(batch_size / statistics.median(times[f"{name}:forward"]), 2)
            rec["img_per_s_train"] = round(batch_size / statistics.median(times[f"{name}:train"]), 2)
    return {"image_size": image_size, "batch_size": batch_size, "channels_last": channels_last,
            "convention": "multiply-adds of convolutions and fully-connected layers, one image at "
                          f"{image_size}x{image_size}; depth: weighted layers on the main path (projection shortcuts "
                          "not counted)",
            "networks": records, "blocks": block_rows(), "environment": environment(torch.get_num_threads())}


def _error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    wrong = 0
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            wrong += int((model(images[i:i + batch_size]).argmax(1) != labels[i:i + batch_size]).sum())
    return wrong / max(1, len(images))


def train_comparison(train: Sequence[torch.Tensor], test: Sequence[torch.Tensor], minutes: float,
                     image_size: int = 32, batch_size: int = 64, lr: float = 0.05, evals: int = 8,
                     networks: Sequence[str] = NETWORKS, seed: int = 0,
                     on_eval: Optional[Callable[[str, Dict], None]] = None) -> Dict:
    """Train ``networks`` (all with BatchNorm: VGG-19 as ``vgg19_bn``; a plain net without it does not train at
    this depth) for ``minutes`` of training time each on ``train = (uint8 images (N, 28, 28), labels)``, resized to
    ``image_size``; SGD (momentum 0.9, weight decay 5e-4, ``lr`` with a cosine decay over the time budget), random
    crops with 2 px padding and flips. Test error on ``test`` and the running training error of the steps since the
    last point are recorded ``evals`` times (evaluation time not counted).

    Returns:
        ``{"curves": {name: [{"minutes", "steps", "train_error", "test_error"}, ...]}, "final": {...}, ...}``.
    """
    torch.manual_seed(seed)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255).unsqueeze(1)
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return (x - 0.286) / 0.353  # Fashion-MNIST train mean and std

    xtr, ytr = prepare(train[0]), train[1]
    xte, yte = prepare(test[0]), test[1]
    budget = minutes * 60.0
    nets = {n: build_network(n, num_classes=10, in_chans=1, vgg_bn=True, small_input=True) for n in networks}
    opts = {n: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
            for n, m in nets.items()}
    spent = dict.fromkeys(nets, 0.0)
    steps = dict.fromkeys(nets, 0)
    wrong = dict.fromkeys(nets, 0)
    seen = dict.fromkeys(nets, 0)
    next_eval = dict.fromkeys(nets, 1)
    curves: Dict[str, List[Dict]] = {n: [] for n in nets}
    gens = {n: torch.Generator().manual_seed(seed + i) for i, n in enumerate(nets)}
    while True:
        active = [n for n in nets if next_eval[n] <= evals]
        if not active:
            break
        name = min(active, key=lambda n: spent[n])
        model, opt, g = nets[name], opts[name], gens[name]
        t0 = time.perf_counter()
        idx = torch.randint(0, len(xtr), (batch_size,), generator=g)
        x, y = xtr[idx], ytr[idx]
        x = F.pad(x, (2, 2, 2, 2), mode="reflect")
        dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
        x = x[:, :, dy:dy + image_size, dx:dx + image_size]
        if torch.rand(1, generator=g).item() < 0.5:
            x = x.flip(3)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, spent[name] / budget)))
        model.train()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        wrong[name] += int((logits.argmax(1) != y).sum())
        seen[name] += len(y)
        steps[name] += 1
        spent[name] += time.perf_counter() - t0
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{name}: the loss is {loss.item()} at step {steps[name]}; lower --lr")
        if spent[name] >= budget * next_eval[name] / evals:
            point = {"minutes": round(spent[name] / 60, 3), "steps": steps[name],
                     "train_error": round(wrong[name] / max(1, seen[name]), 4),
                     "test_error": round(_error(model, xte, yte), 4)}
            curves[name].append(point)
            wrong[name] = seen[name] = 0
            next_eval[name] += 1
            if on_eval:
                on_eval(name, point)
    return {"minutes_each": minutes, "image_size": image_size, "batch_size": batch_size, "lr": lr,
            "train_images": len(xtr), "test_images": len(xte), "curves": curves,
            "final": {n: c[-1] for n, c in curves.items()},
            "setup": "all three with BatchNorm (VGG-19 as torchvision's vgg19_bn, global pooling and three FC layers, 512-512-10, "
                     "for 32 px input); SGD momentum 0.9 nesterov, weight decay 5e-4, cosine lr over the time "
                     "budget; round-robin steps by least training time; 1 input channel"}


def plot_comparison(result: Dict, path: str) -> None:
    """Training (dashed) and test (solid) error against training minutes, one colour per network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, curve), colour in zip(result["curves"].items(), ("tab:green", "tab:red", "tab:blue")):
        t = [p["minutes"] for p in curve]
        ax.plot(t, [100 * p["train_error"] for p in curve], "--", color=colour, label=f"{name} train")
        ax.plot(t, [100 * p["test_error"] for p in curve], "-", color=colour, label=f"{name} test")
    ax.set_xlabel("training minutes (each network, same machine, interleaved)")
    ax.set_ylabel("error (%)")
    ax.set_title(f"Fashion-MNIST at {result['image_size']} px: VGG-19 (BN), plain-34, ResNet-34")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(table: Dict, comparison: Optional[Dict] = None) -> str:
    """The table (and the training comparison's final errors) as markdown."""
    lines = ["| network | params (M) | GMACs | paper GMACs | vs paper | depth | fwd img/s | fwd+bwd img/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table["networks"]:
        vs = f"{100 * r['macs_vs_paper']:+.1f}%" if r["macs_vs_paper"] is not None else ""
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f} | {r['macs'] / 1e9:.2f} | {r['paper_gmacs']} | {vs} | "
                     f"{r['depth']} | {r.get('img_per_s_forward', '')} | {r.get('img_per_s_train', '')} |")
    lines += ["", "| block | input | params | GMACs |", "|---|---|---:|---:|"]
    lines += [f"| {b['name']} | {b['input']} | {b['params']:,} | {b['macs'] / 1e9:.3f} |" for b in table["blocks"]]
    if comparison:
        lines += ["", f"| network ({comparison['minutes_each']} min each) | steps | train error | test error |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {n} | {p['steps']} | {100 * p['train_error']:.2f}% | {100 * p['test_error']:.2f}% |"
                  for n, p in comparison["final"].items()]
    return "\n".join(lines)
