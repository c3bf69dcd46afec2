"""The data-efficiency curve of ``tools/transfer_study.py --curve`` (issue 18): when does pre-training pay?

1. **Pre-training sources** (:data:`SOURCES`): ``fmnist``, a grey resnet18 on plain Fashion-MNIST
   (the original study's step 1), and ``rendered``, an RGB resnet18 on Fashion-MNIST *train* items
   rendered as the detection canvases render them (:mod:`res_backbone.data.pretrain_fmnist`), labelled
   by item class. Neither ever sees a test-split item, which the detection canvases are made of.
2. **Probe** (:func:`probe`): global-pooled res5 features of each frozen backbone (and of a random
   init) on true-box crops of detection canvases; a linear probe (multinomial logistic regression) and
   k-NN, fitted on crops of target *train* canvases, scored on crops of the fixed val canvases.
3. **Curve** (:func:`run_curve`): for each target size N, every arm (:func:`curve_arms`: scratch,
   and per source fine-tune-all / frozen BN) and seed trains the same number of iterations, at its own
   learning rate (the best of a small sweep at one N), and is evaluated once on the same val set.

Records (one per task, arm, N, seed) go to ``transfer_curve.json``; ``transfer_curve.md`` holds the
tables, ``transfer_curve.png`` the picture (metric against N, log x, mean line and seed spread).
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

log = logging.getLogger("transfer_study")

__all__ = ["CurveArm", "Runner", "SOURCES", "apply_curve_smoke", "curve_arms", "crossings", "curve_markdown", "plot_curve",
           "pretrain_rendered", "probe", "probe_accuracies", "run_curve", "run_curve_study", "summarise"]

SOURCES = ("fmnist", "rendered")
METRICS = {"det": ("AP", "AP50"), "loc": ("top1_loc_err", "top1_cls_err", "mean_iou")}
HIGHER_BETTER = {"det": True, "loc": False}
_MAIN = {"det": "AP", "loc": "top1_loc_err"}
DIVERGED = {"det": {"AP": 0.0, "AP50": 0.0}, "loc": {"top1_loc_err": 100.0, "top1_cls_err": 100.0, "mean_iou": 0.0}}
"""A run that stopped on non-finite losses scores as the worst possible run (and carries ``diverged``)."""


@dataclass(frozen=True)
class CurveArm:
    """How one curve run starts: ``source`` None (random init) or a key of :data:`SOURCES`; a BN policy."""

    name: str
    label: str
    source: Optional[str]
    bn_policy: str


def curve_arms(names: Optional[Sequence[str]] = None) -> List[CurveArm]:
    """The arms (all five, or those named): scratch; ``<source>_finetune_all``; ``<source>_frozen_bn``."""
    arms = [CurveArm("scratch", "from scratch", None, "trainable")]
    for s in SOURCES:
        arms += [CurveArm(f"{s}_finetune_all", f"{s} pre-trained, fine-tune all", s, "trainable"),
                 CurveArm(f"{s}_frozen_bn", f"{s} pre-trained, frozen BN", s, "frozen")]
    if names is None:
        return arms
    by = {a.name: a for a in arms}
    unknown = [n for n in names if n not in by]
    if unknown:
        raise ValueError(f"unknown curve arm(s) {unknown}; choose from {list(by)}")
    return [by[n] for n in names]


# ---------------------------------------------------------------------- pre-training
def pretrain_rendered(args, work: Path) -> dict:
    """Pre-train an RGB resnet18 on rendered train-item crops; returns its record (checkpoint, error)."""
    from heads.classification import train as cls_run
    from res_backbone.data.classification import ClsDatasets, TensorClassification, build_cls_transforms
    from res_backbone.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
    from res_backbone.data.pretrain_fmnist import render_pretrain_crops
    from res_backbone.engine.runner import seed_everything

    t0 = time.perf_counter()
    items = tuple(t.numpy() for t in load_fashion_mnist("train", args.fmnist_root))
    render = dict(canvas=args.det_canvas, size=args.probe_size, scale=tuple(args.det_scale),
                  dark_prob=args.det_dark_prob, seed=args.seed)
    train_x, train_y = render_pretrain_crops(items, num_canvases=args.render_canvases, split=0, **render)
    val_x, val_y = render_pretrain_crops(items, num_canvases=max(1, args.render_canvases // 10), split=1, **render)
    render_s = time.perf_counter() - t0
    x = train_x.float() / 255.0
    mean = tuple(x.mean((0, 2, 3)).tolist())
    std = tuple(x.std((0, 2, 3)).clamp_min(1e-3).tolist())
    names = list(FASHION_MNIST_CLASSES)
    data = ClsDatasets(
        TensorClassification(train_x, train_y, build_cls_transforms(train=True, mean=mean, std=std, augment="flip"),
                             3, names),
        TensorClassification(val_x, val_y, build_cls_transforms(train=False, mean=mean, std=std), 3, names),
        names, 3, mean, std, (3, args.probe_size, args.probe_size), 1.0, "rendered_fmnist")
    cfg = cls_run.ClsTrainConfig(
        output=str(work / "pretrain_rendered"), backbone="resnet18", max_iters=args.render_iters,
        batch_size=args.render_batch, lr=0.025 * args.render_batch / 32, schedule="cosine", warmup_iters=min(30, args.render_iters),
        augment="flip", amp=args.amp, channels_last=True, seed=args.seed, progress=False, checkpoint_every=10**6,
        workers=0).resolved(data)
    seed_everything(cfg.seed)
    model = cls_run.build_model(cfg, data, load_pretrained=False)
    m = cls_run.fit(model, data, cls_run.make_loaders(cfg, data), cfg)
    return {"checkpoint": str(work / "pretrain_rendered" / "checkpoint_best.pt"), "arch": "resnet18",
            "iters": m.get("iter"), "top1_err": m.get("top1_err"), "train_time_s": m.get("train_time_s"),
            "crops": len(train_y), "val_crops": len(val_y), "canvases": args.render_canvases,
            "size": args.probe_size, "render_s": round(render_s, 1), "reused": False}


# ---------------------------------------------------------------------- probe
def _probe_crops(args, split: str, num: int):
    """True-box crops (uint8 ``(N, 3, s, s)``) and labels of ``num`` detection canvases of ``split``."""
    from res_backbone.data.detection_fmnist import iter_fmnist_detection
    from res_backbone.data.fashion_mnist import load_fashion_mnist
    from res_backbone.data.pretrain_fmnist import box_crops

    items = tuple(t.numpy() for t in load_fashion_mnist("test", args.fmnist_root))
    crops, labels = [], []
    for image, boxes, lab, _ in iter_fmnist_detection(split, items, num_images=num, canvas=args.det_canvas,
                                                      scale=tuple(args.det_scale), dark_prob=args.det_dark_prob,
                                                      seed=args.seed):
        crops.append(box_crops(image, boxes, args.probe_size))
        labels += lab
    return torch.cat(crops), torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def _features(checkpoint: Optional[str], crops: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Global-pooled res5 features ``(N, C)`` of the frozen backbone (eval mode) on uint8 crops."""
    from res_backbone import create_backbone
    from res_backbone.transfer import input_stats

    torch.manual_seed(0)  # the random-init arm: one fixed draw
    bb = create_backbone("resnet18", pretrained=checkpoint or False, in_chans=3, out_features=["res5"]).eval()
    mean, std = input_stats(getattr(bb, "pretrained_cfg", None) if checkpoint else None, 3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    out = [bb((crops[i:i + batch].float() / 255.0 - m) / s)["res5"].mean((2, 3)) for i in range(0, len(crops), batch)]
    return torch.cat(out)


def probe_accuracies(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor, *,
                     k: int = 10, weight_decay: float = 1e-3, steps: int = 100, num_classes: int = 10) -> dict:
    """Linear-probe and k-NN accuracy (%) of features: standardised on ``train_f``; logistic regression
    (LBFGS, L2 ``weight_decay``) and cosine k-NN (majority of the ``k`` nearest, ties to the nearer)."""
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    a, b = (train_f - mu) / sd, (test_f - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(a.shape[1], num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(a), train_y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        linear = float((lin(b).argmax(1) == test_y).float().mean()) * 100
        an, bn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        sim, idx = (bn @ an.T).topk(min(k, len(a)), dim=1)
        votes = torch.zeros(len(b), num_classes).scatter_add_(1, train_y[idx], 1.0 + 1e-3 * sim)
        knn = float((votes.argmax(1) == test_y).float().mean()) * 100
    return {"linear_acc": round(linear, 2), "knn_acc": round(knn, 2)}


def probe(args, sources: Mapping[str, dict]) -> dict:
    """Probe accuracies of random init and of every pre-training source's backbone (module docstring)."""
    t0 = time.perf_counter()
    tr_x, tr_y = _probe_crops(args, "train", args.probe_train)
    te_x, te_y = _probe_crops(args, "val", args.det_val)
    out = {"crop_size": args.probe_size, "train_crops": len(tr_y), "val_crops": len(te_y), "backbones": {}}
    for name, ckpt in [("random_init", None)] + [(s, rec["checkpoint"]) for s, rec in sources.items()]:
        res = probe_accuracies(_features(ckpt, tr_x), tr_y, _features(ckpt, te_x), te_y)
        out["backbones"][name] = res
        log.info("probe %s: linear %.1f%%, k-NN %.1f%%", name, res["linear_acc"], res["knn_acc"])
    out["time_s"] = round(time.perf_counter() - t0, 1)
    return out


# ---------------------------------------------------------------------- one run of the curve
def _det_run(args, paths: dict, arm: CurveArm, ckpt: Optional[str], lr: float, seed: int) -> dict:
    from heads import build_detector
    from heads.detection import train as det_run
    from res_backbone import transfer
    from res_backbone.engine.distributed import DistInfo
    from res_backbone.engine.optim import build_optimizer
    from studies.transfer_study import det_model_config

    cfg = det_run.DetTrainConfig(
        output=str(Path(args.work_dir) / "curve_det"), backbone="resnet18", image_size=args.det_canvas,
        batch_size=args.curve_det_batch, lr=lr, schedule="cosine", amp=args.amp, channels_last=True, workers=0,
        seed=seed, progress=False, **paths)
    dist = DistInfo()
    policy, norm, norm_eval = transfer.resolve_bn_policy(arm.bn_policy, None, pretrained=ckpt is not None,
                                                         batch_size=cfg.batch_size)
    train_set, val_set = det_run.load_datasets(cfg, dist)
    model = build_detector("resnet18", num_classes=len(train_set.cat_ids), pretrained=ckpt or False,
                           frozen_stages=0, norm=norm, **det_model_config())
    info = transfer.configure_backbone(model.backbone, bn_policy=policy, norm_eval=norm_eval)
    data = det_run.prepare_data(cfg, dist, train_set, val_set, info["mean"], info["std"])
    model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, name="sgd", lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def evaluate(it: int) -> dict:
        m = det_run.evaluate(model, data, cfg, torch.device("cpu"), None, is_main=True, write=False, progress=False)
        return {"AP": m["AP"], "AP50": m["AP50"]}

    return _train(args, model, data, optimizer, lr, evaluate, _iters(args, "det"))


def _loc_cfg(args, n: int, lr: float, seed: int):
    from heads.localization import train as loc_run

    return loc_run.LocTrainConfig(
        output=str(Path(args.work_dir) / "curve_loc"), data_dir=str(Path(args.data_dir) / "loc"),
        fmnist_root=args.fmnist_root, fmnist_train=n, fmnist_val=args.loc_val, canvas=args.loc_canvas,
        item_scale=(28.0, 56.0) if args.loc_canvas >= 56 else (16.0, float(args.loc_canvas) * 0.8),
        batch_size=args.curve_loc_batch, lr=lr, amp=args.amp, channels_last=True, seed=seed, progress=False)


def _loc_run(args, n: int, arm: CurveArm, ckpt: Optional[str], lr: float, seed: int) -> dict:
    from heads.localization import build_localizer, localization_loss
    from heads.localization import train as loc_run
    from heads.localization.evaluate import LossAdapter
    from heads.localization.evaluate import evaluate as loc_evaluate
    from res_backbone import transfer
    from res_backbone.engine.optim import build_optimizer

    cfg = _loc_cfg(args, n, lr, args.seed)  # the data (rendering) seed stays fixed; ``seed`` drives order and init
    train_set, val_set = loc_run.load_datasets(cfg)
    cfg.seed = seed
    policy, norm, norm_eval = transfer.resolve_bn_policy(arm.bn_policy, None, pretrained=ckpt is not None,
                                                         batch_size=cfg.batch_size)
    model = build_localizer("resnet18", train_set.num_classes, "scr", pretrained=ckpt, input_size=cfg.image_size,
                            norm=norm)
    info = transfer.configure_backbone(model.backbone, bn_policy=policy, norm_eval=norm_eval)
    data = loc_run.prepare_data(cfg, train_set, val_set, info["mean"], info["std"])
    model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, name="adamw", lr=lr, weight_decay=cfg.weight_decay)
    loss_fn = partial(localization_loss, cls_weight=cfg.cls_weight, l1_weight=cfg.l1_weight, giou_weight=cfg.giou_weight)

    def evaluate(it: int) -> dict:
        m = loc_evaluate(model, data.val_loader, data.val_set, device=torch.device("cpu"), amp=args.amp,
                         channels_last=True, progress=False)
        return {k: m[k] for k in METRICS["loc"]}

    return _train(args, LossAdapter(model, loss_fn), data, optimizer, lr, evaluate, _iters(args, "loc"))


def _iters(args, task: str) -> int:
    """The task's iterations per run: ``--curve-iters`` when given, else ``--curve-det-iters`` / ``--curve-loc-iters``."""
    return args.curve_iters or getattr(args, f"curve_{task}_iters")


def _train(args, runner, data, optimizer, lr: float, evaluate, iters: int) -> dict:
    """``iters`` iterations (the same for every arm and N), one evaluation at the end."""
    from res_backbone.engine.budget import train_for_budget

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    res = train_for_budget(runner, data.train_loader, data.train_sampler, optimizer, device=torch.device("cpu"),
                           budget_s=1e9, lr=lr, evaluate=evaluate, num_evals=1, max_iters=iters,
                           warmup_iters=min(20, iters // 5), amp=args.amp, channels_last=True, clock=clock)
    return {"iters": res["iters"], "train_time_s": res["train_time_s"], "eval_time_s": res["eval_time_s"],
            **res["curve"][-1]}


# ---------------------------------------------------------------------- the curve
def _det_paths(args, n: int) -> dict:
    from res_backbone.data.detection_fmnist import write_fmnist_detection

    lo, hi = args.det_scale
    root = Path(args.data_dir) / (f"det_c{args.det_canvas}_s{lo:g}-{hi:g}_d{args.det_dark_prob:g}_n{n}-"
                                  f"{args.det_val}_seed{args.seed}")
    return write_fmnist_detection(root, root=args.fmnist_root, num_train=n, num_val=args.det_val,
                                  canvas=args.det_canvas, scale=(lo, hi), dark_prob=args.det_dark_prob, seed=args.seed)


def _one(args, task: str, arm: CurveArm, n: int, seed: int, lr: float, sources: Mapping[str, dict]) -> dict:
    from res_backbone.engine.optim_step import NonFiniteLossError
    from res_backbone.engine.runner import seed_everything

    seed_everything(seed)
    ckpt = sources[arm.source]["checkpoint"] if arm.source else None
    t0 = time.perf_counter()
    try:
        if task == "det":
            res = _det_run(args, _det_paths(args, n), arm, ckpt, lr, seed)
        else:
            res = _loc_run(args, n, arm, ckpt, lr, seed)
    except NonFiniteLossError as e:  # a learning rate too high for this arm: the sweep's answer, not a crash
        log.warning("%s %s N=%d seed=%d lr=%g diverged: %s", task, arm.name, n, seed, lr, e)
        res = {**DIVERGED[task], "iters": None, "diverged": str(e).split(";")[0]}
    return {"task": task, "arm": arm.name, "label": arm.label, "source": arm.source, "bn_policy": arm.bn_policy,
            "N": n, "seed": seed, "lr": lr, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()},
            "wall_s": round(time.perf_counter() - t0, 1)}


def _worker_init(parent: int) -> None:
    """A pool process ends with the study: on Linux, the kernel sends it SIGTERM when its parent dies
    (a killed study would otherwise leave its workers training to the end of their runs); a parent that
    died while this process was starting is caught by the pid check."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent:
        os._exit(1)


def _in_worker(threads: int, fn, *a):
    """Run ``fn(*a)`` in a pool process with ``threads`` torch threads (and logging to stderr)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s [worker %(process)d] %(message)s",
                            datefmt="%H:%M:%S")
    torch.set_num_threads(threads)
    return fn(*a)


class Runner:
    """Runs independent calls one after another (``jobs`` 1) or in ``jobs`` spawned processes of
    ``threads`` torch threads each: on the 2-core CPU, two one-thread runs side by side finish about
    twice as many runs per hour as one run at a time (each run is too small to use two threads well)."""

    def __init__(self, jobs: int = 1, threads: int = 1):
        self.jobs, self.threads, self._pool = max(1, int(jobs)), threads, None

    def __enter__(self) -> "Runner":
        if self.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(os.getpid(),))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=exc[0] is None, cancel_futures=True)

    def map(self, calls: Sequence[tuple]):
        """Yield ``(index, result)`` of each ``(fn, *args)`` in ``calls`` as it finishes."""
        if self._pool is None:
            for i, (fn, *a) in enumerate(calls):
                yield i, fn(*a)
            return
        from concurrent.futures import as_completed

        futures = {self._pool.submit(_in_worker, self.threads, fn, *a): i for i, (fn, *a) in enumerate(calls)}
        for f in as_completed(futures):
            yield futures[f], f.result()


