"""The transfer study's arms and its report: table, curves, machine description (``tools/transfer_study.py``).

Four ways to start a task head's training, compared at equal wall-clock budget
(:func:`~.budget.train_for_budget`):

==========================  ====================================================================
``scratch``                 random initialisation, BatchNorm trainable
``pretrained_frozen_bn``    pretrained backbone, BN frozen (FrozenBatchNorm), every conv trains
``pretrained_finetune_all`` pretrained backbone, everything trains (BN trainable)
``pretrained_freeze_25``    as ``finetune_all``, but the backbone (BN statistics included) is frozen
                            for the first quarter of the iterations, so the new head settles first
==========================  ====================================================================
"""
from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

__all__ = ["ARMS", "Arm", "final_point", "machine_info", "markdown_report", "plot_curves"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Arm:
    """One way to initialise and fine-tune (see the module docstring)."""

    name: str
    label: str
    pretrained: bool
    bn_policy: str
    freeze_fraction: float = 0.0


ARMS = (
    Arm("scratch", "from scratch", False, "trainable"),
    Arm("pretrained_frozen_bn", "pretrained, frozen BN", True, "frozen"),
    Arm("pretrained_finetune_all", "pretrained, fine-tune all", True, "trainable"),
    Arm("pretrained_freeze_25", "pretrained, backbone frozen 1st quarter", True, "trainable", 0.25),
)


def machine_info() -> dict:
    """CPU model, core count, torch version and threads: what the timings were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def markdown_report(result: Mapping) -> str:
    """``transfer.md``: the final numbers of every arm per task, and how they were obtained."""
    lines = ["# Transfer study: Fashion-MNIST pre-training -> detection and localization", ""]
    pre = result.get("pretrain") or {}
    if pre:
        lines += [f"Pre-training: {pre.get('arch', 'resnet18')} classifier on the Fashion-MNIST train split, "
                  f"{pre.get('iters', '?')} iterations"
                  + (f", images inverted with probability {pre['invert']}" if pre.get("invert") else "")
                  + f", top-1 error {_fmt(pre.get('top1_err'), 2)}% (`{pre.get('checkpoint')}`).", ""]

    def halfway(a: Mapping, key: str, budget_s: float) -> Optional[float]:
        pts = [p for p in a["curve"] if p["train_time_s"] <= 0.55 * budget_s]
        return pts[-1][key] if pts else None

    sections = (
        ("detection", "Detection (COCO AP on canvases of unseen Fashion-MNIST test-split items)",
         ("AP", "AP50", "AP at half time"),
         lambda a, b: (_fmt(a["final"]["AP"]), _fmt(a["final"]["AP50"]), _fmt(halfway(a, "AP", b)))),
        ("localization", "Localization (ILSVRC top-1 localization error, %, lower is better)",
         ("top-1 loc err", "top-1 cls err", "mean IoU", "top-1 loc err at half time"),
         lambda a, b: (_fmt(a["final"]["top1_loc_err"], 2), _fmt(a["final"]["top1_cls_err"], 2),
                       _fmt(a["final"]["mean_iou"]), _fmt(halfway(a, "top1_loc_err", b), 2))),
    )
    for key, heading, columns, cells in sections:
        task = result.get(key)
        if not task:
            continue
        unit = "CPU minutes" if (result.get("options") or {}).get("clock") == "cpu" else "minutes"
        lines += [f"## {heading}", "", f"Each arm trained for {_fmt(task['budget_s'] / 60, 2)} {unit} (evaluation "
                  "not counted).", "", "| arm | iterations | " + " | ".join(columns) + " |",
                  "|---|---:|" + "---:|" * len(columns)]
        lines += [f"| {a['label']} | {a['iters']} | " + " | ".join(cells(a, task["budget_s"])) + " |"
                  for a in task["arms"]]
        lines += ["", _gap_line(task, key), ""]
    t = result.get("timings") or {}
    if t:
        lines += [f"Total wall-clock {_fmt(t.get('total_s', 0) / 60, 1)} min on {result['machine']['cpu']} "
                  f"({result['machine']['cpu_count']} cores, {result['machine']['threads']} torch thread(s)).", ""]
    return "\n".join(lines)


def _gap_line(task: Mapping, key: str) -> str:
    """The best pretrained arm against scratch, at the end of the budget (positive = pretraining helps)."""
    metric, sign, unit = ("AP", 1.0, "AP") if key == "detection" else ("top1_loc_err", -1.0, "points of error")
    by = {a["name"]: a for a in task["arms"]}
    if "scratch" not in by or len(by) < 2:
        return ""
    base = by["scratch"]["final"].get(metric)
    best = max((a for a in task["arms"] if a["name"] != "scratch"), key=lambda a: sign * a["final"].get(metric, 0.0))
    if base is None or best["final"].get(metric) is None:
        return ""
    gain = sign * (best["final"][metric] - base)
    return f"Best pretrained arm ({best['label']}) vs from scratch at equal budget: {gain:+.3f} {unit}."


def plot_curves(arms: Sequence[Mapping], key: str, ylabel: str, path: PathLike, title: str,
                time_label: str = "training time (min)") -> str:
    """One curve per arm of ``curve[i][key]`` against iterations (left) and training minutes (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for a in arms:
        pts = [p for p in a["curve"] if isinstance(p.get(key), (int, float))]
        ys = [p[key] for p in pts]
        axes[0].plot([p["iter"] for p in pts], ys, marker="o", label=a["label"])
        axes[1].plot([p["train_time_s"] / 60 for p in pts], ys, marker="o", label=a["label"])
    axes[0].set_xlabel("iterations")
    axes[1].set_xlabel(time_label)
    for ax in axes:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def final_point(curve: List[Dict[str, float]]) -> Dict[str, float]:
    """The last evaluation of a curve (the arm's result at the end of its budget)."""
    return dict(curve[-1]) if curve else {}
