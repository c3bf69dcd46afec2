"""Optimiser and learning-rate schedule: SGD (the paper's recipe) or AdamW, warmup, step or cosine decay."""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..layers import is_norm


def param_groups(
    model: nn.Module, *, weight_decay: float, backbone_lr_mult: float = 1.0, backbone_prefix: str = "backbone.",
    new_prefixes: Sequence[str] = ("backbone.fpn.",),
) -> List[dict]:
    """Split trainable parameters into groups: no weight decay on norms and biases; the backbone's
    learning rate scaled by ``backbone_lr_mult`` (each group carries ``lr_mult``). Parameters under
    ``new_prefixes`` (an FPN inside the backbone: new layers, no pretrained weights) keep the full rate."""
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or id(p) in norm_params
        in_backbone = name.startswith(backbone_prefix) and not name.startswith(tuple(new_prefixes))
        key = (no_decay, in_backbone)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_mult": backbone_lr_mult if in_backbone else 1.0}
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(
    model: nn.Module, *, name: str = "sgd", lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
    backbone_lr_mult: float = 1.0, fused: Optional[bool] = None,
) -> torch.optim.Optimizer:
    """SGD with momentum (the ResNet paper's recipe) or AdamW over :func:`param_groups`.

    ``fused``: torch's single-kernel implementation (None: when :func:`can_fuse` says the parameters
    allow it; False: the multi-tensor one).

    Frozen parameters are included too (with ``requires_grad`` temporarily False they get no
    update), so unfreezing the backbone later needs no new optimiser.
    """
    groups = param_groups(model, weight_decay=weight_decay, backbone_lr_mult=backbone_lr_mult)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if frozen:
        groups.append({"params": frozen, "weight_decay": weight_decay,
                       "lr_mult": backbone_lr_mult, "frozen_at_start": True})
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    if name == "sgd":
        cls, kwargs = torch.optim.SGD, dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif name == "adamw":
        cls, kwargs = torch.optim.AdamW, dict(lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer {name!r} is not supported; choose sgd or adamw")
    if fused is None:
        fused = can_fuse(p for g in groups for p in g["params"])
    return cls(groups, fused=bool(fused) or None, **kwargs)


def can_fuse(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused (one kernel per step) SGD/AdamW takes these parameters: floating point,
    all on one CPU or CUDA device. Measured on a 2-core CPU for a resnet18 (11.2M parameters): AdamW
    step 37 -> 7 ms, SGD 10 -> 4 ms; the update is the same arithmetic up to float rounding."""
    devices = set()
    for p in params:
        if not p.is_floating_point():
            return False
        devices.add(p.device)
    return len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")


def lr_factor(
    it: int, *, max_iters: int, warmup_iters: int = 0, warmup_factor: float = 0.001, schedule: str = "step",
    milestones: Sequence[float] = (0.67, 0.89), gamma: float = 0.1, min_factor: float = 0.0,
) -> float:
    """The multiplier of the base learning rate at iteration ``it`` (0-based).

    Linear warmup from ``warmup_factor`` over ``warmup_iters``; then ``"step"`` (x ``gamma`` at each
    milestone, given as fractions of ``max_iters`` or absolute iterations), ``"cosine"`` (to
    ``min_factor`` at ``max_iters``) or ``"constant"``.
    """
    if schedule == "step":
        steps = [m * max_iters if m < 1 else m for m in milestones]
        f = gamma ** sum(it >= s for s in steps)
    elif schedule == "cosine":
        t = min(it, max_iters) / max(1, max_iters)
        f = min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))
    elif schedule == "constant":
        f = 1.0
    else:
        raise ValueError(f"schedule {schedule!r} is not supported; choose step, cosine or constant")
    if it < warmup_iters:
        alpha = it / max(1, warmup_iters)
        f *= warmup_factor * (1 - alpha) + alpha
    return f


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Set every group's learning rate to ``base_lr * factor * group['lr_mult']``; return the base one."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * factor * g.get("lr_mult", 1.0)
    return base_lr * factor