def _prepare(args, task: str, n: int) -> None:
    """Render the data set of (task, N) once, before runs that read it start side by side."""
    if task == "det":
        _det_paths(args, n)
    else:
        from heads.localization import train as loc_run

        loc_run.resolve_data_paths(_loc_cfg(args, n, 0.0, args.seed))


def _better(task: str, a: float, b: float) -> bool:
    return a > b if HIGHER_BETTER[task] else a < b


def scratch_sweep(args, tasks: Sequence[str]) -> List[tuple]:
    """The from-scratch arm's sweep runs ``(task, arm, N, seed, lr)``: they need no pre-trained source,
    so :func:`run_curve_study` runs them beside the pre-training."""
    if "scratch" not in args.curve_arms:
        return []
    return [(t, curve_arms(["scratch"])[0], args.sweep_n, args.seed, lr) for t in tasks if len(_lrs(args, t)) > 1
            for lr in _lrs(args, t)]


def _lrs(args, task: str) -> List[float]:
    """The task's swept learning rates (``--det-lrs`` / ``--loc-lrs``)."""
    return args.det_lrs if task == "det" else args.loc_lrs


def _log_record(rec: Mapping) -> None:
    log.info("%s %s N=%d seed=%d lr=%g: %s (%.0f s)", rec["task"], rec["arm"], rec["N"], rec["seed"], rec["lr"],
             ", ".join(f"{k} {rec[k]:.3f}" for k in METRICS[rec["task"]][:2]), rec["wall_s"])


