"""Fake pretrained caches for tests: random weights in the real formats, under the real file names.

``pretrained=True`` never downloads (see :mod:`res_backbone.weights.cache`); it reads the files that
torchvision and timm would have left in their caches. To exercise that path for real without the
network or gigabytes of ImageNet weights, these helpers write *randomly initialised* checkpoints
exactly where, and exactly as, the two libraries store theirs:

* torchvision: ``torch.save(state_dict)`` at ``<torch_home>/hub/checkpoints/<file>``, the file name
  of the catalogue entry (``resnet50-11ad3fa6.pth``); point ``TORCH_HOME`` at ``torch_home``.
* timm: the Hugging Face hub cache layout, ``<hf_hub_cache>/models--timm--<arch>.<tag>/`` holding
  ``blobs/<sha256>`` (a safetensors file), ``snapshots/<revision>/model.safetensors`` (a link to the
  blob, a copy where links are not allowed) and ``refs/main`` (the revision); point
  ``HF_HUB_CACHE`` at ``hf_hub_cache`` (``huggingface_hub`` itself finds these files offline).

The state dicts come from the source library's own model (``torchvision.models.resnet50()``,
``timm.create_model("resnet50")``), so their keys, shapes and buffers are what a real file holds.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

import torch

from ..io import atomic_torch_save, atomic_write_bytes
from ..version import __version__
from .catalogue import CATALOGUE, WeightsEntry

PathLike = Union[str, os.PathLike]
FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex commit id will do


def _entries(source: str, archs: Optional[Iterable[str]]) -> list:
    wanted = None if archs is None else set(archs)
    entries = [e for e in CATALOGUE if e.source == source and (wanted is None or e.arch in wanted)]
    if wanted is not None:
        known = {e.arch for e in CATALOGUE if e.source == source}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(f"no {source} weights are catalogued for {unknown}; catalogued: {sorted(known)}")
    return entries


def random_state_dict(entry: WeightsEntry, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A random-weight state dict as ``entry``'s source library would save it.

    Args:
        entry: a catalogue entry (``source`` ``"torchvision"`` or ``"timm"``).
        seed: seeds the initialisation (the global RNG state is restored afterwards).

    Returns:
        ``{name: tensor}`` from ``torchvision.models.<arch>()`` or ``timm.create_model(<arch>)``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if entry.source == "torchvision":
            import torchvision

            model = getattr(torchvision.models, entry.arch)(weights=None)
        elif entry.source == "timm":
            import timm

            model = timm.create_model(entry.arch, pretrained=False)
        else:
            raise ValueError(f"unknown source {entry.source!r}")
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def write_fake_torchvision_cache(
    torch_home: PathLike, archs: Optional[Iterable[str]] = None, *, seed: int = 0, overwrite: bool = False
) -> Dict[str, Path]:
    """Write random torchvision checkpoints under ``<torch_home>/hub/checkpoints/``.

    Every catalogued torchvision file of each arch is written (``resnet50`` gets both
    ``resnet50-0676ba61.pth`` and ``resnet50-11ad3fa6.pth``; the second shares the first one's
    content, hard-linked where possible, to save time and disk).

    Args:
        torch_home: the folder to use as ``TORCH_HOME``.
        archs: e.g. ``["resnet18"]``; ``None`` for every catalogued arch.
        seed: initialisation seed (same seed, same tensors).
        overwrite: rewrite files that already exist (otherwise they are kept).

    Returns:
        ``{"resnet50.tv2_in1k": path, ...}``.
    """
    out_dir = Path(torch_home) / "hub" / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    first_of_arch: Dict[str, Path] = {}
    for entry in _entries("torchvision", archs):
        path = out_dir / entry.filename
        if overwrite or not path.is_file():
            path.unlink(missing_ok=True)
            src = first_of_arch.get(entry.arch)
            if src is not None:
                _link_or_copy(src, path)
            else:
                atomic_torch_save(random_state_dict(entry, seed), path, fsync_dir=False)
        first_of_arch.setdefault(entry.arch, path)
        written[f"{entry.arch}.{entry.tag}"] = path
    return written


def write_fake_timm_cache(
    hf_hub_cache: PathLike,
    archs: Optional[Iterable[str]] = None,
    *,
    seed: int = 0,
    revision: str = FAKE_REVISION,
    overwrite: bool = False,
) -> Dict[str, Path]:
    """Write random timm checkpoints into a Hugging Face hub cache at ``hf_hub_cache``.

    For ``timm/resnet50.a1_in1k`` this makes::

        models--timm--resnet50.a1_in1k/blobs/<sha256 of the file>
        models--timm--resnet50.a1_in1k/snapshots/<revision>/model.safetensors -> ../../blobs/<sha256>
        models--timm--resnet50.a1_in1k/refs/main                               (holds <revision>)

    Args:
        hf_hub_cache: the folder to use as ``HF_HUB_CACHE``.
        archs: e.g. ``["resnet18"]``; ``None`` for every catalogued arch.
        seed: initialisation seed.
        revision: the snapshot's (fake) commit id written to ``refs/main``.
        overwrite: rewrite snapshots that already exist.

    Returns:
        ``{"resnet50.a1_in1k": path of snapshots/<revision>/model.safetensors, ...}``.
    """
    from safetensors.torch import save

    written: Dict[str, Path] = {}
    for entry in _entries("timm", archs):
        repo_dir = Path(hf_hub_cache) / ("models--" + entry.hf_repo.replace("/", "--"))
        snap = repo_dir / "snapshots" / revision / entry.filename
        if overwrite or not snap.is_file():
            data = save(random_state_dict(entry, seed), metadata={"format": "pt"})
            blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()  # the hub names blobs by content
            atomic_write_bytes(data, blob)
            snap.parent.mkdir(parents=True, exist_ok=True)
            snap.unlink(missing_ok=True)
            try:  # the hub links snapshot files to content-addressed blobs
                snap.symlink_to(os.path.relpath(blob, snap.parent))
            except OSError:  # e.g. Windows without developer mode: the hub copies too
                _link_or_copy(blob, snap)
        ref = repo_dir / "refs" / "main"
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(revision)
        written[f"{entry.arch}.{entry.tag}"] = snap
    return written


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def write_tiny_cls_checkpoint(
    path: PathLike,
    *,
    model_name: str = "resnet20",
    num_classes: int = 10,
    in_chans: int = 1,
    input_size: int = 28,
    mean: Iterable[float] = (0.2860,),
    std: Iterable[float] = (0.3530,),
    classes: Optional[Iterable[str]] = None,
    seed: int = 0,
) -> Path:
    """Write an untrained classification checkpoint in the project's layout (for tests).

    ``{"model", "model_name", "model_kwargs", "pretrained_cfg", "classes", "task", "iter", "epoch",
    "config", "metrics", "library_version"}``, as ``tools/train_cls.py`` saves it; BatchNorm running
    statistics are randomised so a loader that skipped buffers would be caught.
    """
    from ..registry import create_model

    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=num_classes, in_chans=in_chans)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    names = list(classes) if classes is not None else [f"class{i}" for i in range(num_classes)]
    cfg = {"mean": list(mean), "std": list(std), "input_size": [in_chans, input_size, input_size], "crop_pct": 1.0,
           "interpolation": "bilinear", "num_classes": num_classes, "tag": None, "source": "res_backbone"}
    ckpt = {"model": model.state_dict(), "model_name": model_name,
            "model_kwargs": {"num_classes": num_classes, "in_chans": in_chans}, "pretrained_cfg": cfg,
            "classes": names, "task": "classification", "iter": 0, "epoch": 0, "config": {"seed": seed},
            "metrics": {}, "library_version": __version__}
    return atomic_torch_save(ckpt, path, fsync_dir=False)
