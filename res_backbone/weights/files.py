"""Weight files: reading and writing ``weights_only`` torch files and safetensors, with clear errors.

Every read uses ``torch.load(..., weights_only=True)`` or safetensors, so a checkpoint cannot run
code. The container follows the suffix (:func:`container_of`): ``.safetensors`` is read with
safetensors, anything else (``.pth``, ``.pt``, ``.bin``, ``.ckpt``) as a torch file. Accepted
layouts: a plain state dict (torchvision, timm), ``{"model": sd}``, ``{"state_dict": sd}`` (this
project's checkpoints are ``{"model": sd, ...}``), ``module.`` (DDP) or any other common prefix in
front of ``conv1.weight`` (e.g. ``backbone.`` of a detector, removed by :func:`strip_prefix`).

    import res_backbone as rb
    model = rb.create_model("resnet18", num_classes=10)
    rb.save_safetensors(model, "r18.safetensors", model_name="resnet18", config={"num_classes": 10})
    same = rb.create_model("resnet18", num_classes=10, pretrained="r18.safetensors")  # ResNets: through pretrained=
    meta = rb.load_safetensors(any_module, "r18.safetensors")                       # any module, strict keys

A safetensors file is tensors plus a flat ``str -> str`` header, so reading one cannot run code
(a pickle can: see :func:`describe_load_error`). The header written here records ``format``
(``"pt"``), ``library`` (``"res_backbone"``), ``library_version``, ``model_name``, ``config`` and the
model's ``pretrained_cfg`` when it has one, plus any caller metadata. Values that are not strings are
stored as JSON and their names listed under ``__json__``, so :func:`read_safetensors` gives back the
same dicts, lists and numbers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..io import atomic_target
from ..version import __version__

__all__ = [
    "CHECKPOINT_SUFFIXES", "CheckpointMismatchError", "UnreadableWeightsError", "container_of",
    "describe_load_error", "read_checkpoint", "read_safetensors", "save_safetensors", "strip_prefix",
    "unwrap_state_dict",
]

PathLike = Union[str, os.PathLike]
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_JSON_KEYS = "__json__"


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the model (or the file cannot be read as one)."""


class UnreadableWeightsError(CheckpointMismatchError):
    """A file that cannot be read (weights-only) as a checkpoint, or holds no state dict."""


def container_of(path: PathLike) -> str:
    """``"safetensors"`` for a ``.safetensors`` file, else ``"torch pickle"`` (read weights-only)."""
    return "safetensors" if Path(path).suffix == ".safetensors" else "torch pickle"


# ---------------------------------------------------------------------- torch files
def read_checkpoint(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a checkpoint file safely and return ``(state_dict, metadata)``.

    ``.safetensors`` files are read with safetensors; everything else with
    ``torch.load(weights_only=True)``, so a file carrying pickled code is refused. ``metadata`` holds
    this project's extra fields (``pretrained_cfg``, ``arch``...) when present.
    """
    path = Path(path)
    if container_of(path) == "safetensors":
        return read_safetensors(path)  # JSON metadata of save_safetensors decoded
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, EOFError, RuntimeError (zip), ...
        raise CheckpointMismatchError(f"{path}: cannot be read as a weights-only checkpoint: {describe_load_error(e)}. "
                                      "Re-save the state dict with torch.save(model.state_dict())") from e
    return unwrap_state_dict(obj, path)


def describe_load_error(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line.

    A pickled callable (``__reduce__`` returning ``(os.system, ...)``) fails with torch's long advice
    to retry with ``weights_only=False``, which would run it; this names the refused global instead.
    """
    import pickle
    import re

    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(e, pickle.UnpicklingError) and found:
        return (f"it carries a pickled reference to {found.group(1)}, code that weights-only loading refuses to "
                "import or run (the file is not loaded; do not load it with weights_only=False unless you "
                "trust its source)")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}" + ("; it may be truncated or not a torch file" if not found else "")


