"""Offline lookup of published weights: where torchvision and timm keep them, and ``pretrained=`` resolved.

Nothing here touches the network. ``pretrained=True`` looks where torchvision
(``$TORCH_HOME/hub/checkpoints/<file>``) and timm (the Hugging Face cache,
``$HF_HUB_CACHE/models--timm--<model>.<tag>/snapshots/*/model.safetensors``) would have stored the
files; a missing file fails at once, naming every place searched and the file to put there.
``tools/weights.py list`` prints :func:`catalogue_rows` with the local copies :func:`local_copies` finds.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .catalogue import WEIGHTS, WeightsEntry, entries_for

PathLike = Union[str, os.PathLike]
_BLOB = re.compile(r"[0-9a-f]{64}")


class PretrainedNotFoundError(FileNotFoundError):
    """No pretrained file where the caches would hold it (nothing is downloaded)."""


# ---------------------------------------------------------------------- cache locations
def torch_hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch/hub/checkpoints`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache that timm downloads into, following ``huggingface_hub``'s rules."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hf_snapshot_paths(repo: str, filename: str, cache_dir: Optional[Path] = None) -> List[Path]:
    """``filename`` in every snapshot of the hub repo ``repo`` (``refs/main``'s first) under
    ``cache_dir`` (default :func:`hf_hub_cache_dir`); a ``<revision>`` placeholder when there is none."""
    repo_dir = Path(cache_dir or hf_hub_cache_dir()) / ("models--" + repo.replace("/", "--"))
    paths: List[Path] = []
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        paths.append(repo_dir / "snapshots" / ref.read_text().strip() / filename)
    snapshots = repo_dir / "snapshots"
    if snapshots.is_dir():
        paths += sorted(p / filename for p in snapshots.iterdir() if p / filename not in paths)
    if not paths:
        paths.append(snapshots / "<revision>" / filename)
    return paths


def candidate_paths(entry: WeightsEntry) -> List[Path]:
    """Where ``entry``'s file would be, most likely first (existing or not).

    torchvision weights: ``$TORCH_HOME/hub/checkpoints/<file>``, then timm's Hugging Face copy
    (``timm/<arch>.tv_in1k``). timm weights: the hub snapshots, then the GitHub release file that
    timm < 0.9 downloaded into torch hub's ``checkpoints/``.
    """
    hub = torch_hub_checkpoint_dir()
    if entry.source == "torchvision":
        paths = [hub / entry.filename]
        if entry.hf_repo:
            paths += hf_snapshot_paths(entry.hf_repo, entry.hf_filename)
        return paths
    paths = hf_snapshot_paths(entry.hf_repo, entry.filename)
    if entry.legacy_filename:
        paths.append(hub / entry.legacy_filename)
    return paths


def find_local(entry: WeightsEntry) -> Optional[Path]:
    """The first of :func:`candidate_paths` that exists, or ``None``."""
    return next((p for p in candidate_paths(entry) if p.is_file()), None)


def hf_repo_in_path(path: PathLike) -> Optional[str]:
    """``timm/resnet50.a1_in1k`` for a path inside ``models--timm--resnet50.a1_in1k/`` of a hub cache."""
    for part in reversed(Path(path).parts):
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return None


def hf_blob_digest(path: PathLike) -> Optional[str]:
    """The SHA-256 the Hugging Face cache promises for ``path``: large (LFS) files are stored as
    ``blobs/<sha256>`` and snapshots link to them. ``None`` when ``path`` is not such a blob."""
    real = Path(path).resolve()
    return real.name if real.parent.name == "blobs" and _BLOB.fullmatch(real.name) else None


# ---------------------------------------------------------------------- resolving pretrained=
def resolve(arch: str, pretrained: Union[bool, str, os.PathLike]) -> Tuple[Path, dict]:
    """Turn a ``pretrained`` argument into ``(file, pretrained_cfg)``, never touching the network.

    Args:
        arch: registered depth, e.g. ``"resnet50"`` (plain twins have no ImageNet weights).
        pretrained: ``True`` (first catalogued file found locally), a catalogue tag
            (``"tv_in1k"``, ``"tv2_in1k"``, ``"a1_in1k"``, ``"a1h_in1k"``; torchvision's
            ``"IMAGENET1K_V1"``/``"IMAGENET1K_V2"`` too), a path to a checkpoint file, or a timm hub
            folder / ``hf-hub:USER/REPO`` (:mod:`.hub_folder`; its ``config.json`` gives the data config).

    Raises:
        PretrainedNotFoundError: naming every directory searched and the file name to place there.
    """
    if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool):
        from .hub_folder import is_hub_source, read_hub_folder

        if is_hub_source(pretrained):  # a timm hub folder (config.json + model.safetensors) or hf-hub:USER/REPO
            path, cfg, _ = read_hub_folder(pretrained, hf_snapshot_paths)
            return path, cfg
        text = os.fspath(pretrained)
        tags = {e.tag: e for e in entries_for(arch)}
        tags.update({e.tv_weights: e for e in entries_for(arch) if e.tv_weights})
        if text in tags:
            candidates = [tags[text]]
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                known = f"; or a tag of {arch}: {', '.join(tags)}" if tags else ""
                raise PretrainedNotFoundError(
                    f"pretrained={text!r}: no such checkpoint file{known}"
                )
            return path, {}
    else:
        candidates = entries_for(arch)
    if not candidates:
        raise PretrainedNotFoundError(
            f"no ImageNet weights are catalogued for {arch!r} (plain twins and CIFAR nets have none); "
            "pass pretrained='/path/to/checkpoint.pth' with weights you trained"
        )
    searched = []
    for entry in candidates:
        path = find_local(entry)
        if path is not None:
            return path, entry.pretrained_cfg()
        for p in candidate_paths(entry):
            searched.append(f"  {p}  ({entry.source} {entry.tag})")
    raise PretrainedNotFoundError(
        f"no pretrained weights for {arch!r} found offline (nothing is downloaded). Searched:\n"
        + "\n".join(searched)
        + "\nPlace one of these files there (torchvision files keep their names, e.g. "
        f"{candidates[0].filename}; TORCH_HOME and HF_HOME/HF_HUB_CACHE move the caches), "
        "or pass pretrained='/path/to/file.pth|.safetensors'."
    )


# ---------------------------------------------------------------------- local copies and the table
def local_copies(entry: WeightsEntry, extra_dirs: Sequence[PathLike] = ()) -> List[Path]:
    """Existing files of ``entry``: the torch hub and Hugging Face caches, then each of ``extra_dirs``
    (checked as a plain folder of files, as a ``TORCH_HOME`` and as a Hugging Face hub cache)."""
    found = [p for p in candidate_paths(entry) if p.is_file()]
    names = [n for n in entry.file_names if n != entry.hf_filename]
    hf_file = entry.hf_filename if entry.source == "torchvision" else entry.filename
    for d in map(Path, extra_dirs):
        options = [d / n for n in names] + [d / "hub" / "checkpoints" / n for n in names]
        if entry.hf_repo:
            options += hf_snapshot_paths(entry.hf_repo, hf_file, d) + hf_snapshot_paths(entry.hf_repo, hf_file, d / "hub")
        found += [p for p in options if p.is_file() and p not in found]
    return found


def catalogue_rows(arch: Optional[str] = None, extra_dirs: Sequence[PathLike] = ()) -> List[dict]:
    """Every catalogued weight (of ``arch``), as a JSON-ready dict with ``local``: the copies found."""
    rows = []
    for e in WEIGHTS:
        if arch is None or e.arch == arch:
            rows.append({"name": e.name, "label": e.label, **asdict(e), "hash_prefixes": e.hash_prefixes,
                         "eval_size": e.eval_size, "eval_crop_pct": round(e.eval_crop_pct, 4),
                         "local": [str(p) for p in local_copies(e, extra_dirs)]})
    return rows


def _short(path: str) -> str:
    home = str(Path.home())
    return "~" + path[len(home):] if path.startswith(home + os.sep) else path


def format_table(rows: Iterable[dict]) -> str:
    """Aligned text table of :func:`catalogue_rows` (the published accuracy's resize/crop included)."""
    head = ("weights", "source", "torchvision enum", "file / hub repo", "eval", "crop", "interp",
            "top-1", "top-5", "published by", "local copy")
    table = [head]
    for r in rows:
        local = _short(r["local"][0]) + (f" (+{len(r['local']) - 1})" if len(r["local"]) > 1 else "") if r["local"] else "-"
        table.append((
            r["name"], r["source"], r["tv_weights"] or "-",
            r["filename"] if r["source"] == "torchvision" else r["hf_repo"],
            str(r["eval_size"]), f"{r['eval_crop_pct']:.3f}", r["interpolation"],
            f"{r['top1']:.3f}" if r["top1"] is not None else "-", f"{r['top5']:.3f}" if r["top5"] is not None else "-",
            r["metrics_by"] or "-", local,
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = [
    "PretrainedNotFoundError", "candidate_paths", "catalogue_rows", "find_local", "format_table", "hf_blob_digest",
    "hf_hub_cache_dir", "hf_repo_in_path", "hf_snapshot_paths", "local_copies", "resolve", "torch_hub_checkpoint_dir",
]
