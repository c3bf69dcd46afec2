"""Model weights as safetensors, and state-dict loading that names what does not fit.

    import res_backbone as rb
    model = rb.create_model("resnet18", num_classes=10)
    rb.save_safetensors(model, "r18.safetensors", model_name="resnet18", config={"num_classes": 10})
    same = rb.create_model("resnet18", num_classes=10, pretrained="r18.safetensors")  # ResNets: through pretrained=
    meta = rb.load_safetensors(any_module, "r18.safetensors")                       # any module, strict keys

A safetensors file is tensors plus a flat ``str -> str`` header, so reading one cannot run code
(a pickle can: see :func:`~res_backbone.pretrained.describe_load_error`). The header written here
records ``format`` (``"pt"``), ``library`` (``"res_backbone"``), ``library_version``,
``model_name``, ``config`` and the model's ``pretrained_cfg`` when it has one, plus any caller
metadata. Values that are not strings are stored as JSON and their names listed under
``__json__``, so :func:`read_safetensors` gives back the same dicts, lists and numbers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .pretrained import CheckpointMismatchError, mismatch_report

__all__ = ["load_safetensors", "load_state_dict_checked", "read_safetensors", "save_safetensors"]

PathLike = Union[str, os.PathLike]
_JSON_KEYS = "__json__"


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

    from . import __version__

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
    from .engine.checkpoint import atomic_target

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


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                            source: str = "<checkpoint>", strict: bool = True) -> None:
    """``model.load_state_dict`` that names every missing and unexpected key and every shape mismatch.

    Raises:
        CheckpointMismatchError: shapes differ, or (``strict``) keys are missing or unexpected.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict] if strict else []
    unexpected = [k for k in state_dict if k not in own] if strict else []
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(mismatch_report(source, model, missing, unexpected, mismatched))
    model.load_state_dict(dict(state_dict), strict=strict)


def load_safetensors(model: nn.Module, path: PathLike, *, strict: bool = True) -> Dict[str, Any]:
    """Load a ``.safetensors`` file into ``model`` (keys and shapes checked); return its metadata.

    Raises:
        FileNotFoundError, CheckpointMismatchError: see :func:`read_safetensors` and
        :func:`load_state_dict_checked`.
    """
    sd, meta = read_safetensors(path)
    load_state_dict_checked(model, sd, source=str(path), strict=strict)
    return meta
