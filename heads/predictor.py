"""The shared base of the task predictors: images in, decoded and batched in the background, answers out.

Every task predictor (:class:`heads.detection.predictor.DetectionPredictor`,
:class:`heads.classification.predictor.ClassificationPredictor`,
:class:`heads.localization.predictor.LocalizationPredictor`) is built from a training checkpoint or an exported
file (:func:`load_model`) and takes the same inputs::

    pred = DetectionPredictor.from_files(["runs/demo/checkpoint_best.pt"])
    result = pred("photo.jpg")                        # a path, PIL image, HxWx3 uint8 RGB array or CHW tensor
    results = pred(["a.jpg", np.zeros((480, 640, 3), np.uint8)])   # a list -> a list
    for item, result in pred.stream(expand_sources(["pictures/"], recursive=True)): ...

Decoding and sources live in :mod:`heads.sources` (re-exported here): any image PIL opens, EXIF orientation
applied, converted to RGB; files, folders (``recursive``), globs, ``.txt`` lists of paths and videos (every
``vid_stride``-th frame, read with OpenCV when it is installed). :meth:`Predictor.stream` decodes and
preprocesses in background threads (``workers``) while the model runs, and records how long the model waited
for images (:attr:`Predictor.timing`); an unreadable file is reported to ``on_skip`` and the stream goes on.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from res_backbone.engine.optim_step import AMP_DTYPES, autocast

from .meta import MetaError, check_task, model_meta
from .sources import (  # noqa: F401  (re-exported: the predictors' inputs)
    IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ImageInput, Item, SourceError, decode_image, expand_sources, video_frames,
)

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "Item", "Predictor", "SourceError", "decode_image",
           "expand_sources", "load_model", "load_models"]



def load_model(path: Union[str, os.PathLike], *, device: str = "cpu", expect_task: Optional[str] = None):
    """Build the model of a training checkpoint or an exported file.

    Returns:
        ``(model, meta, eager)``: the model in eval mode on ``device`` (an exported file's runner when not
        eager), the :mod:`heads.meta` dict and whether it is an eager ``nn.Module`` (that may get a fast copy).

    Raises:
        FileNotFoundError; MetaError: another task than ``expect_task``, or a file lacking what prediction needs;
        ValueError / CheckpointMismatchError / CorruptCheckpointError: an unreadable file (each naming it).
    """
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        from heads.exported import is_exported_file, load_exported
    except ImportError:  # the export module is optional
        is_exported_file = None
    if is_exported_file is not None and is_exported_file(path):
        model = load_exported(path, device=device)
        check_task(model.meta, expect_task, source=path)
        return model, model.meta, False
    from res_backbone.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    meta = model_meta(ckpt, source=path)
    check_task(meta, expect_task, source=path)
    if meta["task"] == "detection":
        from heads.detection.ensemble import detector_from_checkpoint

        model = detector_from_checkpoint(ckpt, source=path)
    elif meta["task"] == "classification":
        from heads.classification.build import load_classifier

        model, _ = load_classifier(path)
    else:
        from heads.localization.build import load_localizer

        model, _ = load_localizer(path)
    return model.to(device).eval(), meta, True


def load_models(paths: Sequence[Union[str, os.PathLike]], *, device: str = "cpu", expect_task: Optional[str] = None):
    """:func:`load_model` of each path; several must share the task and the classes (an ensemble).

    Returns:
        ``(models, meta of the first, eager flags)``.
    """
    if not paths:
        raise ValueError("no model file given")
    loaded = [load_model(p, device=device, expect_task=expect_task) for p in paths]
    first = loaded[0][1]
    for p, (_, meta, _) in zip(paths[1:], loaded[1:]):
        if meta["task"] != first["task"] or meta["class_names"] != first["class_names"] \
                or meta.get("cat_ids") != first.get("cat_ids"):
            raise MetaError(f"{p}: a {meta['task']} model of classes {meta['class_names']} (ids {meta.get('cat_ids')}), "
                            f"but {paths[0]} has {first['class_names']} (ids {first.get('cat_ids')}); an ensemble "
                            "needs the same task and classes")
    return [m for m, _, _ in loaded], first, [e for _, _, e in loaded]


class Predictor:
    """What every task predictor shares: models, device, AMP, batching, background decoding, timing.

    A subclass defines :meth:`prepare` (per image, in a decoding thread: resize and normalise) and
    :meth:`run_batch` (per batch, in the caller's thread: run the model(s), return one result per image).

    Args:
        models: one model, or several (an ensemble), each following its task's eval contract (``heads.meta``).
        meta: the :mod:`heads.meta` dict (classes, mean/std, image size).
        device: ``cpu`` or ``cuda``.
        amp: ``none``, ``bf16`` or ``fp16`` (autocast around the model).
        batch_size: images per forward pass.
        workers: decoding threads of :meth:`stream` (0: decode in the caller's thread).
        fast: run eager models as their inference copy (BatchNorm folded, channels-last; same answers within
            float rounding, ``res_backbone.prepare_for_inference``).
        eager: per model, whether it is an ``nn.Module`` (default: ``isinstance``).
    """

    task = ""

    def __init__(self, models, meta: Dict[str, Any], *, device: str = "cpu", amp: str = "none", batch_size: int = 4,
                 workers: int = 2, fast: bool = True, eager: Optional[Sequence[bool]] = None,
                 channels_last: bool = False):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {amp!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        models = list(models) if isinstance(models, (list, tuple)) else [models]
        eager = list(eager) if eager is not None else [isinstance(m, torch.nn.Module) for m in models]
        self.device, self.amp = torch.device(device), amp
        self.meta, self.batch_size, self.workers = dict(meta), int(batch_size), int(workers)
        self.channels_last = channels_last
        self.models = []
        for m, is_eager in zip(models, eager):
            if is_eager:  # the model stays where it is (from_files loads it onto the device)
                if fast and hasattr(m, "inference_copy"):
                    m = m.inference_copy(AMP_DTYPES[amp])  # an eval-mode copy: a training model is left as it is
                elif fast:
                    from res_backbone import prepare_for_inference

                    m = prepare_for_inference(m, autocast_dtype=AMP_DTYPES[amp])
                else:
                    m = m.eval()
            self.models.append(m)
        self.eager = eager
        self.timing = {"images": 0, "seconds": 0.0, "wait_seconds": 0.0}

    @classmethod
    def from_files(cls, paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], *, device: str = "cpu",
                   **kwargs):
        """A predictor of the checkpoint(s) / exported file(s) ``paths`` (several: an ensemble); ``kwargs`` go
        to the constructor. Raises :class:`~heads.meta.MetaError` for a model of another task."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        models, meta, eager = load_models(paths, device=device, expect_task=cls.task)
        return cls(models, meta, device=device, eager=eager, **kwargs)

    # ---------------------------------------------------------------- the subclass's part
    def prepare(self, image: np.ndarray) -> Any:
        """Per image, in a decoding thread: the model input(s) of an ``(H, W, 3)`` uint8 RGB image."""
        raise NotImplementedError

    def run_batch(self, prepared: List[Any], items: List[Item], images: List[np.ndarray]) -> List[Any]:
        """Per batch: one result per image, in the image's own coordinates."""
        raise NotImplementedError

    def batch_cost(self, prepared: Any) -> int:
        """How many forward-pass slots one prepared image takes (sliced images take one per tile)."""
        return 1

    # ---------------------------------------------------------------- running a model
    def forward(self, model, *args):
        """``model(*args)`` under ``no_grad`` and autocast; inputs moved to the device (channels-last if asked)."""
        moved = []
        for a in args:
            if isinstance(a, torch.Tensor):
                a = a.to(self.device, non_blocking=True)
                if self.channels_last and a.dim() == 4:
                    a = a.contiguous(memory_format=torch.channels_last)
            moved.append(a)
        with torch.no_grad(), autocast(self.device, self.amp):
            return model(*moved)

    # ---------------------------------------------------------------- inputs
    def __call__(self, inputs: Union[ImageInput, Sequence[ImageInput]]):
        """Predict one input (-> one result) or a list (-> a list); inputs as :func:`decode_image` takes."""
        single = not isinstance(inputs, (list, tuple))
        batch = [inputs] if single else list(inputs)
        items = [Item(str(x) if isinstance(x, (str, os.PathLike)) else f"<input {i}>",
                      data=None if isinstance(x, (str, os.PathLike)) else x) for i, x in enumerate(batch)]

        def fail(item, err):
            raise err

        results = []
        for _, result, image in self.stream(items, on_skip=fail, workers=0):
            result.image = image  # result.save() draws on it
            results.append(result)
        return results[0] if single else results

    def _load(self, item: Item, exif: bool) -> Tuple[Item, Optional[np.ndarray], Any, Optional[BaseException]]:
        try:
            image = decode_image(item.data if item.data is not None else item.path, exif=exif)
            return item, image, self.prepare(image), None
        except (OSError, ValueError) as e:
            return item, None, None, e

    def _loaded(self, items: Iterable[Item], workers: int, vid_stride: int, exif: bool) -> Iterator[tuple]:
        """Decoded and prepared items, in order; files by ``workers`` threads, videos frame by frame."""
        pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        pending: List[Any] = []
        depth = max(2, 2 * workers) * self.batch_size
        try:
            for item in items:
                if item.video:
                    while pending:
                        yield pending.pop(0).result()
                    try:
                        for index, frame in video_frames(item.path, vid_stride):
                            yield Item(item.path, frame=index), frame, self.prepare(frame), None
                    except (OSError, ValueError) as e:
                        yield item, None, None, e
                    continue
                if pool is None:
                    yield self._load(item, exif)
                    continue
                pending.append(pool.submit(self._load, item, exif))
                while len(pending) >= depth:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            if pool is not None:
                for f in pending:
                    f.cancel()
                pool.shutdown(wait=True)

    def _background(self, gen: Iterator[tuple]) -> Iterator[tuple]:
        """``gen`` run in a thread ahead of the consumer (a bounded queue), so decoding overlaps the model."""
        q: "queue.Queue" = queue.Queue(maxsize=4 * self.batch_size)
        done = object()
        stop = threading.Event()

        def produce():
            try:
                for x in gen:
                    while not stop.is_set():
                        try:
                            q.put(x, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as e:  # surfaces in the consumer
                q.put(e)

        thread = threading.Thread(target=produce, name="predictor-decode", daemon=True)
        thread.start()
        try:
            while True:
                x = q.get()
                if x is done:
                    return
                if isinstance(x, BaseException):
                    raise x
                yield x
        finally:
            stop.set()
            thread.join(timeout=5)

    def stream(self, items: Iterable[Item], *, on_skip: Optional[Callable[[Item, BaseException], None]] = None,
               workers: Optional[int] = None, vid_stride: int = 1, exif: bool = True, progress=None
               ) -> Iterator[Tuple[Item, Any, np.ndarray]]:
        """Predict ``items`` in batches of ``batch_size``; yield ``(item, result, decoded image)`` in order.

        Decoding and preprocessing run in background threads; ``timing`` records images, seconds and the
        seconds the model waited for images. An item that cannot be decoded goes to ``on_skip(item, error)``
        (default: skipped silently) and the stream continues. ``progress``: a tqdm bar advanced per image.
        """
        workers = self.workers if workers is None else workers
        source = self._loaded(items, workers, vid_stride, exif)
        if workers > 0:
            source = self._background(source)
        batch: List[tuple] = []
        cost = 0
        it = iter(source)
        while True:
            t0 = time.perf_counter()
            nxt = next(it, None)
            t1 = time.perf_counter()
            self.timing["wait_seconds"] += t1 - t0
            self.timing["seconds"] += t1 - t0
            if nxt is not None:
                item, image, prepared, err = nxt
                if err is not None:
                    if on_skip is not None:
                        on_skip(item, err)
                    continue
                batch.append((item, image, prepared))
                cost += self.batch_cost(prepared)
                if cost < self.batch_size:
                    continue
            if not batch:
                break
            results = self.run_batch([b[2] for b in batch], [b[0] for b in batch], [b[1] for b in batch])
            self.timing["images"] += len(batch)
            self.timing["seconds"] += time.perf_counter() - t1
            if progress is not None:
                progress.update(len(batch))
            for (item, image, _), result in zip(batch, results):
                yield item, result, image
            batch, cost = [], 0
            if nxt is None:
                break
