"""A single-object localization run, end to end, for a model built by the caller.

The tool parses flags/YAML into a :class:`LocTrainConfig`, builds the model (``heads``), and calls
:func:`load_datasets`, :func:`prepare_data` and :func:`fit`. The model is duck-typed:
``model(images) -> {"logits", "boxes"}`` and ``model.predict(images, k)`` (``heads.localization``);
the loss is a function ``loss_fn(outputs, labels, boxes) -> {name: tensor}``.

Everything a run writes goes to ``cfg.output``: ``config.yaml`` (by the tool), ``checkpoint_last.pt``
(+ ``checkpoint_prev.pt``), ``checkpoint_best.pt`` (lowest val top-1 localization error), ``log.jsonl``,
``tb/``, ``metrics.json`` and ``predictions/*.png``. Checkpoints are plain dicts
(``torch.load(weights_only=True)``) with ``model``, ``localizer_kwargs`` (what rebuilds the model,
``heads.load_localizer``), ``classes``, ``cat_ids``, ``pretrained_cfg``, ``task: "localization"``,
``iter``, ``epoch``, ``config``, ``metrics`` and the optimiser/scaler/RNG state for ``--resume``.
"""
from __future__ import annotations

from contextlib import closing
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from res_backbone.data.localization import (
    CocoLocalization, build_loc_eval_transforms, build_loc_train_transforms, collate_localization,
)
from res_backbone.data.preflight import GuardedDataset
from res_backbone.data.samplers import ResumableBatchSampler
from res_backbone.transfer import BackboneFreeze, input_stats
from res_backbone.engine import checkpoint as ckpt_mod
from res_backbone.engine.budget import TimeBudgetPlan, log_plan
from res_backbone.data.samplers import EpochSeeded
from res_backbone.engine.det_loop import train_one_epoch
from .evaluate import LossAdapter, evaluate, make_eval_loader
from res_backbone.engine.logger import RunLogger
from res_backbone.engine.optim import lr_factor, set_lr
from res_backbone.engine.run_config import FineTuneConfig, SplitData, resolve_device
from res_backbone.engine.runner import place_and_optimise
from res_backbone.engine.runner import (  # noqa: F401  (EXIT_PREEMPTED and Preempted re-exported for the tool)
    EXIT_PREEMPTED, Preempted, preemptible, resolve_resume, restore_training_state, run_epochs,
    save_run_checkpoint, seed_everything,
)

log = logging.getLogger(__name__)
METRIC_KEYS = ("top1_loc_err", "top5_loc_err", "top1_cls_err", "top5_cls_err", "mean_iou", "gt_known_loc_err")


@dataclass
class LocTrainConfig(FineTuneConfig):
    """Every option of a localization run (the tool's flags, one to one; ``config.yaml`` holds them)."""

    output: str = "runs/loc"
    backbone: Optional[str] = "resnet18"
    cls_checkpoint: Optional[str] = None
    mode: str = "scr"
    train_json: Optional[str] = None
    train_images: Optional[str] = None
    val_json: Optional[str] = None
    val_images: Optional[str] = None
    all_boxes: bool = False
    data_dir: str = ".cache/fmnist_loc"
    fmnist_root: Optional[str] = None
    fmnist_train: int = 30000
    fmnist_val: int = 2000
    canvas: int = 64
    item_scale: Sequence[float] = (28.0, 56.0)
    image_size: Optional[int] = None  # None: the canvas for the built-in set, 224 for COCO json (resolve_data_paths)
    hflip: float = 0.5
    photometric: bool = True
    epochs: int = 3
    max_iters: Optional[int] = None
    time_budget: Optional[float] = None  # minutes of training; sizes max_iters from the measured speed
    calib_iters: int = 30
    batch_size: int = 64
    lr: float = 0.002
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.05
    schedule: str = "cosine"
    milestones: Sequence[float] = (0.67, 0.89)
    warmup_iters: int = 50
    grad_clip: Optional[float] = None
    frozen_stages: Optional[int] = None  # None: 0 (the tool resolves it; see res_backbone.transfer)
    bn_policy: Optional[str] = None  # None: from the weights and the batch size (transfer.default_bn_policy)
    cls_weight: float = 1.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    workers: int = 0
    cache_images: float = 0.0  # megabytes of decoded images kept per split
    tta_flip: bool = False
    localizer_kwargs: Dict = field(default_factory=dict)  # what rebuilds the model (heads.build_localizer)


