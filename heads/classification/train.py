"""A classification training run, end to end: data, model, SGD, evaluation, checkpoints, logs.

The tool parses flags/YAML into a :class:`ClsTrainConfig` and calls :func:`run`, which is
:func:`load_data` -> :func:`build_model` -> :func:`make_loaders` -> :func:`fit`. Everything a run
writes goes to ``cfg.output``: ``config.yaml``, ``checkpoint_last.pt`` (+ ``checkpoint_prev.pt``),
``checkpoint_best.pt`` (lowest val top-1 error), ``log.jsonl``, ``tb/`` and ``metrics.json``.

Checkpoints are plain dicts (``torch.load(weights_only=True)``)::

    {"model": state_dict (torchvision names), "model_name": "resnet20",
     "model_kwargs": {"num_classes", "in_chans", "drop_rate"}, "pretrained_cfg": {mean, std, input_size,
     crop_pct, interpolation, num_classes, tag, source}, "classes": [...], "task": "classification",
     "iter", "epoch", "config", "metrics", "library_version", "optimizer", "scaler", "rng", ...}

so ``create_model(name, **model_kwargs, pretrained=path)`` and ``create_backbone(name, pretrained=path)``
load them directly.
"""
from __future__ import annotations

from contextlib import closing
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from res_backbone.data.classification import ClsDatasets, build_cls_datasets
from res_backbone.data.preflight import GuardedDataset
from res_backbone.data.samplers import EpochBatchSampler
from res_backbone.engine import checkpoint as ckpt_mod
from .loop import evaluate, train_one_epoch
from res_backbone.engine.logger import RunLogger
from res_backbone.engine.budget import TimeBudgetPlan, log_plan
from res_backbone.engine.optim import lr_factor, set_lr
from res_backbone.engine.run_config import RunConfig
from res_backbone.engine.runner import place_and_optimise
from res_backbone.engine.runner import (  # noqa: F401  (EXIT_PREEMPTED and Preempted re-exported for the tool)
    EXIT_PREEMPTED, Preempted, preemptible, resolve_resume, restore_training_state, run_epochs,
    save_run_checkpoint, seed_everything,
)

log = logging.getLogger(__name__)


@dataclass
class ClsTrainConfig(RunConfig):
    """Every option of a classification run (the tool's flags, one to one; ``config.yaml`` holds them)."""

    output: str = "runs/cls"
    backbone: str = "resnet20"
    pretrained: Optional[str] = None
    data_dir: Optional[str] = None
    train_dir: Optional[str] = None
    val_dir: Optional[str] = None
    in_chans: Optional[int] = None
    num_classes: Optional[int] = None
    limit_train: Optional[int] = None
    limit_val: Optional[int] = None
    input_size: int = 224
    resize: Optional[int] = None
    crop: Optional[int] = None
    augment: str = "auto"
    invert: float = 0.0
    interpolation: str = "bilinear"
    epochs: int = 30
    max_iters: Optional[int] = None
    time_budget: Optional[float] = None  # minutes of training; sizes the schedule from the measured speed
    batch_size: int = 128
    lr: Optional[float] = None  # None: 0.1 x batch_size / 256 for sgd, 1e-3 for adamw
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    milestones: Sequence[float] = (0.5, 0.75)
    warmup_iters: int = 100
    label_smoothing: float = 0.0
    drop_rate: float = 0.0
    grad_clip: Optional[float] = None
    workers: Optional[int] = None  # None: 0 for in-memory sets, min(8, CPUs) for image folders
    threads: Optional[int] = None  # None: torch's default (one per core)

    def resolved(self, data: ClsDatasets) -> "ClsTrainConfig":
        """A copy with the automatic values filled in (lr, workers, in_chans, num_classes, device)."""
        if self.num_classes is not None and self.num_classes != len(data.classes):
            raise ValueError(
                f"--num-classes {self.num_classes} does not match the data, which has {len(data.classes)} classes "
                f"({_short(data.classes)}); leave --num-classes out to take it from the data")
        out = ClsTrainConfig(**asdict(self))
        out.num_classes, out.in_chans = len(data.classes), data.in_chans
        if out.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {out.optimizer!r}")
        if out.lr is None:  # sgd: the paper's 0.1 for 256 images, scaled linearly (Goyal et al.)
            out.lr = 0.1 * out.batch_size / 256 if out.optimizer == "sgd" else 1e-3
        if out.workers is None:
            out.workers = 0 if data.source == "fashion_mnist" else min(8, os.cpu_count() or 1)
        if out.device == "auto":
            out.device = "cuda" if torch.cuda.is_available() else "cpu"
        out.milestones = list(out.milestones)
        return out


@dataclass
class ClsLoaders:
    train: DataLoader
    val: Optional[DataLoader]
    sampler: EpochBatchSampler


