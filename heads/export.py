"""Trained models out of Python: ONNX, ``torch.export`` (``.pt2``) and TorchScript files that carry their own metadata.

    path = export_checkpoint("runs/demo/checkpoint_best.pt", "onnx", "model.onnx")
    model = heads.exported.load_exported(path)          # runs like the eager model (same contract)

What each file holds (its inputs and outputs, the graph from :func:`graph_module`):

==============  ===========================================  ==============================================
task            inputs                                       outputs
==============  ===========================================  ==============================================
detection       ``images`` (1, 3, H, W) float32, normalised   ``boxes`` (N, 4) xyxy input pixels, ``scores``
                and padded; ``image_sizes`` (1, 2) int64      (N,), ``labels`` (N,) int64 in 1..K; N may be 0
classification  ``images`` (B, 3, H, W)                       ``logits`` (B, K)
localization    ``images`` (B, 3, S, S)                       ``logits`` (B, K), ``boxes`` normalised xyxy
backbone        ``images`` (B, 3, H, W)                       one map per feature level (``meta["outputs"]``)
==============  ===========================================  ==============================================

H and W are dynamic in every file (one file serves any image size, down to the smallest the network's strides
allow: :func:`export_checkpoint` records it as ``meta["min_size"]``). B is dynamic for the classifier,
localizer and backbone; a detector file takes one image per call (its decoding, NMS and top-k run inside the
graph, on one image's boxes). The detector is exported from its inference copy (BatchNorm folded).

TorchScript files are traced: right for the classifier, localizer and backbone (no data-dependent control
flow), not offered for the detector (tracing would freeze the anchors and box counts of one image size).

The facts prediction needs (:mod:`heads.meta`: task, classes and their dataset ids, mean/std, trained size)
are stored in the file: ONNX ``metadata_props``, the ``.pt2`` archive's extra files, TorchScript ``_extra_files``.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import meta as meta_mod

__all__ = ["FORMATS", "GraphModule", "MissingDeployDependency", "export_checkpoint", "export_model",
           "graph_module", "load_checkpoint_model"]

FORMATS = ("onnx", "pt2", "torchscript")
PathLike = Union[str, os.PathLike]
EXTRA_FILE = meta_mod.META_KEY + ".json"  # the name under which .pt2 and TorchScript files store the metadata


class MissingDeployDependency(ImportError):
    """An optional package of the ``[deploy]`` extra is not installed."""


def require(module: str):
    """Import one of the ``[deploy]`` extra's packages, or say in one line how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise MissingDeployDependency(f"{module} is not installed: pip install -e '.[deploy]' (onnx, onnxruntime, "
                                      "onnxscript)") from None


class GraphModule(nn.Module):
    """The exported graph of a model: plain tensors in, a tuple of tensors out (see the module docstring)."""

    def __init__(self, model: nn.Module, task: str, outputs: Optional[List[str]] = None):
        super().__init__()
        self.model, self.task, self.outputs = model, task, outputs

    def forward(self, images: torch.Tensor, image_sizes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
        if self.task == "detection":
            out = self.model(images, image_sizes)[0]
            return out["boxes"], out["scores"], out["labels"]
        out = self.model(images)
        if self.task == "classification":
            return (out,)
        if self.task == "localization":
            return out["logits"], out["boxes"]
        return tuple(out[name] for name in self.outputs)  # backbone: its feature dict, in order


def load_checkpoint_model(path: PathLike, what: str = "model") -> Tuple[nn.Module, Dict]:
    """The eval-mode model of a ``train_*.py`` checkpoint (``what="backbone"``: its feature extractor) and the
    metadata to store with it.

    Raises:
        heads.meta.MetaError, ValueError, OSError: not a training checkpoint, or unreadable.
    """
    from res_backbone.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(path))
    meta = meta_mod.model_meta(ckpt, source=str(path))
    if meta["task"] == "detection":
        from .detection.ensemble import load_detector

        model, _ = load_detector(path)
    elif meta["task"] == "classification":
        from .classification import load_classifier

        model, _ = load_classifier(path)
    else:
        from .localization import load_localizer

        model, _ = load_localizer(path)
    if what == "backbone":
        backbone = getattr(model, "backbone", None)
        if backbone is None:  # a classifier is a ResNet: its trunk's features
            from res_backbone import create_backbone

            backbone = create_backbone(meta["arch"], in_chans=getattr(model, "in_chans", 3))
            backbone.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")},
                                     strict=False)
        meta = dict(meta, task="backbone")
        model = backbone
    elif what != "model":
        raise ValueError(f"what must be 'model' or 'backbone', got {what!r}")
    return model.eval(), dict(meta, in_chans=_in_chans(model))


