"""Convert ResNet weights between torchvision, timm and this project's checkpoint layout.

The three libraries use the same parameter names (``conv1``, ``bn1``, ``layer1``..``layer4``,
``downsample.0/1``, ``fc``; see ``tests/res_backbone/weights/test_weights.py``), so converting never renames
a tensor. What differs is the wrapping and the container:

=============  ===========================================================================
``torchvision``  a plain state dict (``torch.save(model.state_dict())``), what
                 ``torchvision.models.resnet50().load_state_dict`` reads
``timm``         a plain state dict, usually ``model.safetensors`` as on the Hugging Face hub,
                 what ``timm.models.load_checkpoint`` reads
``res_backbone`` ``{"model": state_dict, "arch", "model_name", "model_kwargs", "pretrained_cfg",
                 "library_version", "converted_from"}`` (``tools/train_cls.py``'s layout, without
                 optimiser state), what ``create_model(arch, pretrained=path)`` reads, data config
                 included
=============  ===========================================================================

The container follows the output's suffix: ``.pth``/``.pt``/``.bin`` via ``torch.save``,
``.safetensors`` via safetensors with string metadata ``{"format": "pt", "layout", "arch", "source",
...}`` (``"format": "pt"`` is the Hugging Face convention). Every conversion is checked by loading the
written file into the target library's model with strict key matching and comparing each tensor
with the source.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch

from ..io import atomic_target
from ..version import __version__
from .catalogue import DEFAULT_CFG, hash_prefix_of
from .files import CheckpointMismatchError, read_checkpoint
from .identify import arch_mismatch, describe_checkpoint, entries_named, fitting_archs, identify, sha256_file

PathLike = Union[str, os.PathLike]
FORMATS = ("torchvision", "timm", "res_backbone")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


@dataclass
class ConvertResult:
    """What :func:`convert_weights` wrote and how it was checked."""

    src: str
    dst: str
    to: str
    arch: str
    num_tensors: int
    weights: Optional[str]  # the catalogue entry the source was identified as
    pretrained_cfg: dict
    checks: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        """What was written, its data config, the checks and notes, as ``tools/weights.py convert`` prints them."""
        cfg, known = self.pretrained_cfg, f" ({self.weights})" if self.weights else ""
        test = f", test {cfg['test_input_size']} crop {cfg.get('test_crop_pct')}" if cfg.get("test_input_size") else ""
        return ([f"wrote {self.dst}: {self.to} layout, {self.arch}{known}, {self.num_tensors} tensors",
                 f"  data config: input {cfg.get('input_size')}, crop {cfg.get('crop_pct')}{test}, "
                 f"{cfg.get('interpolation')}, mean {cfg.get('mean')}, std {cfg.get('std')}"]
                + [f"  checked: {line}" for line in self.checks] + [f"  note: {line}" for line in self.notes])


def default_format(dst: PathLike) -> str:
    """``timm`` for a ``.safetensors`` output (the hub's container), ``torchvision`` otherwise."""
    return "timm" if Path(dst).suffix == ".safetensors" else "torchvision"


def _decode(meta: Mapping[str, object], key: str):
    value = meta.get(key)
    if isinstance(value, str) and value[:1] in "{[":
        return json.loads(value)  # safetensors metadata holds strings
    return value


def _choose_arch(src: Path, sd: Mapping[str, torch.Tensor], meta: Mapping, entry, arch: Optional[str]) -> str:
    if arch:
        problems = arch_mismatch(sd, arch)
        if problems:
            shown = "; ".join(problems[:6]) + (f"; ... (+{len(problems) - 6} more)" if len(problems) > 6 else "")
            raise CheckpointMismatchError(f"{src} does not fit --arch {arch}: {shown}")
        return arch
    fits = fitting_archs(sd)
    for hint in (meta.get("arch"), meta.get("model_name"), entry.arch if entry else None):
        if isinstance(hint, str) and hint in fits:
            return hint
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise CheckpointMismatchError(f"{src}: the tensors fit {', '.join(fits)} alike; pass --arch")
    keys = ", ".join(list(sd)[:5])
    raise CheckpointMismatchError(
        f"{src}: its {len(sd)} tensors fit no registered architecture (first keys: {keys}); "
        "pass --arch to see which keys or shapes differ"
    )


def _target_model(to: str, arch: str, num_classes: int, in_chans: int):
    """An untrained model of the target library, or a clear error when it has no such model."""
    if to == "torchvision":
        import torchvision

        if not hasattr(torchvision.models, arch):
            raise ValueError(f"torchvision has no {arch!r}; convert with --to res_backbone")
        if in_chans != 3:
            raise ValueError(f"torchvision's {arch} takes 3 input channels, the weights have {in_chans}; "
                             "convert with --to timm or --to res_backbone")
        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if to == "timm":
        import timm

        if not timm.is_model(arch):
            raise ValueError(f"timm has no {arch!r}; convert with --to res_backbone")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    raise ValueError(f"unknown format {to!r}; one of {', '.join(FORMATS)}")


def _pretrained_cfg(arch: str, entry, meta: Mapping, num_classes: int, in_chans: int) -> dict:
    """The data config to record: the catalogue's for known weights, the source's own, else defaults."""
    from ..registry import get_arch

    if entry is not None:
        cfg = entry.pretrained_cfg()
    elif isinstance(_decode(meta, "pretrained_cfg"), Mapping):
        cfg = dict(_decode(meta, "pretrained_cfg"))
    else:
        cfg = {**DEFAULT_CFG, **get_arch(arch).get("default_cfg", {}), "source": "unknown"}
        side = cfg["input_size"][-1]
        cfg["input_size"] = (in_chans, side, side)
    cfg["num_classes"] = num_classes
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _write(dst: Path, tensors: Dict[str, torch.Tensor], payload: Optional[dict], meta: Dict[str, str]) -> None:
    """Write ``dst`` atomically (never half a file): safetensors or a torch file, by its suffix."""
    with atomic_target(dst, fsync_dir=False) as tmp:
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=meta)
        else:
            torch.save(payload if payload is not None else tensors, tmp)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.to(b.dtype) if a.dtype != b.dtype else a, b)


