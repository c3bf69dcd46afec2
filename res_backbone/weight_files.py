"""Weight files on disk: SHA-256, identification against the catalogue, structure, local copies.

``tools/weights.py list`` and ``verify`` are thin wrappers around :func:`catalogue_rows` and
:func:`verify_file`. A file is identified three ways:

* by **name**: a published file name (``resnet50-11ad3fa6.pth``, timm's ``resnet50_a1_0-14fe96d1.pth``)
  or a Hugging Face cache path (``models--timm--resnet50.a1_in1k/snapshots/<rev>/model.safetensors``);
* by **content**: the file's SHA-256 against the hash prefixes of the published names (torch hub's
  ``check_hash`` convention: ``<name>-<first 8+ hex digits of the SHA-256>.<ext>``), and the full
  digest where recorded; a Hugging Face blob is named by its own SHA-256, which is checked too;
* by **structure**: the state dict is read (weights-only) and compared, key by key and shape by
  shape, with every registered architecture.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .pretrained import (
    CheckpointMismatchError,
    _strip_prefix,
    candidate_paths,
    hf_snapshot_paths,
    read_checkpoint,
)
from .weights import (
    WEIGHTS,
    WeightsEntry,
    entries_by_digest,
    entries_by_filename,
    entries_by_hf_repo,
    hash_prefix_of,
)

PathLike = Union[str, os.PathLike]
EXIT_OK, EXIT_MISMATCH, EXIT_UNREADABLE = 0, 1, 2
_BLOB = re.compile(r"[0-9a-f]{64}")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm state, not parameters


class UnreadableWeightsError(CheckpointMismatchError):
    """A file that cannot be read (weights-only) as a checkpoint, or holds no state dict."""


# ---------------------------------------------------------------------- hashing and names
def sha256_file(path: PathLike, progress: Optional[Callable[[int], None]] = None, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file, read in ``chunk``-byte pieces (``progress(n)`` after each)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest()


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


def entries_named(path: PathLike) -> List[WeightsEntry]:
    """Catalogue entries that ``path``'s name (or Hugging Face cache location) says it holds."""
    path = Path(path)
    found = entries_by_filename(path.name)
    repo = hf_repo_in_path(path)
    if repo:
        found += [e for e in entries_by_hf_repo(repo) if e not in found and path.name == e.hf_filename]
    return found


def identify(path: PathLike, digest: str) -> Tuple[Optional[WeightsEntry], str]:
    """The catalogue entry ``path`` holds, and how that is known (``"content"`` or ``"name"``).

    The content hash wins; a name is trusted only if it carries no hash prefix that the content
    contradicts. Returns ``(None, "")`` for unknown files.
    """
    by_content = entries_by_digest(digest)
    if by_content:
        return by_content[0], "content"
    claimed = hash_prefix_of(Path(path).name)
    named = entries_named(path)
    if named and (claimed is None or digest.startswith(claimed)):
        return named[0], "name"
    return None, ""


# ---------------------------------------------------------------------- structure
def _shapes(sd: Mapping[str, torch.Tensor], drop_fc: bool) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()
            if not k.endswith("num_batches_tracked") and not (drop_fc and k.startswith("fc."))}


def _stage_depths(sd: Mapping[str, torch.Tensor]) -> Tuple[int, ...]:
    depths = []
    for i in range(1, 8):
        blocks = {k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}
        if not blocks:
            break
        depths.append(len(blocks))
    return tuple(depths)


def arch_mismatch(sd: Mapping[str, torch.Tensor], arch: str) -> List[str]:
    """How ``sd`` differs from ``arch``'s state dict: ``[]`` when every key and shape fits.

    The classifier size and the input channels are taken from ``sd``; ``fc.*`` may be absent
    (a backbone); BatchNorm's ``num_batches_tracked`` counters are ignored.
    """
    from .registry import create_model

    num_classes = int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else 1000
    in_chans = int(sd["conv1.weight"].shape[1]) if "conv1.weight" in sd else 3
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised for real
        own = _shapes(create_model(arch, num_classes=num_classes, in_chans=in_chans).state_dict(), "fc.weight" not in sd)
    theirs = _shapes(sd, False)
    problems = [f"{k}: file {theirs[k]} vs {arch} {own[k]}" for k in own if k in theirs and own[k] != theirs[k]]
    problems += [f"missing {k}" for k in own if k not in theirs]
    return problems + [f"unexpected {k}" for k in theirs if k not in own]