def run_curve(args, tasks: Sequence[str], sources: Mapping[str, dict], out: Optional[dict] = None, on_record=None,
              runner: Optional[Runner] = None, done: Optional[Mapping[tuple, dict]] = None) -> dict:
    """For every task: the sweep (each arm's learning rate at ``--sweep-n``, first seed; an arm that
    diverges at every rate tries half the lowest, up to three times), then every
    (arm, N, seed) run at the arm's best rate. Fills ``out[task]`` (``sweep``, ``best_lr``, ``records``,
    in a fixed order whatever order runs finish in) and calls ``on_record()`` after each run. The
    sweeps of all tasks run first, then all other runs, through ``runner`` (sequential by default).
    ``done`` maps ``(task, arm, N, seed, lr)`` to records of runs made already (:func:`scratch_sweep`)."""
    runner, done = runner or Runner(), done or {}
    out = out if out is not None else {}
    arms = [a for a in curve_arms(args.curve_arms) if a.source is None or a.source in sources]
    for task in tasks:
        out[task] = {"sweep": [], "best_lr": {}, "records": []}
        for n in sorted(set(args.curve_n[task]) | {args.sweep_n}):
            _prepare(args, task, n)

    def execute(specs: List[tuple], slots: Dict[str, list], key: str) -> None:
        """Run ``specs`` ``(task, arm, N, seed, lr)`` (those in ``done`` ran already); the k-th run of a
        task fills its k-th empty slot."""
        free = {t: [i for i, r in enumerate(slots[t]) if r is None] for t in tasks}
        place, taken, todo = [], {t: 0 for t in tasks}, []
        for i, (t, arm, n, seed, lr) in enumerate(specs):
            place.append(free[t][taken[t]])
            taken[t] += 1
            if (t, arm.name, n, seed, lr) in done:
                slots[t][place[i]] = dict(done[(t, arm.name, n, seed, lr)])
            else:
                todo.append(i)
        for t in tasks:
            out[t][key] = [r for r in slots[t] if r is not None]
        for j, rec in runner.map([(_one, args, *specs[i], sources) for i in todo]):
            _log_record(rec)
            t = specs[todo[j]][0]
            slots[t][place[todo[j]]] = rec
            out[t][key] = [r for r in slots[t] if r is not None]
            if on_record:
                on_record()

    lrs = {t: _lrs(args, t) for t in tasks}
    sweep = [(t, a, args.sweep_n, args.seed, lr) for t in tasks if len(lrs[t]) > 1 for a in arms for lr in lrs[t]]
    execute(sweep, {t: [None] * sum(s[0] == t for s in sweep) for t in tasks}, "sweep")
    for _ in range(3):  # an arm that diverged at every rate tries half the lowest, down to 1/8 of it
        more = []
        for t in tasks:
            for arm in arms:
                mine = [r for r in out[t]["sweep"] if r["arm"] == arm.name]
                if mine and all(r.get("diverged") for r in mine):
                    more.append((t, arm, args.sweep_n, args.seed, min(r["lr"] for r in mine) / 2))
        if not more:
            break
        execute(more, {t: out[t]["sweep"] + [None] * sum(m[0] == t for m in more) for t in tasks}, "sweep")
    slots: Dict[str, list] = {}
    specs: List[tuple] = []
    for t in tasks:
        best = out[t]["best_lr"]
        for arm in arms:
            mine = [r for r in out[t]["sweep"] if r["arm"] == arm.name]
            best[arm.name] = (min(mine, key=lambda r: -r[_MAIN[t]] if HIGHER_BETTER[t] else r[_MAIN[t]])["lr"]
                              if mine else lrs[t][0])
        slots[t] = []
        for n in args.curve_n[t]:
            for arm in arms:
                for s in range(args.curve_seeds):
                    seed = args.seed + s
                    hit = [r for r in out[t]["sweep"] if r["arm"] == arm.name and r["N"] == n and r["seed"] == seed
                           and r["lr"] == best[arm.name]]  # the sweep's run at the chosen lr is this run
                    slots[t].append(dict(hit[0]) if hit else None)
                    if not hit:
                        specs.append((t, arm, n, seed, best[arm.name]))
    execute(specs, slots, "records")
    return out