def _compare(model_sd: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], dst: Path, how: str) -> int:
    missing = [k for k in model_sd if k not in ref and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in ref if k not in model_sd]
    differ = [k for k in ref if k in model_sd and not _same(model_sd[k], ref[k])]
    if missing or unexpected or differ:
        raise CheckpointMismatchError(
            f"{dst}: check failed after {how}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"different values {differ[:5]}"
        )
    return len(ref)


def check_converted(dst: PathLike, to: str, arch: str, reference: Mapping[str, torch.Tensor],
                    num_classes: int, in_chans: int, pretrained_cfg: Optional[dict] = None) -> str:
    """Load ``dst`` into the ``to`` library's ``arch`` strictly and compare it with ``reference``.

    Returns:
        A sentence saying what was loaded how, and how many tensors are equal.

    Raises:
        CheckpointMismatchError: naming the file and the first keys that are missing, unexpected or
            different (``RuntimeError`` from a strict ``load_state_dict`` passes through).
    """
    dst = Path(dst)
    if to == "res_backbone":
        from ..registry import create_model

        model = create_model(arch, num_classes=num_classes, in_chans=in_chans, pretrained=dst)
        how = f"res_backbone.create_model({arch!r}, num_classes={num_classes}, pretrained=...)"
        if pretrained_cfg:
            got = {k: list(v) if isinstance(v, tuple) else v for k, v in model.pretrained_cfg.items()}
            wrong = [k for k in ("mean", "std", "input_size", "interpolation", "crop_pct") if got.get(k) != pretrained_cfg.get(k)]
            if wrong:
                raise CheckpointMismatchError(f"{dst}: pretrained_cfg read back differs in {wrong}")
    else:
        model = _target_model(to, arch, num_classes, in_chans)
        if to == "timm":
            from timm.models import load_checkpoint

            load_checkpoint(model, str(dst), strict=True, weights_only=True)
            how = f"timm.models.load_checkpoint(timm.create_model({arch!r}), strict=True)"
        else:
            sd, _ = read_checkpoint(dst)
            model.load_state_dict(sd, strict=True)
            how = f"torchvision.models.{arch}(num_classes={num_classes}).load_state_dict(strict=True)"
    n = _compare(model.state_dict(), reference, dst, how)
    return f"loaded {dst.name} with {how}: {n} tensors equal to the source's"


