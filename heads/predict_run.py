"""``tools/predict.py``'s run: any model file on files, folders, globs, lists and videos, into a folder.

:func:`run_prediction` loads the model(s) (:func:`heads.predictor.load_models`: training checkpoints or exported
files; the task decides the predictor), expands the sources, predicts them in batches with background decoding
and writes into ``cfg.output``:

* ``predictions.json``: a JSON list, one record per detection (one per image for classifiers and localizers,
  with its ``topk``): ``file_name``, ``frame`` (videos), ``category_id``, ``category_name``, ``bbox`` (COCO ``xywh``
  in original pixels), ``score``; with ``coco_json`` also that file's ``image_id``, so pycocotools' ``loadRes``
  reads the file as is. Rewritten atomically after each batch (at most every ``flush_seconds``, and always at the
  end or on an interruption), so a stopped run leaves a valid JSON of what it finished.
* ``skipped.json``: the files that could not be used (unreadable, truncated, empty, not in ``coco_json``) and why.
* ``pictures/``: the first ``max_pictures`` images with their answers drawn; ``labels/``: one text file per image
  (``save_txt``).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from res_backbone.io import atomic_write_json

from .predictor import Item, SourceError, expand_sources, load_models

log = logging.getLogger(__name__)

PICTURE_SCORE = 0.3  # the least score of a box drawn in pictures/ (training's pictures use the same)

__all__ = ["PredictConfig", "add_running_args", "add_tta_args", "run_prediction"]


def add_tta_args(g) -> None:
    """--tta-scales --tta-flip --merge --merge-iou (detectors; ``tools/eval_det.py`` and ``tools/predict.py``)."""
    g.add_argument("--tta-scales", type=int, nargs="+",
                   help="detectors: predict at these longer sides (test-time augmentation), e.g. 384 512 640")
    g.add_argument("--tta-flip", action="store_true", help="detectors: also predict the mirrored images")
    g.add_argument("--merge", default="nms", choices=("nms", "wbf"),
                   help="how TTA/ensemble variants' boxes are merged: per-class NMS or weighted box fusion "
                        "(default nms)")
    g.add_argument("--merge-iou", type=float, default=0.55,
                   help="IoU at which variants' boxes are the same object (default 0.55)")


def add_running_args(g) -> None:
    """--batch-size --device --amp --no-fast-path --workers --no-progress (the prediction tools)."""
    g.add_argument("--batch-size", type=int, default=4, help="images (or tiles) per forward pass (default 4)")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu or cuda (default cpu)")
    g.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast dtype (default none)")
    g.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                   help="run checkpoints as trained instead of their inference copy (BatchNorm folded into the "
                        "convs, channels-last; same answers within float rounding, 1.2-1.6x faster on CPU)")
    g.add_argument("--workers", type=int, default=2,
                   help="image decoding threads (default 2; 0: decode in the main thread)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


@dataclass
class PredictConfig:
    """Every option of ``tools/predict.py`` (its flags, one to one)."""

    checkpoint: Sequence[str] = ()
    source: Sequence[str] = ()
    output: str = "runs/predict"
    recursive: bool = False
    vid_stride: int = 1
    coco_json: Optional[str] = None
    max_pictures: int = 16
    save_txt: bool = False
    score_thresh: float = 0.05
    classes: Optional[Sequence[str]] = None
    max_dets: Optional[int] = None
    topk: int = 5
    image_size: Optional[int] = None
    batch_size: int = 4
    device: str = "cpu"
    amp: str = "none"
    fast_path: bool = True
    tta_scales: Optional[Sequence[int]] = None
    tta_flip: bool = False
    merge: str = "nms"
    merge_iou: float = 0.55
    slice: Optional[int] = None
    slice_overlap: float = 0.2
    slice_full: bool = False
    workers: int = 2
    progress: bool = True
    flush_seconds: float = 2.0


def build_predictor(cfg: PredictConfig):
    """The task's predictor of ``cfg.checkpoint`` (the first file's task decides)."""
    models, meta, eager = load_models(cfg.checkpoint, device=cfg.device)
    common = dict(device=cfg.device, amp=cfg.amp, batch_size=cfg.batch_size, workers=cfg.workers,
                  fast=cfg.fast_path, eager=eager, image_size=cfg.image_size)
    if meta["task"] == "detection":
        from .detection.predictor import DetectionPredictor

        return DetectionPredictor(models, meta, tta_scales=cfg.tta_scales, tta_flip=cfg.tta_flip, merge=cfg.merge,
                                  merge_iou=cfg.merge_iou, score_thresh=cfg.score_thresh, classes=cfg.classes, max_dets=cfg.max_dets,
                                  slice_size=cfg.slice, slice_overlap=cfg.slice_overlap, slice_full=cfg.slice_full,
                                  **common)
    detection_only = [f for f, v in (("--tta-scales", cfg.tta_scales), ("--tta-flip", cfg.tta_flip),
                                     ("--slice", cfg.slice), ("--classes", cfg.classes)) if v]
    if detection_only:
        raise ValueError(f"{cfg.checkpoint[0]}: a {meta['task']} model; {', '.join(detection_only)} apply to "
                         "detectors only")
    if meta["task"] == "classification":
        from .classification.predictor import ClassificationPredictor

        return ClassificationPredictor(models, meta, topk=cfg.topk, **common)
    from .localization.predictor import LocalizationPredictor

    return LocalizationPredictor(models, meta, topk=cfg.topk, **common)


def coco_image_ids(coco_json: str, items: List[Item], roots: Sequence[str], cat_ids) -> Tuple[List[Item], List[dict]]:
    """Give each item the ``image_id`` of ``coco_json`` (matched by ``file_name`` relative to a source folder, or
    by base name when that is unique), ordered by id; items the file does not list are returned as skipped."""
    try:
        with open(coco_json, encoding="utf-8") as f:
            data = json.load(f)
        images = data["images"]
        json_cats = sorted(int(c["id"]) for c in data.get("categories", []))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{coco_json}: not a readable COCO annotation file ({type(e).__name__}: {e})") from None
    if cat_ids is not None and json_cats and json_cats != sorted(cat_ids):
        raise ValueError(f"{coco_json} has category ids {json_cats} but the model's are {sorted(cat_ids)}")
    by_name = {str(im["file_name"]).replace("\\", "/"): int(im["id"]) for im in images}
    by_base: Dict[str, List[int]] = {}
    for name, i in by_name.items():
        by_base.setdefault(Path(name).name, []).append(i)
    matched, skipped = [], []
    for item in items:
        p = Path(item.path)
        rels = [p.relative_to(r).as_posix() for r in roots if Path(r).is_dir() and p.is_relative_to(r)]
        image_id = next((by_name[r] for r in rels if r in by_name), None)
        if image_id is None and len(by_base.get(p.name, [])) == 1:
            image_id = by_base[p.name][0]
        if image_id is None:
            skipped.append({"file_name": item.path, "error": f"not listed in {coco_json}"})
        else:
            matched.append(Item(item.path, image_id=image_id, video=item.video))
    return sorted(matched, key=lambda it: it.image_id), skipped


class _Writer:
    """predictions.json / skipped.json (atomic rewrites), pictures and text files."""

    def __init__(self, cfg: PredictConfig, out: Path, detection: bool):
        self.cfg, self.out, self.detection = cfg, out, detection
        self.records: List[dict] = []
        self.skipped: List[dict] = []
        self.pictures = 0
        self.last_flush = 0.0
        self.names: Dict[str, int] = {}

    def stem(self, item: Item) -> str:
        stem = Path(item.path).stem + (f"_{item.frame:06d}" if item.frame is not None else "")
        n = self.names.get(stem, 0)
        self.names[stem] = n + 1
        return stem if n == 0 else f"{stem}_{n}"

    def add(self, item: Item, result, image) -> None:
        self.records.extend(result.to_records(item.image_id))
        if self.cfg.save_txt or self.pictures < self.cfg.max_pictures:
            stem = self.stem(item)
            if self.cfg.save_txt:
                (self.out / "labels").mkdir(exist_ok=True)
                (self.out / "labels" / f"{stem}.txt").write_text(result.to_txt())
            if self.pictures < self.cfg.max_pictures:
                # pictures show the confident boxes only (as training's pictures): 0.05 boxes would hide the image
                kw = {"score_thresh": max(PICTURE_SCORE, self.cfg.score_thresh)} if self.detection else {}
                result.save(self.out / "pictures" / f"{stem}.png", image, **kw)
                self.pictures += 1

    def skip(self, item: Item, err: BaseException) -> None:
        name = item.path + (f" (frame {item.frame})" if item.frame is not None else "")
        log.warning("skipped %s: %s", name, err)
        self.skipped.append({"file_name": item.path, "error": str(err)})

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_flush >= self.cfg.flush_seconds:
            atomic_write_json(self.records, self.out / "predictions.json")
            atomic_write_json(self.skipped, self.out / "skipped.json", indent=1)
            self.last_flush = now


def run_prediction(cfg: PredictConfig) -> Dict[str, Any]:
    """Predict every source with the model(s) of ``cfg`` and write the outputs (module docstring).

    Returns:
        The summary: ``task``, ``images``, ``records``, ``skipped`` (list), ``seconds``, ``img_per_s``,
        ``wait_share`` (the share of the time the model waited for decoded images), ``output``.

    Raises:
        SourceError: a source names nothing; FileNotFoundError / ValueError (MetaError) / CorruptCheckpointError:
        a model file that cannot be used; each naming the file.
    """
    from tqdm import tqdm

    if not cfg.source:
        raise SourceError("no --source given")
    items = expand_sources(cfg.source, recursive=cfg.recursive)
    predictor = build_predictor(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    writer = _Writer(cfg, out, predictor.task == "detection")
    if cfg.coco_json:
        items, not_listed = coco_image_ids(cfg.coco_json, items, [s for s in cfg.source if Path(s).is_dir()],
                                           predictor.meta.get("cat_ids"))
        writer.skipped.extend(not_listed)
        for s in not_listed:
            log.warning("skipped %s: %s", s["file_name"], s["error"])
    total = None if any(it.video for it in items) else len(items)
    bar = tqdm(total=total, desc="predict", unit="img", disable=not cfg.progress, dynamic_ncols=True)
    images = 0
    try:
        for item, result, image in predictor.stream(items, on_skip=writer.skip, vid_stride=cfg.vid_stride,
                                                    exif=not cfg.coco_json, progress=bar):
            writer.add(item, result, image)
            images += 1
            writer.flush()
    finally:
        bar.close()
        writer.flush(force=True)
    t = predictor.timing
    summary = {"task": predictor.task, "images": images, "records": len(writer.records), "skipped": writer.skipped,
               "seconds": round(t["seconds"], 3), "img_per_s": round(images / t["seconds"], 2) if t["seconds"] else None,
               "wait_share": round(t["wait_seconds"] / t["seconds"], 4) if t["seconds"] else None,
               "output": str(out)}
    atomic_write_json({k: v for k, v in summary.items() if k != "skipped"} | {"skipped": len(writer.skipped)},
                      out / "summary.json", indent=2)
    return summary