def graph_module(model: nn.Module, meta: Dict) -> GraphModule:
    """Wrap ``model`` for export; a detector is replaced by its inference copy (BatchNorm folded)."""
    task = meta["task"]
    if task == "detection" and hasattr(model, "inference_copy"):
        model = model.inference_copy()
    outputs = None
    if task == "backbone":
        with torch.no_grad():
            outputs = list(model(torch.zeros(1, _in_chans(model), 64, 64)).keys())
    return GraphModule(model.eval(), task, outputs).eval()


def _in_chans(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def _example(meta: Dict, model: nn.Module) -> Tuple[torch.Tensor, ...]:
    side = int(meta.get("image_size") or 224)
    side = max(160, min(side, 512))  # an ordinary size: the export's symbolic shapes hold from the minimum up
    # batch 2 for the batched tasks: export specialises a dimension of size 1 to a constant
    batch = 1 if meta["task"] == "detection" else 2
    x = torch.randn(batch, _in_chans(model), side, side + 32 if meta["task"] != "localization" else side)
    if meta["task"] == "detection":
        return x, torch.tensor([[x.shape[2], x.shape[3]]], dtype=torch.long)
    return (x,)


@contextlib.contextmanager
def nms_may_keep_none():
    """While exporting, let ``torchvision::nms`` keep any number of boxes, none and one included.

    torchvision's fake kernel sizes its output with ``create_unbacked_symint()``, whose default lower bound is 2, so
    ``torch.export`` writes the run-time assertion ``u >= 2`` after every NMS: a ``.pt2`` detector then stops on an
    image where NMS keeps fewer than 2 boxes. Inside this block the fake kernel says ``0 <= kept <= len(boxes)``;
    the registration is removed on exit (torchvision's own comes back).
    """
    lib = torch.library.Library("torchvision", "FRAGMENT")

    def fake_nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        return dets.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.long)

    try:
        torch.library.register_fake("torchvision::nms", fake_nms, lib=lib)
        yield
    finally:
        lib._destroy()


def _exported_program(graph: GraphModule, example: Tuple[torch.Tensor, ...], task: str):
    auto = torch.export.Dim.AUTO
    images = {2: auto, 3: auto} if task == "detection" else {0: auto, 2: auto, 3: auto}
    shapes = {"images": images, "image_sizes": None} if task == "detection" else {"images": images}
    with torch.no_grad(), nms_may_keep_none():
        return torch.export.export(graph, example, dynamic_shapes=shapes, strict=False)


def min_size_of(program) -> int:
    """The smallest image side the exported program accepts (its range constraints on H and W)."""
    lows = [int(r.lower) for r in program.range_constraints.values()
            if hasattr(r, "lower") and str(r.lower).lstrip("-").isdigit()]
    return max([2] + [v for v in lows if v < 4096])


def export_model(model: nn.Module, meta: Dict, fmt: str, output: PathLike) -> Path:
    """Write ``model`` (eval mode, of ``meta["task"]``) as ``fmt`` to ``output`` with ``meta`` inside.

    Raises:
        ValueError: an unknown format, or TorchScript for a detector.
        MissingDeployDependency: ONNX without the ``[deploy]`` extra.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "torchscript" and meta["task"] == "detection":
        raise ValueError("TorchScript is not offered for detectors (tracing freezes one image size's anchors and "
                         "box counts): export to onnx or pt2")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = graph_module(model, meta)
    example = _example(meta, graph.model)
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(graph, example, check_trace=False)
        meta = dict(meta, format="torchscript", min_size=32, outputs=graph.outputs)
        torch.jit.save(traced, str(out), _extra_files={EXTRA_FILE: meta_mod.dumps(meta)})
        return out
    program = _exported_program(graph, example, meta["task"])
    meta = dict(meta, format=fmt, min_size=min_size_of(program), outputs=graph.outputs)
    if fmt == "pt2":
        torch.export.save(program, str(out), extra_files={EXTRA_FILE: meta_mod.dumps(meta)})
        return out
    require("onnx")
    require("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onx = torch.onnx.export(program, example, dynamo=True, verbose=False,
                                input_names=["images", "image_sizes"][: len(example)],
                                output_names=_output_names(meta, graph.outputs))
    onx.model.metadata_props[meta_mod.META_KEY] = meta_mod.dumps(meta)
    onx.save(str(out))
    return out


def _output_names(meta: Dict, outputs: Optional[List[str]]) -> List[str]:
    return {"detection": ["boxes", "scores", "labels"], "classification": ["logits"],
            "localization": ["logits", "boxes"]}.get(meta["task"], outputs or [])


def export_checkpoint(checkpoint: PathLike, fmt: str, output: PathLike, what: str = "model") -> Path:
    """:func:`export_model` of a ``train_*.py`` checkpoint's model (or its backbone)."""
    model, meta = load_checkpoint_model(checkpoint, what)
    return export_model(model, meta, fmt, output)