def convert_weights(src: PathLike, dst: PathLike, *, to: Optional[str] = None, arch: Optional[str] = None,
                    overwrite: bool = False) -> ConvertResult:
    """Convert ``src`` into ``dst`` in the ``to`` layout, then check it by loading it back.

    Args:
        src: a ``.pth``/``.pt``/``.bin``/``.safetensors`` file: a torchvision or timm state dict, a
            ``{"model": ...}``/``{"state_dict": ...}`` wrapper (``module.`` prefixes are removed) or a
            res_backbone checkpoint.
        dst: output file; its suffix picks the container (``.safetensors`` or a torch pickle).
        to: ``"torchvision"``, ``"timm"`` or ``"res_backbone"``; default :func:`default_format`.
        arch: e.g. ``"resnet50"``; default from the file's metadata, its catalogue entry, or the one
            registered architecture its keys and shapes fit.
        overwrite: replace an existing ``dst``.

    Raises:
        FileNotFoundError, FileExistsError, ValueError: bad paths or options, naming them.
        CheckpointMismatchError: unreadable input, shapes that fit no architecture (or not ``arch``),
            a failed check; each names the file and the keys involved.
    """
    src, dst = Path(src), Path(dst)
    to = to or default_format(dst)
    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: one of {', '.join(FORMATS)}")
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    if dst.suffix not in TORCH_SUFFIXES + (".safetensors",):
        raise ValueError(f"{dst}: unknown output suffix {dst.suffix!r}; use .safetensors or one of {', '.join(TORCH_SUFFIXES)}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the output would overwrite the input")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")

    info, sd, meta = describe_checkpoint(src)
    if "conv1.weight" not in sd:
        raise CheckpointMismatchError(f"{src}: no 'conv1.weight' under any prefix; not a ResNet state dict ({info.summary()})")
    digest = sha256_file(src)
    entry, _ = identify(src, digest)
    notes = []
    named = entries_named(src)
    if named and entry is None:
        notes.append(f"{src.name}'s name says {named[0].name}, but its contents hash to {digest[:8]}..., not "
                     f"{hash_prefix_of(src.name)}: the catalogue's data config was not used")
    arch = _choose_arch(src, sd, meta, entry, arch)
    if "fc.weight" not in sd:
        raise CheckpointMismatchError(f"{src}: no classifier ('fc.weight', 'fc.bias'); a whole {arch} is needed to convert")
    num_classes, in_chans = int(sd["fc.weight"].shape[0]), int(sd["conv1.weight"].shape[1])
    if to != "res_backbone":
        _target_model(to, arch, num_classes, in_chans)  # fail before writing anything
    cfg = _pretrained_cfg(arch, entry, meta, num_classes, in_chans)
    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    origin = {"file": src.name, "sha256": digest, "weights": entry.name if entry else None}
    meta_out = {"format": "pt", "layout": to, "arch": arch, "source": src.name, "source_sha256": digest}
    payload = None
    if to == "res_backbone":
        kwargs = {"num_classes": num_classes, "in_chans": in_chans}
        payload = {"model": tensors, "arch": arch, "model_name": arch, "model_kwargs": kwargs,
                   "pretrained_cfg": cfg, "library_version": __version__, "converted_from": origin}
        meta_out.update(model_name=arch, model_kwargs=json.dumps(kwargs), pretrained_cfg=json.dumps(cfg),
                        library_version=__version__)
    _write(dst, tensors, payload, meta_out)
    check = check_converted(dst, to, arch, tensors, num_classes, in_chans, cfg if to == "res_backbone" else None)
    return ConvertResult(str(src), str(dst), to, arch, len(tensors), entry.name if entry else None, cfg, [check], notes)


__all__ = ["FORMATS", "ConvertResult", "check_converted", "convert_weights", "default_format"]
