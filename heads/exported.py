"""Run a file :mod:`heads.export` wrote exactly like the eager model of its task.

    model = load_exported("model.onnx")            # or model.pt2, model.ts
    model.meta["class_names"], model.format
    detections = model(images, image_sizes)         # detection: [{"boxes", "scores", "labels"}] per image

The call contract is the eager model's (``FasterRCNN.eval()(images, sizes)``, a classifier's logits, a
localizer's ``{"logits", "boxes"}``, a backbone's feature dict), so a predictor runs either without knowing which.
A detector file takes one image per call: a batch is run image by image, each zero-padded at the bottom/right up
to the file's smallest side (``meta["min_size"]``) when it is smaller.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import meta as meta_mod
from .export import EXTRA_FILE, require

__all__ = ["ExportedModel", "is_exported_file", "load_exported"]

PathLike = Union[str, os.PathLike]
SUFFIXES = {".onnx": "onnx", ".pt2": "pt2", ".ts": "torchscript", ".torchscript": "torchscript"}


def _zip_names(path: Path) -> List[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def _format_of(path: Path) -> Optional[str]:
    if path.suffix.lower() == ".onnx":
        return "onnx"
    names = _zip_names(path)
    if any(n.endswith("/" + EXTRA_FILE) or n == EXTRA_FILE for n in names):
        if any("/code/" in n or n.startswith("code/") for n in names):
            return "torchscript"
        return "pt2"
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        return "pt2"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    return SUFFIXES.get(path.suffix.lower()) if path.suffix.lower() in (".pt2", ".ts", ".torchscript") else None


def is_exported_file(path: PathLike) -> bool:
    """Whether ``path`` is an ONNX, ``.pt2`` or TorchScript file (not a training checkpoint)."""
    p = Path(path)
    return p.is_file() and _format_of(p) is not None


class ExportedModel:
    """A loaded exported file: ``meta`` (:mod:`heads.meta`), ``format``, and the eager call contract."""

    def __init__(self, run, meta: Dict, fmt: str, source: str):
        self._run, self.meta, self.format, self.source = run, meta, fmt, source
        self.task = meta["task"]

    def eval(self) -> "ExportedModel":  # the eager models' idiom; an exported graph has no train mode
        return self

    def __call__(self, images: torch.Tensor, image_sizes: Optional[Union[Sequence[Tuple[int, int]], torch.Tensor]]
                 = None):
        min_size = int(self.meta.get("min_size") or 1)
        if self.task == "detection" and min(images.shape[-2:]) < min_size:
            # zero padding at the bottom/right, as a padded batch has: the image sizes (and boxes) are unchanged
            h, w = images.shape[-2:]
            images = torch.nn.functional.pad(images, (0, max(0, min_size - w), 0, max(0, min_size - h)))
        if min(images.shape[-2:]) < min_size:
            raise ValueError(f"{self.source}: images of {tuple(images.shape[-2:])} px are below the smallest side "
                             f"this file accepts ({min_size} px); pad or resize them")
        images = images.float().contiguous()
        if self.task == "detection":
            sizes = torch.as_tensor(image_sizes if image_sizes is not None
                                    else [images.shape[-2:]] * images.shape[0], dtype=torch.long).reshape(-1, 2)
            out = []
            for i in range(images.shape[0]):  # one image per call (the module docstring)
                try:
                    boxes, scores, labels = self._run(images[i:i + 1], sizes[i:i + 1])
                except RuntimeError as e:
                    if self.format == "pt2" and "Runtime assertion failed" in str(e):
                        raise RuntimeError(
                            f"{self.source}: this .pt2 detector was exported with torchvision's bound on NMS "
                            "(at least 2 boxes kept) and stops on an image where NMS keeps fewer; files that "
                            "tools/export.py writes now have no such bound: export it again (docs/deploy.md)") from e
                    raise
                out.append({"boxes": boxes, "scores": scores, "labels": labels.long()})
            return out
        outs = self._run(images)
        if self.task == "classification":
            return outs[0]
        if self.task == "localization":
            return {"logits": outs[0], "boxes": outs[1]}
        return dict(zip(self.meta.get("outputs") or [], outs))


def load_exported(path: PathLike, device: Union[str, torch.device] = "cpu", *,
                  expect_task: Optional[str] = None) -> ExportedModel:
    """Load an exported file and its metadata.

    Raises:
        FileNotFoundError: no such file.
        heads.meta.MetaError: a file without our metadata, or of another task than ``expect_task``.
        ValueError: not an ONNX / ``.pt2`` / TorchScript file.
        MissingDeployDependency: an ONNX file without onnxruntime installed.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"exported model {p} does not exist")
    fmt = _format_of(p)
    if fmt is None:
        raise ValueError(f"{p}: not an ONNX, .pt2 or TorchScript file (a training checkpoint goes to --checkpoint "
                         "as it is; tools/export.py writes the others)")
    device = torch.device(device)
    if fmt == "onnx":
        return _load_onnx(p, device, expect_task)
    if fmt == "pt2":
        extra = {EXTRA_FILE: ""}
        program = torch.export.load(str(p), extra_files=extra)
        meta = meta_mod.loads(extra[EXTRA_FILE], source=str(p), expect_task=expect_task)
        module = program.module().to(device)

        def run(*args):
            with torch.no_grad():
                return tuple(module(*(a.to(device) for a in args)))
        return ExportedModel(run, meta, fmt, str(p))
    extra = {EXTRA_FILE: ""}
    module = torch.jit.load(str(p), map_location=device, _extra_files=extra)
    text = extra[EXTRA_FILE]
    meta = meta_mod.loads(text.decode() if isinstance(text, bytes) else text, source=str(p), expect_task=expect_task)

    def run_ts(*args):
        with torch.no_grad():
            return tuple(module(*(a.to(device) for a in args)))
    return ExportedModel(run_ts, meta, fmt, str(p))


def _load_onnx(p: Path, device: torch.device, expect_task: Optional[str]) -> ExportedModel:
    ort = require("onnxruntime")
    onnx = require("onnx")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # a damaged or non-ONNX file
        raise ValueError(f"{p}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    props = {prop.key: prop.value for prop in model.metadata_props}
    meta = meta_mod.loads(props.get(meta_mod.META_KEY), source=str(p), expect_task=expect_task)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(p), providers=providers)
    names = [i.name for i in session.get_inputs()]

    def run(*args):
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        return tuple(torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds))
    return ExportedModel(run, meta, "onnx", str(p))