def _short(names: Sequence[str], n: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")


def load_data(cfg: ClsTrainConfig) -> ClsDatasets:
    """The datasets ``cfg`` names (Fashion-MNIST unless ``train_dir``/``val_dir`` are given)."""
    return build_cls_datasets(
        data_dir=cfg.data_dir, train_dir=cfg.train_dir, val_dir=cfg.val_dir, in_chans=cfg.in_chans,
        limit_train=cfg.limit_train, limit_val=cfg.limit_val, input_size=cfg.input_size, resize=cfg.resize,
        crop=cfg.crop, augment=cfg.augment, interpolation=cfg.interpolation, invert=cfg.invert,
    )


def pretrained_cfg_of(data: ClsDatasets, interpolation: str = "bilinear") -> dict:
    """The ``pretrained_cfg`` a checkpoint of this data records (what evaluation must feed the model)."""
    return {"mean": list(data.mean), "std": list(data.std), "input_size": list(data.input_size),
            "crop_pct": float(data.crop_pct), "interpolation": interpolation, "num_classes": len(data.classes),
            "tag": None, "source": "res_backbone"}


def build_model(cfg: ClsTrainConfig, data: ClsDatasets, load_pretrained: bool = True) -> nn.Module:
    """``create_model(cfg.backbone)`` for the data's classes and channels, with ``cfg.pretrained``
    weights when ``load_pretrained`` (a classifier of another size is dropped and re-initialised)."""
    from res_backbone import create_model

    pretrained = False
    if load_pretrained and cfg.pretrained:
        pretrained = True if cfg.pretrained == "auto" else cfg.pretrained
    model = create_model(cfg.backbone, num_classes=len(data.classes), in_chans=data.in_chans,
                         drop_rate=cfg.drop_rate, pretrained=pretrained)
    if pretrained:
        _report_classifier(model, len(data.classes))
    return model


def _report_classifier(model: nn.Module, num_classes: int) -> None:
    """Say whether the pretrained file's classifier was kept, or dropped because its size differs."""
    from res_backbone.weights.files import read_checkpoint

    path = (getattr(model, "pretrained_cfg", None) or {}).get("file")
    if not path:
        return
    sd, _ = read_checkpoint(path)
    fc = [k for k in sd if k == "fc.weight" or k.endswith(".fc.weight")]
    if not fc:
        log.info("pretrained %s has no classifier: fc initialised fresh for %d classes", path, num_classes)
        return
    k = int(sd[min(fc, key=len)].shape[0])
    if k != num_classes:
        log.warning("pretrained %s has a %d-class classifier but this run has num_classes=%d: fc dropped and "
                    "re-initialised, every other layer loaded", path, k, num_classes)
    else:
        log.info("pretrained %s loaded, classifier included (%d classes)", path, k)


def make_loaders(cfg: ClsTrainConfig, data: ClsDatasets) -> ClsLoaders:
    """Training batches reshuffled per epoch by ``(seed, epoch)`` (resumable mid-epoch), val in order."""
    if len(data.train) < cfg.batch_size:
        raise ValueError(f"{len(data.train)} training images are fewer than --batch-size {cfg.batch_size}")
    sampler = EpochBatchSampler(len(data.train), cfg.batch_size, seed=cfg.seed)
    common = dict(num_workers=cfg.workers, pin_memory=cfg.device.startswith("cuda"),
                  persistent_workers=cfg.workers > 0)
    # Private generators: creating a loader iterator must not consume the global torch RNG, which
    # augmentation and dropout draw from and the checkpoint restores.
    guarded = GuardedDataset(data.train, cfg.on_bad_image, cfg.output)  # mid-run faults: the policy
    train = DataLoader(guarded, batch_sampler=sampler, generator=torch.Generator().manual_seed(cfg.seed), **common)
    val = None
    if data.val is not None:
        val = DataLoader(data.val, batch_size=cfg.batch_size * 2, shuffle=False,
                         generator=torch.Generator().manual_seed(cfg.seed), **common)
    return ClsLoaders(train, val, sampler)


def checkpoint_payload(model: nn.Module, optimizer, scaler, *, it: int, iters_per_epoch: int, cfg: ClsTrainConfig,
                       data: ClsDatasets, state: dict) -> dict:
    """The checkpoint dict (see the module docstring); ``state`` carries best/metrics/timings."""
    return {
        "model": model.state_dict(),
        "model_name": cfg.backbone,
        "model_kwargs": {"num_classes": len(data.classes), "in_chans": data.in_chans, "drop_rate": cfg.drop_rate},
        "pretrained_cfg": pretrained_cfg_of(data, cfg.interpolation),
        "classes": list(data.classes),
        "task": "classification",
        "best_top1_err": state["best_top1_err"],
        **ckpt_mod.training_fields(optimizer, scaler, it=it, iters_per_epoch=iters_per_epoch, config=_plain(cfg),
                                   state=state),
    }


def _plain(cfg: ClsTrainConfig) -> dict:
    out = asdict(cfg)
    out["milestones"] = list(out["milestones"])
    return out


def check_resume_compatible(state: dict, path, cfg: ClsTrainConfig, data: ClsDatasets) -> None:
    """Refuse to resume a checkpoint of another model, class set or channel count (naming the cause)."""
    kw = state.get("model_kwargs") or {}
    if state.get("task", "classification") != "classification" or "model_name" not in state:
        raise ValueError(f"--resume {path}: not a train_cls.py checkpoint (task {state.get('task')!r})")
    if state["model_name"] != cfg.backbone:
        raise ValueError(f"--resume {path}: checkpoint of {state['model_name']}, but --backbone is {cfg.backbone}")
    saved_k, saved_classes = kw.get("num_classes"), list(state.get("classes") or [])
    if saved_k != len(data.classes) or (saved_classes and saved_classes != list(data.classes)):
        raise ValueError(
            f"--resume {path}: the checkpoint was trained with num_classes={saved_k} ({_short(saved_classes)}), "
            f"but this run's data has num_classes={len(data.classes)} ({_short(data.classes)}). --resume continues "
            f"the same run, so the dataset and --num-classes must not change; to start from these weights with a "
            f"new classifier use --pretrained {path} (fc is then re-initialised) and a fresh --output")
    if kw.get("in_chans", data.in_chans) != data.in_chans:
        raise ValueError(f"--resume {path}: the checkpoint has in_chans={kw['in_chans']}, this run "
                         f"--in-chans {data.in_chans}")


def fit(model: nn.Module, data: ClsDatasets, loaders: ClsLoaders, cfg: ClsTrainConfig) -> dict:
    """Train ``model`` per ``cfg`` (resuming if asked), evaluate, write every output; return the final metrics.

    Raises:
        Preempted: SIGTERM/SIGINT arrived; ``checkpoint_last.pt`` was written first.
        NonFiniteLossError: too many consecutive non-finite losses.
        ValueError: a ``--resume`` checkpoint of another model or class set.
    """
    from tqdm import tqdm

    out = Path(cfg.output)
    device = torch.device(cfg.device)
    optimizer, scaler = place_and_optimise(model, cfg, device)
    iters_per_epoch = len(loaders.train)
    # the schedule's length: --max-iters / --epochs, or sized to --time-budget from the measured speed
    plan = TimeBudgetPlan(cfg.max_iters or cfg.epochs * iters_per_epoch, cfg.time_budget)
    state = {"best_top1_err": None, "best_iter": None, "train_time_s": 0.0, "metrics": None, "train_stats": {}}
    it, pending_eval = 0, False

    resume = resolve_resume(cfg.resume, out)
    if resume is not None:
        saved = ckpt_mod.load_checkpoint(resume)
        check_resume_compatible(saved, resume, cfg, data)
        restore_training_state(saved, resume, model, optimizer, scaler)
        it, pending_eval = int(saved["iter"]), bool(saved.get("pending_eval"))
        state.update({k: saved.get(k) for k in ("best_top1_err", "best_iter", "metrics")})
        state["train_time_s"] = float(saved.get("train_time_s") or 0.0)
        plan.restore(saved.get("plan_max_iters"))  # sized before the interruption: keep that plan
        log.info("resumed from %s at iteration %d (epoch %d)", resume, it, it // iters_per_epoch)
    plan.begin(it, state["train_time_s"])

    logger = RunLogger(out)
    logger.log({"event": "start", "max_iters": plan.max_iters, "iters_per_epoch": iters_per_epoch,
                "resumed_from": str(resume) if resume else None, "params": sum(p.numel() for p in model.parameters()),
                "train_images": len(data.train), "val_images": len(data.val) if data.val is not None else 0}, step=it)
    clock = {"since": time.perf_counter()}  # training time only: evaluation and start-up are left out

    def tick() -> None:
        now = time.perf_counter()
        state["train_time_s"] += now - clock["since"]
        clock["since"] = now

    def save(done: int, name: str = "checkpoint_last.pt", pending_eval: bool = False) -> None:
        state["plan_max_iters"] = plan.saved_max_iters
        payload = checkpoint_payload(model, optimizer, scaler, it=done, iters_per_epoch=iters_per_epoch, cfg=cfg,
                                     data=data, state=state)
        save_run_checkpoint(dict(payload, pending_eval=pending_eval), out, name)

    bar = tqdm(total=plan.max_iters, initial=it, desc="train", unit="it", disable=not cfg.progress, dynamic_ncols=True)

    def train_epoch(start: int, on_end) -> int:
        def on_iteration_end(done: int) -> None:
            tick()
            sized = plan.after_iteration(done, state["train_time_s"])
            if sized:
                log_plan(sized, cfg.time_budget, done, bar, logger)
            on_end(done)

        done, state["train_stats"] = train_one_epoch(
            model, loaders.train, optimizer, device=device, start_iter=start, max_iters=lambda: plan.stop,
            lr_at=lambda i: set_lr(optimizer, cfg.lr, lr_factor(
                i, max_iters=plan.max_iters, warmup_iters=cfg.warmup_iters, schedule=cfg.schedule,
                milestones=cfg.milestones)),
            amp=cfg.amp, scaler=scaler, grad_clip=cfg.grad_clip, channels_last=cfg.channels_last,
            label_smoothing=cfg.label_smoothing, logger=logger, log_every=cfg.log_every,
            on_iteration_end=on_iteration_end, progress=bar,
        )
        return done

    def after_epoch(done: int, last: bool) -> None:
        tick()
        stats = state["train_stats"]
        if stats.get("n"):
            logger.log({"epoch_loss": stats["loss"], "epoch_top1_err": stats["top1_err"]}, step=done, prefix="train/")
        due = done % iters_per_epoch == 0 and (done // iters_per_epoch) % cfg.eval_every == 0
        if loaders.val is not None and (last or due):
            evaluate_and_record(done, plan.max_iters)
        elif last:
            write_metrics(None, done, plan.max_iters, 0.0)
        clock["since"] = time.perf_counter()

    def write_metrics(m: Optional[dict], done: int, total: int, eval_s: float) -> None:
        state["metrics"] = _metrics(m, state["train_stats"], done, iters_per_epoch, total, state, cfg, data, eval_s)
        ckpt_mod.atomic_write_text(json.dumps(state["metrics"], indent=2) + "\n", out / "metrics.json")

    def evaluate_and_record(done: int, total: int) -> None:
        ebar = tqdm(total=len(loaders.val), desc="eval", unit="batch", disable=not cfg.progress, leave=False)
        t0 = time.perf_counter()
        m = evaluate(model, preemptible(loaders.val, done), device, amp=cfg.amp, channels_last=cfg.channels_last,
                     num_classes=len(data.classes), progress=ebar)
        ebar.close()
        logger.log({k: m[k] for k in ("top1_err", "top5_err", "loss") if m[k] is not None}
                   | {"epoch": done / iters_per_epoch}, step=done, prefix="val/")
        improved = state["best_top1_err"] is None or m["top1_err"] < state["best_top1_err"]
        if improved:
            state["best_top1_err"], state["best_iter"] = m["top1_err"], done
        write_metrics(m, done, total, time.perf_counter() - t0)
        if improved:
            save(done, "checkpoint_best.pt")
        log.info("iteration %d (epoch %.2f): val top-1 err %.2f%%%s, best %.2f%%", done, done / iters_per_epoch,
                 m["top1_err"], f", top-5 err {m['top5_err']:.2f}%" if m["top5_err"] is not None else "",
                 state["best_top1_err"])

    with closing(bar), closing(logger):
        run_epochs(start_iter=it, max_iters=lambda: plan.max_iters, iters_per_epoch=iters_per_epoch, sampler=loaders.sampler,
                   train_epoch=train_epoch, save=save, after_epoch=after_epoch,
                   checkpoint_every=cfg.checkpoint_every, logger=logger, output=out, pending_eval=pending_eval)
    return state["metrics"] or {}


def _metrics(m: Optional[dict], train_stats: dict, it: int, iters_per_epoch: int, max_iters: int, state: dict,
             cfg: ClsTrainConfig, data: ClsDatasets, eval_s: float) -> dict:
    """metrics.json: val errors (percent), best so far, train stats, timings, per-class accuracy."""
    train_time = state["train_time_s"]
    out: Dict[str, object] = {}
    if m is not None:
        out.update(top1_err=m["top1_err"], top5_err=m["top5_err"], loss=m["loss"], n=m["n"])
    out.update(
        best_top1_err=state["best_top1_err"], best_iter=state["best_iter"],
        iter=it, max_iters=max_iters, epoch=it / iters_per_epoch,
        train_loss=train_stats.get("loss"), train_top1_err=train_stats.get("top1_err"),
        train_time_s=round(train_time, 2), eval_time_s=round(eval_s, 2),
        img_per_s=round(it * cfg.batch_size / train_time, 1) if train_time > 0 else None,
        model=cfg.backbone, classes=list(data.classes),
    )
    if m is not None:
        out["per_class_acc"] = {c: a for c, a in zip(data.classes, m["per_class_acc"])}
    return out


__all__ = ["ClsLoaders", "ClsTrainConfig", "build_model", "check_resume_compatible", "checkpoint_payload", "fit",
           "load_data", "make_loaders", "pretrained_cfg_of"]