def verification_batches(meta: Dict, image_paths: List[PathLike], sizes: Tuple[float, ...] = (1.0, 0.75)
                         ) -> List[Tuple[str, torch.Tensor, Optional[torch.Tensor]]]:
    """``(name, images, image_sizes)`` to compare an exported file with its eager model on: each image at the
    trained size and at ``sizes`` x it (two image sizes through one file), plus a uniform grey image (a
    detector usually finds nothing there: the zero-detection case), preprocessed as evaluation does."""
    import numpy as np

    from res_backbone.data.collate import pad_images
    from res_backbone.data.images import load_rgb_image
    from res_backbone.data.transforms import build_eval_transforms

    side = int(meta.get("image_size") or 224)
    grey = np.full((side, side, 3), 128, dtype=np.uint8)
    pictures = [(str(p), load_rgb_image(p)) for p in image_paths] + [("uniform grey", grey)]
    out = []
    for scale in sizes:
        size = max(int(meta.get("min_size") or 32), round(side * scale))
        tf = build_eval_transforms(size, meta["mean"], meta["std"])
        for name, image in pictures:
            x = tf(image=image, bboxes=[], labels=[])["image"].float()
            if meta["task"] == "localization":  # square inputs, as its evaluation resizes them
                x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear",
                                                    align_corners=False)[0]
            if int(meta.get("in_chans") or 3) == 1:
                x = x[:1]
            hw = torch.tensor([[x.shape[1], x.shape[2]]], dtype=torch.long)
            out.append((f"{name} @ {size} px", pad_images([x], 32), hw))
    return out


def compare(eager: nn.Module, exported, batches, meta: Dict) -> Dict:
    """Largest differences between the eager model and the exported file over ``batches``.

    Returns:
        ``{"max_box_px", "max_score", "labels_equal", "detections", "zero_detection_images", "cases"}``
        (detection; other tasks report ``max_abs`` over their outputs); ``"errors"`` lists inputs the file
        could not run (each then counts as a difference).
    """
    report = {"max_box_px": 0.0, "max_score": 0.0, "max_abs": 0.0, "labels_equal": True, "cases": 0,
              "detections": 0, "zero_detection_images": 0}
    for name, images, sizes in batches:
        with torch.no_grad():
            if meta["task"] == "detection":
                a = eager(images, sizes)[0]
                report["cases"] += 1
                report["detections"] += int(a["boxes"].shape[0])
                report["zero_detection_images"] += int(a["boxes"].shape[0] == 0)
                try:
                    b = exported(images, sizes)[0]
                except RuntimeError as e:  # e.g. a .pt2 detector on an image with fewer than 2 boxes
                    report["labels_equal"] = False
                    report.setdefault("errors", []).append(f"{name}: {e}")
                    continue
                if a["labels"].shape != b["labels"].shape or not torch.equal(a["labels"], b["labels"].long()):
                    report["labels_equal"] = False
                    continue
                if a["boxes"].numel():
                    report["max_box_px"] = max(report["max_box_px"], float((a["boxes"] - b["boxes"]).abs().max()))
                    report["max_score"] = max(report["max_score"], float((a["scores"] - b["scores"]).abs().max()))
            else:
                a, b = eager(images), exported(images)
                pairs = (zip(a.values(), b.values()) if isinstance(a, dict) else [(a, b)])
                report["cases"] += 1
                for p, q in pairs:
                    report["max_abs"] = max(report["max_abs"], float((p.float() - q.float()).abs().max()))
    return report
