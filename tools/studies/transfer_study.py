"""The transfer study's arms and its report: table, curves, machine description (``tools/transfer_study.py``).

Four ways to start a task head's training, compared at equal wall-clock budget
(:func:`~res_backbone.engine.budget.train_for_budget`):

==========================  ====================================================================
``scratch``                 random initialisation, BatchNorm trainable
``pretrained_frozen_bn``    pretrained backbone, BN frozen (FrozenBatchNorm), every conv trains
``pretrained_finetune_all`` pretrained backbone, everything trains (BN trainable)
``pretrained_freeze_25``    as ``finetune_all``, but the backbone (BN statistics included) is frozen
                            for the first quarter of the iterations, so the new head settles first
==========================  ====================================================================
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from res_backbone.engine.config import load_yaml

__all__ = ["ARMS", "Arm", "apply_quick", "arm_budgets", "detection_arms", "det_model_config", "final_point", "localization_arms",
           "machine_info", "markdown_report", "plot_curves", "pretrain", "run_arms", "run_study"]

PathLike = Union[str, os.PathLike]
log = logging.getLogger("transfer_study")

EVAL_ALLOWANCE = 0.15  # share of the time left after step 1 kept for rendering, model building and evaluation (~10% measured)
#: the detector of the study is the one of configs/det/fmnist_transfer.yaml (the same pipeline as one train_det.py run)
DET_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "det" / "fmnist_transfer.yaml"
_DET_MODEL_KEYS = ("fpn_channels", "representation_size", "anchor_sizes", "rpn_pre_nms_top_n_train",
                   "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
                   "rpn_batch_size_per_image", "box_batch_size_per_image")


def det_model_config(path: PathLike = DET_CONFIG) -> dict:
    """The detector's size keyword arguments (FPN width, box head, anchors, RPN/RoI sampling) from ``path``."""
    cfg = load_yaml(path)
    out = {k: cfg[k] for k in _DET_MODEL_KEYS}
    out["anchor_sizes"] = tuple((int(s),) for s in out["anchor_sizes"])  # one size per FPN level
    return out


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


def apply_quick(args) -> None:
    """--quick: sizes that run the whole pipeline in well under a minute (for tests)."""
    args.pretrain_iters, args.num_evals = 4, 2
    args.det_train, args.det_val, args.det_canvas, args.det_scale, args.det_batch = 8, 4, 64, [20.0, 30.0], 2
    args.loc_train, args.loc_val, args.loc_canvas, args.loc_batch = 16, 8, 32, 8
    args.det_lr = min(args.det_lr, 0.01)  # 4 pre-training steps leave BN statistics that 0.02 can blow up on 8 canvases
    args.det_minutes = args.det_minutes or 0.04
    args.loc_minutes = args.loc_minutes or 0.02


def pretrain(args, work: Path) -> dict:
    """Step 1: the grey resnet18 classifier (or the given checkpoint's record)."""
    from heads.classification import train as cls_run
    from heads.classification.run import run as run_classification

    if args.cls_checkpoint:
        import torch

        ck = torch.load(args.cls_checkpoint, map_location="cpu", weights_only=True)
        return {"checkpoint": str(args.cls_checkpoint), "arch": ck.get("model_name"), "iters": ck.get("iter"),
                "top1_err": (ck.get("metrics") or {}).get("top1_err"), "reused": True}
    cfg = cls_run.ClsTrainConfig(
        output=str(work / "pretrain"), backbone="resnet18", data_dir=args.fmnist_root, max_iters=args.pretrain_iters,
        batch_size=64 if not args.quick else 8, lr=0.05, schedule="cosine", warmup_iters=min(30, args.pretrain_iters),
        augment="flip", invert=args.pretrain_invert, amp=args.amp, channels_last=True, limit_val=2000, seed=args.seed,
        progress=False, checkpoint_every=10**6)
    m = run_classification(cfg)
    return {"checkpoint": str(work / "pretrain" / "checkpoint_best.pt"), "arch": "resnet18", "iters": m.get("iter"),
            "top1_err": m.get("top1_err"), "train_time_s": m.get("train_time_s"), "invert": args.pretrain_invert,
            "reused": False}


