"""A detection training run, end to end, for a detector built by the caller.

The tool parses flags/YAML into a :class:`DetTrainConfig`, builds the model (``heads``), and calls
:func:`prepare_data` then :func:`fit`. Everything a run writes goes to ``cfg.output``.
"""
from __future__ import annotations

from contextlib import closing
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from res_backbone.data import (
    CocoDetection, GroupedBatchSampler, build_eval_transforms, build_train_transforms, collate_detection,
    make_synthetic_coco, synthetic_paths,
)
from res_backbone.data.preflight import GuardedDataset
from res_backbone.data.samplers import EpochSeeded, RepeatFactorSampler, ResumableBatchSampler, repeat_factors
from res_backbone.evaluation.coco import coco_evaluate, gather_results, write_detections_json
from res_backbone.transfer import BackboneFreeze
from res_backbone.visualize import draw_detections
from res_backbone.engine import checkpoint as ckpt_mod
from res_backbone.engine.det_loop import NonFiniteLossError, predict, train_one_epoch  # noqa: F401  (re-exported)
from res_backbone.engine.distributed import DistInfo, barrier
from res_backbone.engine.logger import RunLogger
from res_backbone.engine.memory import peak_rss_report
from res_backbone.engine.optim import lr_factor, set_lr
from res_backbone.engine.run_config import FineTuneConfig, SplitData, resolve_device
from res_backbone.engine.runner import place_and_optimise
from res_backbone.engine.runner import (  # noqa: F401  (re-exported: tools/train_det.py uses det_run.<name>)
    EXIT_PREEMPTED, Preempted, SignalFlag, preemptible, resolve_resume, restore_training_state, run_epochs,
    save_run_checkpoint, seed_everything, stop_requested, unwrap,
)

log = logging.getLogger(__name__)
LIBRARY_VERSION = "0.1.0"


@dataclass
class DetTrainConfig(FineTuneConfig):
    """Every option of a detection run (the tool's flags, one to one)."""

    output: str = "runs/det"
    backbone: str = "resnet50"
    arch: str = "fpn"
    num_classes: Optional[int] = None
    train_json: Optional[str] = None
    train_images: Optional[str] = None
    val_json: Optional[str] = None
    val_images: Optional[str] = None
    data_dir: str = ".cache/synthetic"
    synthetic_train: int = 600
    synthetic_val: int = 100
    synthetic_size: int = 160
    filter_empty: bool = False
    image_size: int = 512  # or "auto" until resolve_auto
    sampler: str = "random"  # or "repeat_factor" (LVIS; train_sampler)
    repeat_thresh: float = 0.001
    epochs: int = 12
    max_iters: Optional[int] = None
    batch_size: int = 4
    lr: float = 0.02
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    milestones: Sequence[float] = (0.67, 0.89)
    warmup_iters: int = 100
    grad_clip: Optional[float] = None
    compile: bool = False
    workers: int = 2
    score_thresh_pictures: float = 0.3
    coco_backend: str = "pycocotools"  # or "faster" (faster-coco-eval): res_backbone.evaluation.coco
    model_kwargs: Dict = field(default_factory=dict)
    detector_kwargs: Dict = field(default_factory=dict)  # what rebuilds the model (heads.build_detector)


@dataclass
class DetData(SplitData):
    val_json: Optional[str]
    cat_ids: List[int]
    class_names: List[str]


def resolve_data_paths(cfg: DetTrainConfig, is_main: bool = True) -> DetTrainConfig:
    """Fill the four data paths with the embedded synthetic set when none are given."""
    given = [cfg.train_json, cfg.train_images, cfg.val_json, cfg.val_images]
    if all(given) or (cfg.train_json and cfg.train_images and not cfg.val_json and not cfg.val_images):
        return cfg
    if any(given):
        raise ValueError(
            "give --train-json and --train-images (and optionally --val-json with --val-images), "
            "or none of them for the embedded synthetic dataset"
        )
    root = Path(cfg.data_dir) / f"shapes_s{cfg.seed}"
    if is_main:  # generated once, reused while its arguments match (synthetic_meta.json)
        make_synthetic_coco(root, num_train=cfg.synthetic_train, num_val=cfg.synthetic_val,
                            image_size=cfg.synthetic_size, seed=cfg.seed)
    barrier()
    paths = synthetic_paths(root)
    cfg.train_json, cfg.train_images = paths["train_json"], paths["train_images"]
    cfg.val_json, cfg.val_images = paths["val_json"], paths["val_images"]
    return cfg


