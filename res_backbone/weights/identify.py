"""Which weights a file holds: SHA-256, identification against the catalogue, structure, verification.

``tools/weights.py verify`` is a thin wrapper around :func:`verify_file`. A file is identified three ways:

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .cache import hf_blob_digest, hf_repo_in_path
from .catalogue import WeightsEntry, entries_by_digest, entries_by_filename, entries_by_hf_repo, hash_prefix_of
from .files import CheckpointMismatchError, UnreadableWeightsError, container_of, read_checkpoint, strip_prefix

PathLike = Union[str, os.PathLike]
EXIT_OK, EXIT_MISMATCH, EXIT_UNREADABLE = 0, 1, 2
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm state, not parameters


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
    from ..registry import create_model

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
    from ..registry import get_arch, list_models

    sd = strip_prefix(dict(sd), "conv1.weight")
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
    sd = strip_prefix(raw, "conv1.weight")
    anchors = [k[: -len("conv1.weight")] for k in raw if k.endswith(".conv1.weight")]
    prefix = min(anchors, key=len) if sd is not raw and anchors else ""
    info = CheckpointInfo(
        container=container_of(path),
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


__all__ = [
    "EXIT_MISMATCH", "EXIT_OK", "EXIT_UNREADABLE", "CheckpointInfo", "VerifyReport", "arch_mismatch",
    "describe_checkpoint", "entries_named", "fitting_archs", "identify", "sha256_file", "verify_file",
]