def run_arms(args, budget_s: float, batch_size: int, lr: float, warmup_iters: int, setup, task: str) -> list:
    """Train every arm of :data:`ARMS` for ``budget_s`` seconds; ``setup(arm, policy, norm, norm_eval)``
    returns ``(model, runner, data, optimizer, evaluate, transfer_info)`` for one arm."""
    import torch

    from res_backbone import transfer
    from res_backbone.engine.budget import train_for_budget
    from res_backbone.engine.runner import seed_everything

    arms, hint = [], None
    for arm in (a for a in ARMS if not args.arms or a.name in args.arms):
        seed_everything(args.seed)  # every arm starts from the same RNG state (heads, data order)
        policy, norm, norm_eval = transfer.resolve_bn_policy(arm.bn_policy, None, pretrained=arm.pretrained,
                                                             batch_size=batch_size)
        model, runner, data, optimizer, evaluate, info = setup(arm, policy, norm, norm_eval)
        log.info("%s arm %s (%s): %.2f min of training", task, arm.name, arm.label, budget_s / 60)
        res = train_for_budget(runner, data.train_loader, data.train_sampler, optimizer, device=torch.device("cpu"),
                               budget_s=budget_s, lr=lr, evaluate=partial(evaluate, arm.name), num_evals=args.num_evals,
                               warmup_iters=warmup_iters, freeze=transfer.BackboneFreeze(model.backbone, 0),
                               freeze_fraction=arm.freeze_fraction, unfrozen_s_per_iter=hint, amp=args.amp,
                               channels_last=True, clock=time.process_time if args.clock == "cpu" else time.perf_counter)
        if arm.name == "pretrained_finetune_all":  # the unfrozen speed, for planning the freeze arm
            hint = res["s_per_iter"]
        arms.append({"name": arm.name, "label": arm.label, "transfer": info, **res, "final": final_point(res["curve"])})
    return arms


def detection_arms(args, ckpt: str, budget_s: float) -> dict:
    """Step 2: the four arms on the composed detection set."""
    import torch

    from heads import build_detector
    from res_backbone import transfer
    from res_backbone.data.detection_fmnist import write_fmnist_detection
    from heads.detection import train as det_run
    from res_backbone.engine.distributed import DistInfo
    from res_backbone.engine.optim import build_optimizer

    t0 = time.perf_counter()
    lo, hi = args.det_scale
    root = Path(args.data_dir) / (f"det_c{args.det_canvas}_s{lo:g}-{hi:g}_d{args.det_dark_prob:g}_n{args.det_train}-"
                                  f"{args.det_val}_seed{args.seed}")
    paths = write_fmnist_detection(root, root=args.fmnist_root, num_train=args.det_train, num_val=args.det_val,
                                   canvas=args.det_canvas, scale=(lo, hi), dark_prob=args.det_dark_prob, seed=args.seed)
    render_s = time.perf_counter() - t0
    det_model = det_model_config()
    cfg = det_run.DetTrainConfig(
        output=str(Path(args.work_dir) / "det"), backbone="resnet18", image_size=args.det_canvas,
        batch_size=args.det_batch, lr=args.det_lr, schedule="cosine", warmup_iters=50 if not args.quick else 0,
        amp=args.amp, channels_last=True, workers=0, seed=args.seed, progress=False, **paths)
    dist = DistInfo()

    def setup(arm, policy, norm, norm_eval):
        train_set, val_set = det_run.load_datasets(cfg, dist)
        model = build_detector("resnet18", num_classes=len(train_set.cat_ids), pretrained=ckpt if arm.pretrained else False,
                               frozen_stages=0, norm=norm, **det_model)
        info = transfer.configure_backbone(model.backbone, bn_policy=policy, norm_eval=norm_eval)
        data = det_run.prepare_data(cfg, dist, train_set, val_set, info["mean"], info["std"])
        model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, name="sgd", lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

        def evaluate(name: str, it: int) -> dict:
            m = det_run.evaluate(model, data, cfg, torch.device("cpu"), None, is_main=True, write=False, progress=False)
            log.info("det %s: iteration %d AP %.3f AP50 %.3f", name, it, m["AP"], m["AP50"])
            return {"AP": m["AP"], "AP50": m["AP50"]}

        return model, model, data, optimizer, evaluate, info

    arms = run_arms(args, budget_s, args.det_batch, cfg.lr, cfg.warmup_iters, setup, "detection")
    return {"budget_s": budget_s, "render_s": round(render_s, 1), "data": paths, "train_images": args.det_train,
            "val_images": args.det_val, "canvas": args.det_canvas, "batch_size": args.det_batch, "lr": args.det_lr,
            "model": {"backbone": "resnet18", "arch": "fpn", **det_model}, "arms": arms}