def summarise(records: Sequence[Mapping], task: str) -> Dict[str, Dict[int, dict]]:
    """``{arm: {N: {"mean", "min", "max", "n"}}}`` of the task's main metric over seeds."""
    out: Dict[str, Dict[int, dict]] = {}
    for r in records:
        out.setdefault(r["arm"], {}).setdefault(r["N"], []).append(r[_MAIN[task]])
    return {a: {n: {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "n": len(v)}
                for n, v in sorted(d.items())} for a, d in out.items()}


def crossings(summary: Mapping[str, Mapping[int, dict]], task: str) -> Dict[str, dict]:
    """Per pre-trained arm: its gap to scratch at every N (positive = pre-training better) and the
    smallest N at which scratch is at least as good (None: not within the Ns measured)."""
    if "scratch" not in summary:
        return {}
    sign = 1 if HIGHER_BETTER[task] else -1
    out = {}
    for arm, by_n in summary.items():
        if arm == "scratch":
            continue
        gaps = {n: sign * (v["mean"] - summary["scratch"][n]["mean"]) for n, v in by_n.items()
                if n in summary["scratch"]}
        meet = next((n for n, g in sorted(gaps.items()) if g <= 0), None)
        out[arm] = {"gap": {n: round(g, 4) for n, g in gaps.items()}, "meets_scratch_at": meet}
    return out