def load_datasets(cfg: DetTrainConfig, dist: DistInfo) -> Tuple[CocoDetection, Optional[CocoDetection]]:
    """The train and val datasets of ``cfg`` (synthetic when no paths are given), without
    transforms yet: normalisation comes from the model's weights, built after the class count is known."""
    cfg = resolve_data_paths(cfg, dist.is_main)
    train_set = CocoDetection(cfg.train_json, cfg.train_images, None, filter_empty=cfg.filter_empty)
    val_set = None
    if cfg.val_json:
        val_set = CocoDetection(cfg.val_json, cfg.val_images, None)
        if list(val_set.cat_ids) != list(train_set.cat_ids):
            raise ValueError(
                f"{cfg.val_json} and {cfg.train_json} define different categories "
                f"({list(val_set.cat_ids)} vs {list(train_set.cat_ids)}); labels would not line up"
            )
    return train_set, val_set


def prepare_data(cfg: DetTrainConfig, dist: DistInfo, train_set: CocoDetection, val_set: Optional[CocoDetection],
                 mean, std) -> DetData:
    """Transforms (normalised with the weights' ``mean``/``std``), samplers and loaders."""
    train_set.transforms = build_train_transforms(cfg.image_size, mean, std)
    if val_set is not None:
        val_set.transforms = build_eval_transforms(cfg.image_size, mean, std)
    base = train_sampler(cfg, dist, train_set)
    batches = ResumableBatchSampler(GroupedBatchSampler(base, train_set.aspect_ratios(), cfg.batch_size), base)
    common = dict(num_workers=cfg.workers, collate_fn=collate_detection, persistent_workers=cfg.workers > 0,
                  pin_memory=resolve_device(cfg.device).startswith("cuda"))
    # A private generator: creating a loader iterator must not consume the global torch RNG, which
    # the model's samplers use and the checkpoint restores.
    guarded = GuardedDataset(train_set, cfg.on_bad_image, cfg.output)  # mid-run faults: the policy
    train_loader = DataLoader(EpochSeeded(guarded, cfg.seed), batch_sampler=batches,
                              generator=torch.Generator().manual_seed(cfg.seed), **common)
    val_loader = None
    if val_set is not None:
        val_sampler = (DistributedSampler(val_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=False)
                       if dist.enabled else SequentialSampler(val_set))
        val_loader = DataLoader(val_set, sampler=val_sampler, batch_size=cfg.batch_size,
                                generator=torch.Generator().manual_seed(cfg.seed), **common)
    return DetData(train_set, val_set, train_loader, val_loader, batches, cfg.val_json,
                   list(train_set.cat_ids), list(train_set.class_names))


def train_sampler(cfg: DetTrainConfig, dist: DistInfo, train_set: CocoDetection):
    """The training images' sampler, the same type for 1 and N processes, reproducible from (seed, epoch): a
    permutation (``random``) or repeat-factor sampling (``repeat_factor``: images of rare classes repeated,
    LVIS), whose epoch size is logged."""
    if cfg.sampler == "random":
        return DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed)
    if cfg.sampler != "repeat_factor":
        raise ValueError(f"sampler must be 'random' or 'repeat_factor', got {cfg.sampler!r}")
    labels = [train_set.get_annotation(i)[1] for i in range(len(train_set))]
    factors = repeat_factors(labels, cfg.repeat_thresh)
    sampler = RepeatFactorSampler(factors, num_replicas=dist.world_size, rank=dist.rank, seed=cfg.seed)
    images_with = np.bincount(np.concatenate([np.unique(lab) for lab in labels] + [np.zeros(0, np.int64)]),
                              minlength=train_set.num_classes + 1)[1:]
    rare = int(np.argmin(np.where(images_with > 0, images_with, np.iinfo(np.int64).max)))
    log.info("repeat-factor sampling (t=%g): %d images per epoch instead of %d (x%.2f), %d images repeated; the "
             "rarest class, '%s' (in %d images), repeats x%.2f", cfg.repeat_thresh, sampler.epoch_size, len(train_set),
             sampler.epoch_size / max(len(train_set), 1), int((factors > 1).sum()), train_set.class_names[rare],
             images_with[rare], max(1.0, math.sqrt(cfg.repeat_thresh * len(train_set) / max(images_with[rare], 1))))
    return sampler