def unwrap_state_dict(obj, path: Union[str, os.PathLike] = "<checkpoint>") -> Tuple[Dict[str, torch.Tensor], dict]:
    """Find the state dict inside a checkpoint object (plain, ``model``, ``state_dict`` wrappers)."""
    meta: dict = {}
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                meta = {k: v for k, v in obj.items() if k != key and not isinstance(v, torch.Tensor)}
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        keys = list(obj)[:8] if isinstance(obj, Mapping) else []
        raise CheckpointMismatchError(
            f"{path}: no state dict found (got a {kind}" + (f" with keys {keys}" if keys else "")
            + "); expected a dict of tensors, or one under 'model' or 'state_dict'"
        )
    return dict(obj), meta


def strip_prefix(sd: Dict[str, torch.Tensor], anchor: str) -> Dict[str, torch.Tensor]:
    """Remove the common prefix in front of ``anchor`` (``module.``, ``backbone.body.``...).

    Blocks also hold ``conv1.weight`` (``layer1.0.conv1.weight``), so the shortest prefix wins.
    """
    if anchor in sd:
        return sd
    prefixes = [k[: -len(anchor)] for k in sd if k.endswith("." + anchor)]
    if not prefixes:
        return sd
    prefix = min(prefixes, key=len)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------- safetensors
def _tensors(model_or_sd: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor; "
                            "safetensors holds tensors only")
        # a fresh contiguous CPU copy: safetensors refuses tensors that share storage (views, tied weights)
        out[k] = v.detach().to("cpu", copy=True).contiguous()
    return out


def save_safetensors(
    model: Union[nn.Module, Mapping[str, torch.Tensor]],
    path: PathLike,
    *,
    model_name: Optional[str] = None,
    config: Optional[Mapping[str, Any]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a model's state dict (or a state dict) as ``.safetensors``, atomically.

    Args:
        model: an ``nn.Module`` or a ``{name: tensor}`` mapping.
        path: the file to write (its folder is created); a temporary file is renamed over it, so a
            crash never leaves a half-written file under this name.
        model_name: what the weights are (``"resnet18"``, ``"faster_rcnn_fpn"``...); default the
            module's class name.
        config: the keyword arguments that rebuild the model (e.g. ``build_detector(**config)``).
        metadata: more entries (``classes``, ``model_kwargs``...); JSON-serialisable values.

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    header: Dict[str, Any] = {"format": "pt", "library": "res_backbone", "library_version": __version__,
                              "model_name": model_name or type(model).__name__}
    if config is not None:
        header["config"] = dict(config)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping):
        header["pretrained_cfg"] = dict(cfg)
    header.update(metadata or {})
    encoded, json_keys = {}, []
    for k, v in header.items():
        if isinstance(v, str):
            encoded[str(k)] = v
        else:
            encoded[str(k)] = json.dumps(v)
            json_keys.append(str(k))
    encoded[_JSON_KEYS] = ",".join(json_keys)
    tensors = _tensors(model)
    with atomic_target(path, fsync_dir=False) as tmp:
        save_file(tensors, tmp, metadata=encoded)
    return Path(path)


def read_safetensors(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a ``.safetensors`` file: ``(state_dict, metadata)`` with this module's JSON values decoded.

    Files written elsewhere (timm's, Hugging Face's) work too; their metadata stays strings.

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatchError: not a readable safetensors file (names the path and the cause).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            raw = dict(f.metadata() or {})
    except Exception as e:  # SafetensorError (bad header, truncated), OSError
        raise CheckpointMismatchError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    json_keys = [k for k in raw.pop(_JSON_KEYS, "").split(",") if k]
    meta: Dict[str, Any] = dict(raw)
    for k in json_keys:
        if k in meta:
            try:
                meta[k] = json.loads(meta[k])
            except json.JSONDecodeError as e:
                raise CheckpointMismatchError(
                    f"{path}: metadata {k!r} is not the JSON its header promises ({e})") from e
    return sd, meta