def curve_markdown(result: Mapping) -> str:
    """``transfer_curve.md``: pre-training, probe, sweep and curve tables, where the lines meet."""
    lines = ["# Transfer curve: when does pre-training pay? (`tools/transfer_study.py --curve`)", ""]
    src = result.get("sources") or {}
    if src:
        lines += ["| pre-training source | iterations | top-1 err on its own val (%) | checkpoint |", "|---|---:|---:|---|"]
        lines += [f"| {k} | {v.get('iters')} | {_f(v.get('top1_err'), 2)} | `{v.get('checkpoint')}` |"
                  for k, v in src.items()]
        lines.append("")
    pr = result.get("probe")
    if pr:
        lines += [f"Probe: frozen global-pooled res5 features on {pr['val_crops']} true-box crops ({pr['crop_size']} "
                  f"px) of the val canvases, fitted on {pr['train_crops']} crops of train canvases "
                  f"({pr['time_s']:.0f} s).", "", "| backbone | linear probe acc (%) | k-NN acc (%) |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['linear_acc']:.1f} | {v['knn_acc']:.1f} |" for k, v in pr["backbones"].items()]
        lines.append("")
    for task, title in (("det", "Detection: COCO AP"), ("loc", "Localization: top-1 localization error (%)")):
        cur = (result.get("curve") or {}).get(task)
        if not cur or not cur["records"]:
            continue
        summ = summarise(cur["records"], task)
        ns = sorted({r["N"] for r in cur["records"]})
        digits = 3 if task == "det" else 1
        its = sorted({r["iters"] for r in cur["records"] if r["iters"] is not None})
        lines += [f"## {title}, mean over seeds (min-max), {'/'.join(map(str, its))} iterations per run",
                  "", "| arm | lr | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|---:|" + "---:|" * len(ns)]
        for arm, by_n in summ.items():
            cells = [f"{_f(by_n[n]['mean'], digits)} ({_f(by_n[n]['min'], digits)}-{_f(by_n[n]['max'], digits)})"
                     if n in by_n else "" for n in ns]
            lines.append(f"| {arm} | {cur['best_lr'].get(arm)} | " + " | ".join(cells) + " |")
        lines.append("")
        if cur["sweep"]:
            lines.append(f"Learning rates: the best of {sorted({r['lr'] for r in cur['sweep']})} per arm at "
                         f"N={cur['sweep'][0]['N']}, seed {cur['sweep'][0]['seed']}: " + "; ".join(
                             f"{r['arm']} lr {r['lr']:g}: " + ("diverged" if r.get("diverged") else
                                                               f"{_f(r[_MAIN[task]], digits)}")
                             for r in cur["sweep"]) + ".")
        bad = [r for r in cur["records"] if r.get("diverged")]
        if bad:
            lines.append("Diverged (scored as the worst possible run): " + ", ".join(
                f"{r['arm']} N={r['N']} seed {r['seed']}" for r in bad) + ".")
        for arm, c in crossings(summ, task).items():
            meet = f"meets scratch at N={c['meets_scratch_at']}" if c["meets_scratch_at"] else "above scratch at every N"
            gaps = ", ".join(f"N={n}: {g:+.{digits}f}" for n, g in sorted(c["gap"].items()))
            lines.append(f"* {arm}: {meet} (advantage {gaps})")
        lines.append("")
    t = result.get("timings") or {}
    if t:
        lines += [f"Total {t.get('total_s', 0) / 60:.1f} min wall, {t.get('cpu_s', 0) / 60:.1f} min CPU (this process and its workers).", ""]
    return "\n".join(lines)