def resolve_auto(cfg: DetTrainConfig, train_set: CocoDetection, *, is_main: bool = True) -> Dict:
    """Replace ``auto`` in ``cfg.image_size`` and ``cfg.model_kwargs``' ``anchor_sizes`` / ``aspect_ratios`` by the
    values chosen from the training boxes (:func:`~.anchor_fit.auto_choices`; logged with the anchor coverage
    before and after, and written to ``auto_choices.json`` in the output). Every rank finds the same values.

    Returns:
        The chosen values as flag values (``{"image_size": 384, "anchor_sizes": [11, 21, ...], ...}``), for
        ``config.yaml``: a rerun from it rebuilds the same model.
    """
    kw = cfg.model_kwargs
    auto = [k for k, v in (("image_size", cfg.image_size), ("anchor_sizes", kw.get("anchor_sizes")),
                           ("aspect_ratios", kw.get("aspect_ratios"))) if v == "auto"]
    if not auto:
        return {}
    from res_backbone.data.analysis import collect_boxes
    from res_backbone.io import atomic_write_json

    from .anchor_fit import auto_choices

    got = auto_choices(collect_boxes(train_set), backbone=cfg.backbone, arch=cfg.arch, image_size=cfg.image_size,
                       anchor_sizes=kw.get("anchor_sizes"), aspect_ratios=kw.get("aspect_ratios"), seed=cfg.seed)
    for line in got["notes"]:
        log.info(line)
    cfg.image_size = int(got["image_size"])
    for key in ("anchor_sizes", "aspect_ratios"):
        if got[key] is not None:
            kw[key] = got[key]
    flags = {k: cfg.image_size if k == "image_size" else [v for level in kw[k] for v in level] for k in auto}
    if is_main:
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        atomic_write_json({"chosen": flags, **{k: v for k, v in got.items() if k.startswith(("coverage", "notes"))}},
                          Path(cfg.output) / "auto_choices.json", indent=2)
    return flags


def checkpoint_payload(model, optimizer, scaler, it, epoch, cfg: DetTrainConfig, data: DetData, best_ap, metrics):
    m = unwrap(model)
    backbone = getattr(m, "backbone", None)
    return {
        "model": m.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": it,
        "epoch": epoch,
        "arch": cfg.backbone,
        "task": "detection",
        "config": _plain_config(cfg),
        "detector_kwargs": dict(cfg.detector_kwargs),
        "cat_ids": data.cat_ids,
        "class_names": data.class_names,
        "pretrained_cfg": dict(getattr(backbone, "pretrained_cfg", {}) or {}),
        "library_version": LIBRARY_VERSION,
        "rng": ckpt_mod.rng_state(),
        "best_ap": best_ap,
        "metrics": metrics or {},
    }


def _plain_config(cfg: DetTrainConfig) -> dict:
    out = asdict(cfg)
    out["milestones"] = list(out["milestones"])
    return out