@dataclass
class LocData(SplitData):
    class_names: List[str]
    cat_ids: List[int]


def resolve_data_paths(cfg: LocTrainConfig) -> LocTrainConfig:
    """Fill the four data paths with the built-in Fashion-MNIST set (rendered into ``data_dir``) when none are given."""
    from res_backbone.data.localization_fmnist import write_fmnist_localization

    given = [cfg.train_json, cfg.train_images, cfg.val_json, cfg.val_images]
    if all(given) or (cfg.train_json and cfg.train_images and not cfg.val_json and not cfg.val_images):
        cfg.image_size = cfg.image_size or 224
        return cfg
    if any(given):
        raise ValueError("give --train-json and --train-images (and optionally --val-json with --val-images), "
                         "or none of them for the built-in Fashion-MNIST localization set")
    lo, hi = (float(v) for v in cfg.item_scale)
    root = Path(cfg.data_dir) / f"c{cfg.canvas}_s{lo:g}-{hi:g}_n{cfg.fmnist_train}-{cfg.fmnist_val}_seed{cfg.seed}"
    paths = write_fmnist_localization(root, root=cfg.fmnist_root, num_train=cfg.fmnist_train,
                                      num_val=cfg.fmnist_val, canvas=cfg.canvas, scale=(lo, hi), seed=cfg.seed)
    cfg.train_json, cfg.train_images = paths["train_json"], paths["train_images"]
    cfg.val_json, cfg.val_images = paths["val_json"], paths["val_images"]
    cfg.image_size = cfg.image_size or cfg.canvas
    return cfg


def load_datasets(cfg: LocTrainConfig) -> Tuple[CocoLocalization, Optional[CocoLocalization]]:
    """The train and val sets of ``cfg`` (transforms come later, from the weights' mean/std)."""
    cfg = resolve_data_paths(cfg)
    train_set = CocoLocalization(cfg.train_json, cfg.train_images, all_boxes=cfg.all_boxes, cache_mb=cfg.cache_images)
    val_set = None
    if cfg.val_json:
        val_set = CocoLocalization(cfg.val_json, cfg.val_images, all_boxes=cfg.all_boxes, cache_mb=cfg.cache_images)
        if val_set.cat_ids != train_set.cat_ids:
            raise ValueError(f"{cfg.val_json} and {cfg.train_json} define different categories "
                             f"({val_set.cat_ids} vs {train_set.cat_ids}); labels would not line up")
    if len(train_set) == 0:
        raise ValueError(f"{cfg.train_json}: no image has a usable box ({train_set.skipped_empty} skipped)")
    return train_set, val_set