def _f(v, d: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}f}"


def plot_curve(result: Mapping, path) -> str:
    """Metric against N (log x), one line per arm (mean over seeds) with the seeds' min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("det", "loc") if (result.get("curve") or {}).get(t, {}).get("records")]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6.2 * max(1, len(tasks)), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for arm, by_n in summarise(result["curve"][task]["records"], task).items():
            ns = sorted(by_n)
            line, = ax.plot(ns, [by_n[n]["mean"] for n in ns], marker="o", label=arm)
            ax.fill_between(ns, [by_n[n]["min"] for n in ns], [by_n[n]["max"] for n in ns], alpha=0.2,
                            color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("target training images N (log)")
        ax.set_ylabel("COCO AP (val)" if task == "det" else "top-1 localization error (%)")
        ax.set_title("Detection" if task == "det" else "Localization")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    its = {t: sorted({r["iters"] for r in result["curve"][t]["records"] if r["iters"] is not None}) for t in tasks}
    fig.suptitle("Data efficiency, equal iterations for every arm and N: "
                 + ", ".join(f"{t} {'/'.join(map(str, v))}" for t, v in its.items()))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def apply_curve_smoke(args) -> None:
    """--smoke: sizes that run pre-training, probe and curve in seconds (numbers mean nothing)."""
    args.pretrain_iters, args.render_iters, args.render_canvases, args.render_batch = 3, 3, 12, 8
    args.det_val, args.det_canvas, args.det_scale = 4, 48, [16.0, 24.0]
    args.probe_train, args.probe_size = 4, 32
    args.loc_val, args.loc_canvas = 4, 24
    args.curve_iters, args.curve_seeds, args.curve_det_batch, args.curve_loc_batch = 1, 2, 2, 4
    args.curve_det_iters = args.curve_loc_iters = None
    args.curve_n = {"det": [8], "loc": [8, 16]}
    args.curve_arms = [a for a in ("scratch", "fmnist_finetune_all", "rendered_frozen_bn")
                       if a == "scratch" or a.split("_")[0] in args.sources]
    args.det_lrs, args.loc_lrs, args.sweep_n = [0.01], [0.001, 0.002], 8


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished (joined) worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_curve_study(args) -> dict:
    """Pre-training sources, probe, and (unless ``--probe-only``) the curves; writes the outputs as it goes."""
    from res_backbone.io import atomic_write_text
    from studies.transfer_study import machine_info, pretrain

    out, work = Path(args.output), Path(args.work_dir)
    start, cpu0 = time.perf_counter(), _cpu_s()
    result = {"options": {k: v for k, v in vars(args).items()}, "machine": machine_info(), "timings": {}}

    def write() -> None:
        result["timings"].update(total_s=round(time.perf_counter() - start, 1),
                                 cpu_s=round(_cpu_s() - cpu0, 1))
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(result, indent=2) + "\n", out / "transfer_curve.json")
        atomic_write_text(curve_markdown(result) + "\n", out / "transfer_curve.md")

    with Runner(args.jobs, args.threads) as runner:
        sources, todo = {}, []
        for name in args.sources:
            if name == "fmnist" and not args.cls_checkpoint:
                todo.append((name, (pretrain, args, work)))
            elif name == "fmnist":
                sources[name] = pretrain(args, work)
            elif args.rendered_checkpoint:
                ck = torch.load(args.rendered_checkpoint, map_location="cpu", weights_only=True)
                sources[name] = {"checkpoint": str(args.rendered_checkpoint), "arch": ck.get("model_name"),
                                 "iters": ck.get("iter"), "top1_err": (ck.get("metrics") or {}).get("top1_err"),
                                 "reused": True}
            else:
                todo.append((name, (pretrain_rendered, args, work)))
        early = [] if args.probe_only else scratch_sweep(args, args.tasks)
        for task in sorted({e[0] for e in early}):
            _prepare(args, task, args.sweep_n)
        done = {}
        t = time.perf_counter()
        calls = [call for _, call in todo] + [(_one, args, *e, {}) for e in early]
        for i, rec in runner.map(calls):  # the sources side by side, the scratch sweep in the gaps (--jobs 2)
            if i < len(todo):
                sources[todo[i][0]] = rec
                log.info("pre-training %s: %s", todo[i][0], {k: rec.get(k) for k in ("iters", "top1_err")})
            else:
                _log_record(rec)
                done[(rec["task"], rec["arm"], rec["N"], rec["seed"], rec["lr"])] = rec
        result["timings"]["pretrain_phase_s"] = round(time.perf_counter() - t, 1)
        result["sources"] = {k: sources[k] for k in args.sources}
        write()
        result["probe"] = probe(args, sources)
        write()
        if args.probe_only:
            return result
        result["curve"] = {}
        t = time.perf_counter()
        run_curve(args, args.tasks, sources, out=result["curve"], on_record=write, runner=runner, done=done)
        result["timings"]["curve_s"] = round(time.perf_counter() - t, 1)
        for task, cur in result["curve"].items():
            runs = cur["sweep"] + [r for r in cur["records"] if r not in cur["sweep"]]
            result["timings"][f"curve_{task}_run_s"] = round(sum(r["wall_s"] for r in runs), 1)
        write()
    plot_curve(result, out / "transfer_curve.png")
    write()
    return result