def evaluate(model, data: DetData, cfg: DetTrainConfig, device, out_dir: Optional[Path], *, is_main: bool,
             write: bool = True, progress: bool = True, iteration: int = 0) -> Optional[dict]:
    """Predict on the val split (all ranks), gather, COCO-evaluate on the main rank and write
    ``metrics.json`` (with the run's peak resident memory so far, ``peak_rss_mib``), ``detections.json`` and
    ``predictions/*.png`` into ``out_dir``. A stop signal abandons it (:class:`Preempted`)."""
    if data.val_loader is None:
        return None
    from tqdm import tqdm

    from .predictor import DetectionPredictor

    bar = tqdm(total=len(data.val_loader), desc="eval", unit="batch", disable=not (progress and is_main), leave=False)
    base = unwrap(model)
    base = getattr(base, "_orig_mod", base)  # torch.compile'd: evaluate the plain module's fast copy
    pcfg = getattr(getattr(base, "backbone", None), "pretrained_cfg", None) or {}
    meta = {"task": "detection", "cat_ids": data.cat_ids, "class_names": data.class_names,
            "image_size": cfg.image_size, "mean": pcfg.get("mean"), "std": pcfg.get("std")}
    # The predictor of tools/eval_det.py and tools/predict.py, on the loader's batches (same preprocessing):
    # BN folded, channels-last, hwc box head (FasterRCNN.inference_copy): same detections within float
    # rounding, 1.2-1.6x faster on CPU (docs/bench_detector_cpu.md)
    predictor = DetectionPredictor(base, meta, device=str(device), amp=cfg.amp, batch_size=cfg.batch_size,
                                   workers=0, fast=hasattr(base, "inference_copy"), channels_last=cfg.channels_last)
    results = []
    for images, sizes, targets in preemptible(data.val_loader, iteration):
        dets = predictor.predict_batch(images, sizes, [t["scale"] for t in targets], [t["orig_size"] for t in targets])
        for det, tgt in zip(dets, targets):
            results.extend(det.to_coco(tgt["image_id"]))
        bar.update(1)
    del predictor
    bar.close()
    # COCO results are small plain dicts: gather them (deduplicating images a DistributedSampler padded onto
    # two ranks).
    results = gather_results(results)
    if not is_main:
        return None
    metrics = coco_evaluate(data.val_json, results, class_names=data.class_names, backend=cfg.coco_backend)
    metrics.update(peak_rss_report())
    if write and out_dir is not None:
        write_detections_json(results, out_dir / "detections.json")
        ckpt_mod.atomic_write_text(json.dumps({k: v for k, v in metrics.items() if k != "summary"}, indent=2) + "\n",
                                   out_dir / "metrics.json")
        write_pictures(data, results, out_dir / "predictions", cfg.num_pictures, cfg.score_thresh_pictures)
    return metrics