def rgb_stats(pretrained_cfg: Optional[dict]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Mean and std for RGB input from a weights' ``pretrained_cfg`` (grey-level statistics repeated;
    :func:`res_backbone.transfer.input_stats`)."""
    return input_stats(pretrained_cfg, 3)


def prepare_data(cfg: LocTrainConfig, train_set: CocoLocalization, val_set: Optional[CocoLocalization],
                 mean: Sequence[float], std: Sequence[float]) -> LocData:
    """Transforms (normalised with ``mean``/``std``), a resumable per-epoch shuffle, and the loaders."""
    size = int(cfg.image_size or 224)
    train_set.transforms = build_loc_train_transforms(size, mean, std, hflip=cfg.hflip, photometric=cfg.photometric)
    if val_set is not None:
        val_set.transforms = build_loc_eval_transforms(size, mean, std)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"{len(train_set)} training images are fewer than --batch-size {cfg.batch_size}")
    base = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed)
    batches = ResumableBatchSampler(BatchSampler(base, cfg.batch_size, drop_last=True), base)
    # A private generator: creating a loader iterator must not consume the global torch RNG (dropout's,
    # restored by the checkpoint); EpochSeeded seeds each item's augmentation from (seed, epoch, index).
    guarded = GuardedDataset(train_set, cfg.on_bad_image, cfg.output)  # mid-run faults: the policy
    train_loader = DataLoader(EpochSeeded(guarded, cfg.seed), batch_sampler=batches, num_workers=cfg.workers,
                              collate_fn=collate_localization, persistent_workers=cfg.workers > 0,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = make_eval_loader(val_set, cfg.batch_size * 2, cfg.workers, cfg.seed) if val_set is not None else None
    return LocData(train_set, val_set, train_loader, val_loader, batches, list(train_set.class_names),
                   list(train_set.cat_ids))


def _plain(cfg: LocTrainConfig) -> dict:
    out = asdict(cfg)
    out["milestones"], out["item_scale"] = list(out["milestones"]), list(out["item_scale"])
    return out


def checkpoint_payload(model: nn.Module, optimizer, scaler, it: int, iters_per_epoch: int, cfg: LocTrainConfig,
                       data: LocData, state: dict) -> dict:
    return {
        "model": model.state_dict(),
        "localizer_kwargs": dict(cfg.localizer_kwargs),
        "model_name": cfg.localizer_kwargs.get("backbone_name", cfg.backbone),
        "classes": list(data.class_names),
        "cat_ids": list(data.cat_ids),
        "pretrained_cfg": dict(getattr(model, "pretrained_cfg", {}) or {}),
        "image_size": int(cfg.image_size or 224),
        "task": "localization",
        "best_top1_loc_err": state["best"],
        **ckpt_mod.training_fields(optimizer, scaler, it=it, iters_per_epoch=iters_per_epoch, config=_plain(cfg),
                                   state=state),
    }


def fit(model: nn.Module, loss_fn: Callable[..., Dict[str, torch.Tensor]], data: LocData,
        cfg: LocTrainConfig) -> dict:
    """Train ``model`` per ``cfg`` (resuming if asked), evaluate each ``eval_every`` epochs and at the end,
    write every output; return the final metrics.

    Raises:
        Preempted: SIGTERM/SIGINT arrived; ``checkpoint_last.pt`` was written first.
        NonFiniteLossError: too many consecutive non-finite losses.
    """
    from tqdm import tqdm

    out = Path(cfg.output)
    device = torch.device(resolve_device(cfg.device))
    optimizer, scaler = place_and_optimise(model, cfg, device)
    iters_per_epoch = len(data.train_loader)
    # The schedule's length and where the current pass stops: the cap, or sized to the time budget from
    # the speed measured as training goes (evaluation time is not training time).
    plan = TimeBudgetPlan(cfg.max_iters or cfg.epochs * iters_per_epoch, cfg.time_budget, calib_iters=cfg.calib_iters)
    state = {"best": None, "best_iter": None, "train_time_s": 0.0, "metrics": None}
    it, pending_eval = 0, False
    resume = resolve_resume(cfg.resume, out)
    if resume is not None:
        saved = ckpt_mod.load_checkpoint(resume)
        if saved.get("task") != "localization" or saved.get("localizer_kwargs") != cfg.localizer_kwargs:
            raise ValueError(f"--resume {resume}: not a checkpoint of this localizer (task {saved.get('task')!r}, "
                             f"model {saved.get('localizer_kwargs')} vs {cfg.localizer_kwargs}); use a fresh --output")
        restore_training_state(saved, resume, model, optimizer, scaler)
        it, pending_eval = int(saved["iter"]), bool(saved.get("pending_eval"))
        state.update(best=saved.get("best_top1_loc_err"), best_iter=saved.get("best_iter"),
                     metrics=saved.get("metrics"), train_time_s=float(saved.get("train_time_s") or 0.0))
        plan.restore(saved.get("plan_max_iters"))  # sized before the interruption: keep that plan
        log.info("resumed from %s at iteration %d", resume, it)
    plan.begin(it, state["train_time_s"])
    # The pretrained backbone frozen for the first iterations (BN statistics included), then released.
    freezer = BackboneFreeze(model.backbone, cfg.freeze_backbone_iters)
    freezer.update(it)
    max_iters = plan.max_iters

    logger = RunLogger(out)
    logger.log({"event": "start", "max_iters": max_iters, "iters_per_epoch": iters_per_epoch,
                "resumed_from": str(resume) if resume else None, "train_images": len(data.train_set),
                "val_images": len(data.val_set) if data.val_set is not None else 0,
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "transfer": cfg.transfer or None}, step=it)
    runner = LossAdapter(model, loss_fn)
    clock = {"start": time.perf_counter(), "done": state["train_time_s"]}

    def elapsed() -> float:
        return clock["done"] + time.perf_counter() - clock["start"]

    def save(done: int, name: str = "checkpoint_last.pt", pending_eval: bool = False) -> None:
        state["train_time_s"] = elapsed()
        state["plan_max_iters"] = plan.saved_max_iters
        payload = checkpoint_payload(model, optimizer, scaler, done, iters_per_epoch, cfg, data, state)
        save_run_checkpoint(dict(payload, pending_eval=pending_eval), out, name)

    def train_epoch(start: int, on_end: Callable[[int], None]) -> int:
        def on_iteration_end(done: int) -> None:
            sized = plan.after_iteration(done, elapsed())
            if sized:
                log_plan(sized, cfg.time_budget, done, bar, logger)
            if freezer.update(done):
                logger.log({"event": "backbone_unfrozen"}, step=done)
            on_end(done)

        return train_one_epoch(
            runner, data.train_loader, optimizer, device=device, start_iter=start, max_iters=lambda: plan.stop,
            lr_at=lambda i: set_lr(optimizer, cfg.lr, lr_factor(
                i, max_iters=plan.max_iters, warmup_iters=cfg.warmup_iters, schedule=cfg.schedule,
                milestones=cfg.milestones)),
            amp=cfg.amp, scaler=scaler, grad_clip=cfg.grad_clip, channels_last=cfg.channels_last, logger=logger,
            log_every=cfg.log_every, on_iteration_end=on_iteration_end, progress=bar)

    def after_epoch(done: int, last: bool) -> None:
        epoch_end = done % iters_per_epoch == 0
        if data.val_loader is None or not (last or (epoch_end and (done // iters_per_epoch) % cfg.eval_every == 0)):
            return
        t_eval = time.perf_counter()
        train_time = elapsed()
        m = evaluate(model, preemptible(data.val_loader, done), data.val_set, device=device, amp=cfg.amp,
                     channels_last=cfg.channels_last, tta_flip=cfg.tta_flip,
                     pictures_dir=out / "predictions" if last else None,
                     num_pictures=cfg.num_pictures, progress=cfg.progress)
        improved = state["best"] is None or m["top1_loc_err"] < state["best"]
        if improved:
            state["best"], state["best_iter"] = m["top1_loc_err"], done
        m.update(best_top1_loc_err=state["best"], best_iter=state["best_iter"], iter=done, max_iters=plan.max_iters,
                 epoch=round(done / iters_per_epoch, 3), train_time_s=round(train_time, 2),
                 img_per_s=round(done * cfg.batch_size / max(train_time, 1e-9), 1), model=cfg.backbone,
                 mode=cfg.mode, classes=list(data.class_names))
        state["metrics"] = m
        ckpt_mod.atomic_write_text(json.dumps(m, indent=2) + "\n", out / "metrics.json")
        logger.log({k: m[k] for k in METRIC_KEYS}, step=done, prefix="val/")
        log.info("iteration %d: top-1 loc err %.2f%% (cls %.2f%%), top-5 loc err %.2f%%, mean IoU %.3f, best %.2f%%",
                 done, m["top1_loc_err"], m["top1_cls_err"], m["top5_loc_err"], m["mean_iou"], state["best"])
        if improved:
            save(done, "checkpoint_best.pt")
        clock["start"] += time.perf_counter() - t_eval  # evaluation time is not training time

    bar = tqdm(total=max_iters, initial=it, desc="train", unit="it", disable=not cfg.progress, dynamic_ncols=True)
    with closing(bar), closing(logger):
        run_epochs(start_iter=it, max_iters=lambda: plan.max_iters, iters_per_epoch=iters_per_epoch,
                   sampler=data.train_sampler,
                   train_epoch=train_epoch, save=save, after_epoch=after_epoch,
                   checkpoint_every=cfg.checkpoint_every, logger=logger, output=out, pending_eval=pending_eval)
    return state["metrics"] or {}


__all__ = ["LocData", "LocTrainConfig", "fit", "load_datasets", "prepare_data", "resolve_data_paths", "rgb_stats"]