def fitting_archs(sd: Mapping[str, torch.Tensor]) -> List[str]:
    """Registered architectures whose state dict has exactly ``sd``'s keys and shapes.

    Plain and residual CIFAR nets with option-A shortcuts hold the same parameters, so both are
    returned (``["resnet20", "plain20"]``); ImageNet depths are told apart by stage depths, block
    type and projection shortcuts.
    """
    from .registry import get_arch, list_models

    sd = _strip_prefix(dict(sd), "conv1.weight")
    if "conv1.weight" not in sd:
        return []
    depths = _stage_depths(sd)
    return [n for n in list_models() if tuple(get_arch(n)["layers"]) == depths and not arch_mismatch(sd, n)]


@dataclass
class CheckpointInfo:
    """What a checkpoint file holds (see :func:`describe_checkpoint`)."""

    container: str  # "safetensors" or "torch pickle"
    layout: str  # "res_backbone checkpoint", "state dict", or the "layout" a converted file records
    prefix: str  # removed in front of the parameter names ("module.", "backbone.body.")
    ignored: int  # tensors outside that prefix (a detector's heads), not counted below
    archs: List[str]
    num_tensors: int
    num_params: int
    num_classes: Optional[int]
    in_chans: Optional[int]
    dtypes: List[str]
    meta: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: ``resnet18-shaped state dict (torchvision/timm parameter names), 102 tensors, ...``."""
        shape = " or ".join(self.archs) + "-shaped" if self.archs else "not a registered ResNet:"
        names = " (torchvision/timm parameter names)" if self.archs and self.layout == "state dict" else ""
        parts = [f"{shape} {self.layout}{names}", f"{self.num_tensors} tensors",
                 f"{self.num_params / 1e6:.2f}M parameters"]
        if self.num_classes is not None:
            parts.append(f"classifier {self.num_classes} classes")
        if self.in_chans is not None:
            parts.append(f"{self.in_chans} input channels")
        parts.append("/".join(self.dtypes))
        if self.prefix:
            parts.append(f"prefix {self.prefix!r} in front of the names"
                         + (f" ({self.ignored} other tensors ignored)" if self.ignored else ""))
        return ", ".join(parts) + f" [{self.container}]"


def _layout(meta: Mapping[str, object]) -> str:
    if isinstance(meta.get("layout"), str):
        return f"{meta['layout']} file" if meta["layout"] != "res_backbone" else "res_backbone checkpoint"
    if "model_name" in meta or "arch" in meta or "pretrained_cfg" in meta:
        return "res_backbone checkpoint"
    return "state dict"


def describe_checkpoint(path: PathLike) -> Tuple[CheckpointInfo, Dict[str, torch.Tensor], dict]:
    """Read ``path`` (weights-only) and say what it is: layout, fitting archs, sizes.

    Returns:
        ``(info, state_dict with any prefix removed, metadata)``.

    Raises:
        UnreadableWeightsError: the file cannot be read safely or holds no state dict.
    """
    path = Path(path)
    try:
        raw, meta = read_checkpoint(path)
    except UnreadableWeightsError:
        raise
    except Exception as e:  # CheckpointMismatchError from torch.load, safetensors' own errors
        raise UnreadableWeightsError(str(e) if isinstance(e, CheckpointMismatchError) else f"{path}: {e}") from e
    sd = _strip_prefix(raw, "conv1.weight")
    anchors = [k[: -len("conv1.weight")] for k in raw if k.endswith(".conv1.weight")]
    prefix = min(anchors, key=len) if sd is not raw and anchors else ""
    info = CheckpointInfo(
        container="safetensors" if path.suffix == ".safetensors" else "torch pickle",
        layout=_layout(meta),
        prefix=prefix,
        ignored=len(raw) - len(sd),
        archs=fitting_archs(sd),
        num_tensors=len(sd),
        num_params=sum(v.numel() for k, v in sd.items() if not k.endswith(_BUFFERS)),
        num_classes=int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else None,
        in_chans=int(sd["conv1.weight"].shape[1]) if "conv1.weight" in sd else None,
        dtypes=sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.is_floating_point()}),
        meta={k: str(v)[:200] for k, v in meta.items() if isinstance(v, (str, int, float))},
    )
    return info, sd, meta


# ---------------------------------------------------------------------- verify
@dataclass
class VerifyReport:
    """The outcome of :func:`verify_file`; ``exit_code`` 0 ok, 1 hash mismatch, 2 unreadable."""

    path: str
    size: int = 0
    sha256: Optional[str] = None
    name_prefix: Optional[str] = None  # the hash prefix the file name carries
    blob_sha256: Optional[str] = None  # the digest a Hugging Face blob name promises
    status: str = "unchecked"  # of the hash: "match", "mismatch", "unchecked" (nothing to compare with)
    by_name: List[str] = field(default_factory=list)
    by_content: List[str] = field(default_factory=list)
    contents: Optional[str] = None
    info: Optional[dict] = None
    error: Optional[str] = None  # why the file is unreadable (missing, not a weights-only checkpoint)
    exit_code: int = EXIT_OK

    def lines(self) -> List[str]:
        """The human report, one finding per line."""
        out = [f"{self.path}" + (f"  ({self.size / 2**20:.1f} MiB)" if self.size else "")]
        if self.sha256:
            out.append(f"  sha256    {self.sha256}")
        claim = self.name_prefix or self.blob_sha256
        what = "file name says hash prefix" if self.name_prefix else "Hugging Face blob name says sha256"
        if self.status == "match":
            out.append(f"  MATCH     {what} {claim}, and the contents hash to it")
        elif self.status == "mismatch":
            out.append(f"  MISMATCH  {what} {claim}, contents hash to {self.sha256[:len(claim)]}...: "
                       "the file is not what its name says (corrupt, truncated, or other weights renamed)")
        elif self.sha256:
            out.append("  no hash   the file name carries no hash prefix to compare with")
        out.append("  by name   " + ("; ".join(self.by_name) or "no catalogued weights have this file name"))
        if self.sha256:
            out.append("  by hash   " + ("; ".join(self.by_content) or "no catalogued file has this hash"))
        if self.contents:
            out.append(f"  contents  {self.contents}")
        if self.error:
            out.append(f"  UNREADABLE {self.error}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _describe_entry(e: WeightsEntry) -> str:
    return f"{e.label} ({e.name}; top-1 {e.top1} by {e.metrics_by})" if e.top1 is not None else e.label


def verify_file(path: PathLike, *, load: bool = True, progress: Optional[Callable[[int], None]] = None) -> VerifyReport:
    """Hash ``path``, compare with the prefix its name carries, and say which weights it is.

    Args:
        path: any checkpoint file.
        load: also read it (weights-only) and report its structure.
        progress: called with the number of bytes hashed after each chunk.

    Returns:
        A :class:`VerifyReport`; ``exit_code`` is 2 for an unreadable file, 1 for a hash mismatch, else 0.
    """
    p = Path(path)
    rep = VerifyReport(path=str(path), by_name=[_describe_entry(e) for e in entries_named(p)])
    if not p.is_file():
        rep.error, rep.exit_code = "no such file", EXIT_UNREADABLE
        return rep
    rep.size = p.stat().st_size
    rep.sha256 = sha256_file(p, progress)
    rep.name_prefix = hash_prefix_of(p.name)
    rep.blob_sha256 = None if rep.name_prefix else hf_blob_digest(p)
    claim = rep.name_prefix or rep.blob_sha256
    if claim:
        rep.status = "match" if rep.sha256.startswith(claim) else "mismatch"
    rep.by_content = [_describe_entry(e) for e in entries_by_digest(rep.sha256)]
    if rep.status == "mismatch":
        rep.exit_code = EXIT_MISMATCH
    if load:
        try:
            info, _, _ = describe_checkpoint(p)
        except CheckpointMismatchError as e:
            rep.error, rep.exit_code = str(e), EXIT_UNREADABLE
        else:
            rep.info, rep.contents = asdict(info), info.summary()
    return rep


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
    "EXIT_MISMATCH", "EXIT_OK", "EXIT_UNREADABLE", "CheckpointInfo", "UnreadableWeightsError", "VerifyReport", "arch_mismatch",
    "catalogue_rows", "describe_checkpoint", "entries_named", "fitting_archs", "format_table",
    "hf_blob_digest", "hf_repo_in_path", "identify", "local_copies", "sha256_file", "verify_file",
]