def localization_arms(args, ckpt: str, budget_s: float) -> dict:
    """Step 3: the four arms on the built-in single-object localization set."""
    import torch

    from heads.localization import build_localizer, localization_loss
    from res_backbone import transfer
    from heads.localization import train as loc_run
    from heads.localization.evaluate import LossAdapter
    from heads.localization.evaluate import evaluate as loc_evaluate
    from res_backbone.engine.optim import build_optimizer

    t0 = time.perf_counter()
    cfg = loc_run.LocTrainConfig(
        output=str(Path(args.work_dir) / "loc"), data_dir=str(Path(args.data_dir) / "loc"), fmnist_root=args.fmnist_root,
        fmnist_train=args.loc_train, fmnist_val=args.loc_val, canvas=args.loc_canvas,
        item_scale=(28.0, 56.0) if args.loc_canvas >= 56 else (16.0, float(args.loc_canvas) * 0.8),
        batch_size=args.loc_batch, lr=args.loc_lr, warmup_iters=50 if not args.quick else 0, amp=args.amp,
        channels_last=True, seed=args.seed, progress=False)
    train_set, val_set = loc_run.load_datasets(cfg)
    render_s = time.perf_counter() - t0
    loss_fn = partial(localization_loss, cls_weight=cfg.cls_weight, l1_weight=cfg.l1_weight, giou_weight=cfg.giou_weight)

    def setup(arm, policy, norm, norm_eval):
        model = build_localizer("resnet18", train_set.num_classes, "scr", pretrained=ckpt if arm.pretrained else None,
                                input_size=cfg.image_size, norm=norm)
        info = transfer.configure_backbone(model.backbone, bn_policy=policy, norm_eval=norm_eval)
        data = loc_run.prepare_data(cfg, train_set, val_set, info["mean"], info["std"])
        model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, name="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)

        def evaluate(name: str, it: int) -> dict:
            m = loc_evaluate(model, data.val_loader, data.val_set, device=torch.device("cpu"), amp=args.amp,
                             channels_last=True, progress=False)
            log.info("loc %s: iteration %d top-1 loc err %.2f%%", name, it, m["top1_loc_err"])
            return {k: m[k] for k in ("top1_loc_err", "top1_cls_err", "mean_iou", "gt_known_loc_err")}

        return model, LossAdapter(model, loss_fn), data, optimizer, evaluate, info

    arms = run_arms(args, budget_s, args.loc_batch, cfg.lr, cfg.warmup_iters, setup, "localization")
    return {"budget_s": budget_s, "render_s": round(render_s, 1), "train_images": args.loc_train,
            "val_images": args.loc_val, "canvas": args.loc_canvas, "batch_size": args.loc_batch, "lr": args.loc_lr,
            "arms": arms}


def arm_budgets(args, spent_s: float, tasks) -> dict:
    """Training seconds per arm of each task: explicit minutes, or the rest of --budget-minutes split."""
    left = max(0.0, args.budget_minutes * 60 - spent_s) * (1 - EVAL_ALLOWANCE)
    shares = {"det": args.det_share if "loc" in tasks else 1.0, "loc": 1 - args.det_share if "det" in tasks else 1.0}
    explicit = {"det": args.det_minutes, "loc": args.loc_minutes}
    n_arms = len(args.arms) if args.arms else 4
    out = {}
    for t in tasks:
        out[t] = explicit[t] * 60 if explicit[t] else left * shares[t] / n_arms
        if not explicit[t] and out[t] < 10:
            raise ValueError(f"--budget-minutes {args.budget_minutes:g} leaves {out[t]:.0f} s per {t} arm after "
                             f"{spent_s / 60:.1f} min of pre-training and set-up; raise it or set --{t}-minutes")
    return out


def run_study(args, tasks: Sequence[str]) -> dict:
    """Steps 1-3 of ``tools/transfer_study.py`` for ``tasks`` (``det``, ``loc``); returns the result.

    Writes ``transfer.json`` and ``transfer.md`` into ``args.output`` after every step, and a PNG of
    the curves per task. Raises ``FileNotFoundError`` / ``FashionMNISTNotFoundError`` / ``ValueError``
    on missing data or a budget too small.
    """
    from res_backbone.io import atomic_write_text

    out, work = Path(args.output), Path(args.work_dir)
    start = time.perf_counter()
    result = {"options": vars(args), "machine": machine_info(), "timings": {}}

    def write() -> None:
        result["timings"]["total_s"] = round(time.perf_counter() - start, 1)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(result, indent=2) + "\n", out / "transfer.json")
        atomic_write_text(markdown_report(result) + "\n", out / "transfer.md")

    t = time.perf_counter()
    result["pretrain"] = pretrain(args, work)
    result["timings"]["pretrain_s"] = round(time.perf_counter() - t, 1)
    write()
    budgets = arm_budgets(args, time.perf_counter() - start, tasks)
    log.info("training per arm: %s", {k: f"{v / 60:.2f} min" for k, v in budgets.items()})
    ckpt = result["pretrain"]["checkpoint"]
    steps = {"det": ("detection", detection_arms, "AP", "COCO AP (val)", "transfer_det.png", "Detection"),
             "loc": ("localization", localization_arms, "top1_loc_err", "top-1 localization error (%)",
                     "transfer_loc.png", "Localization")}
    for task in tasks:
        key, run, metric, ylabel, png, title = steps[task]
        t = time.perf_counter()
        result[key] = run(args, ckpt, budgets[task])
        result["timings"][f"{key}_s"] = round(time.perf_counter() - t, 1)
        plot_curves(result[key]["arms"], metric, ylabel, out / png,
                    f"{title} on unseen Fashion-MNIST items, equal training time per arm",
                    "training time (min)" if args.clock == "wall" else "training CPU time (min)")
        write()
    return result