def write_pictures(data: DetData, results: List[dict], folder: Path, count: int, score_thresh: float, *,
                   image_ids: Optional[Sequence[int]] = None, names: Optional[Sequence[str]] = None) -> List[Path]:
    """Draw predictions (coloured by class) and ground truth on the first ``count`` val images (of
    ``image_ids`` when given), into ``folder/<image id or names[i]>.png``."""
    if count <= 0 or data.val_set is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    by_image: Dict[int, List[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    written = []
    label_of = {c: i + 1 for i, c in enumerate(data.cat_ids)}
    ids = list(data.val_set.image_ids if image_ids is None else image_ids)[:count]
    for i, image_id in enumerate(ids):
        dets = [r for r in by_image.get(image_id, []) if r["score"] >= score_thresh]
        gt = data.val_set.original_annotations(image_id)
        info = data.val_set.coco.imgs[image_id]
        path = folder / f"{image_id if names is None else names[i]}.png"
        draw_detections(
            data.val_set.image_path(image_id),
            pred_boxes=[_xyxy(r["bbox"]) for r in dets], pred_labels=[label_of[r["category_id"]] for r in dets],
            pred_scores=[r["score"] for r in dets],
            gt_boxes=[_xyxy(a["bbox"]) for a in gt], gt_labels=[label_of[a["category_id"]] for a in gt],
            class_names=data.class_names, out_path=path, score_thresh=score_thresh,
            upscale=max(1, round(480 / max(info["width"], info["height"]))),  # small images stay readable
        )
        written.append(path)
    return written


def _xyxy(b):
    x, y, w, h = b
    return [x, y, x + w, y + h]


def fit(model: nn.Module, data: DetData, cfg: DetTrainConfig, dist: DistInfo) -> dict:
    """Train ``model`` per ``cfg`` (resuming if asked), evaluate, write every output; return the final
    metrics (empty on non-main ranks). Raises :class:`Preempted` after checkpointing on SIGTERM/SIGINT."""
    from tqdm import tqdm

    out = Path(cfg.output)
    device_name = resolve_device(cfg.device)
    device = torch.device(f"cuda:{dist.local_rank}" if device_name == "cuda" else device_name)
    optimizer, scaler = place_and_optimise(model, cfg, device)
    iters_per_epoch = len(data.train_loader)
    if iters_per_epoch == 0:
        raise ValueError(f"{cfg.train_json}: no training images (after filtering) for batch size {cfg.batch_size}")
    max_iters = cfg.max_iters or cfg.epochs * iters_per_epoch
    it, best_ap, metrics, pending_eval = 0, -1.0, None, False

    resume = resolve_resume(cfg.resume, out)
    if resume is not None:
        state = ckpt_mod.load_checkpoint(resume)
        restore_training_state(state, resume, model, optimizer, scaler)
        it, best_ap = int(state["iteration"]), float(state.get("best_ap", -1.0))
        pending_eval = bool(state.get("pending_eval"))  # stopped after a pass, before its evaluation ended
        log.info("rank %d: resumed from %s at iteration %d", dist.rank, resume, it)

    backbone = getattr(model, "backbone", None)
    # The pretrained backbone (FPN excluded) frozen for the first iterations, BN statistics included.
    freezer = BackboneFreeze(backbone, cfg.freeze_backbone_iters) if backbone is not None else None
    if freezer is not None:
        freezer.update(it)

    def wrap():
        if not dist.enabled:
            return model
        ids = [dist.local_rank] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    runner = wrap()
    if cfg.compile:
        runner = torch.compile(runner)
    logger = RunLogger(out, enabled=dist.is_main)
    logger.log({"event": "start", "max_iters": max_iters, "iters_per_epoch": iters_per_epoch,
                "resumed_from": str(resume) if resume else None, "world_size": dist.world_size,
                "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
                "transfer": cfg.transfer or None}, step=it)

    def save(done: int, name: str = "checkpoint_last.pt", pending_eval: bool = False) -> None:
        if dist.is_main:
            payload = checkpoint_payload(model, optimizer, scaler, done, done // iters_per_epoch, cfg, data,
                                         best_ap, metrics)
            save_run_checkpoint(dict(payload, pending_eval=pending_eval), out, name)
        barrier()

    def train_epoch(start: int, on_end) -> int:
        def on_iteration_end(done: int) -> None:
            nonlocal runner
            if freezer is not None and freezer.update(done):  # released: DDP must see the new parameters
                runner = wrap() if not cfg.compile else torch.compile(wrap())
                logger.log({"event": "backbone_unfrozen"}, step=done)
            on_end(done)

        return train_one_epoch(
            runner, data.train_loader, optimizer, device=device, start_iter=start, max_iters=max_iters,
            lr_at=lambda i: set_lr(optimizer, cfg.lr, lr_factor(
                i, max_iters=max_iters, warmup_iters=cfg.warmup_iters, schedule=cfg.schedule,
                milestones=cfg.milestones)),
            amp=cfg.amp, scaler=scaler, grad_clip=cfg.grad_clip, channels_last=cfg.channels_last,
            logger=logger, log_every=cfg.log_every, on_iteration_end=on_iteration_end, progress=bar,
        )

    def after_epoch(done: int, last: bool) -> None:
        nonlocal best_ap, metrics
        due = last or (done % iters_per_epoch == 0 and (done // iters_per_epoch) % cfg.eval_every == 0)
        if data.val_loader is None or not due:
            return
        metrics = evaluate(runner, data, cfg, device, out, is_main=dist.is_main, progress=cfg.progress,
                           iteration=done)
        if dist.is_main and metrics is not None:
            logger.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=done, prefix="val/")
            if metrics["AP"] > best_ap:
                best_ap = metrics["AP"]
                save(done, "checkpoint_best.pt")
                return
        barrier()

    bar = tqdm(total=max_iters, initial=it, desc="train", unit="it", disable=not (cfg.progress and dist.is_main),
               dynamic_ncols=True)
    with closing(bar), closing(logger):
        it = run_epochs(start_iter=it, max_iters=max_iters, iters_per_epoch=iters_per_epoch,
                        sampler=data.train_sampler, train_epoch=train_epoch, save=save, after_epoch=after_epoch,
                        checkpoint_every=cfg.checkpoint_every, logger=logger, output=out, pending_eval=pending_eval,
                        checkpoint_before_eval=True, fault_checkpoints=not dist.enabled)
        logger.log({"event": "end", **peak_rss_report()}, step=it)
    return metrics or {}
