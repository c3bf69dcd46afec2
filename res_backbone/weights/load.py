"""Loading weights into a model: checked key by key, with the adaptations transfer learning needs.

:func:`load_pretrained` is what ``create_model(..., pretrained=...)`` runs: resolve the argument to a
file (:mod:`.cache`), read it safely (:mod:`.files`), load it with :func:`load_into` (a classifier of
another size dropped, the first conv adapted to the input channels, stages the model does not hold
skipped). :func:`load_state_dict_checked` and :func:`load_safetensors` load any module strictly.
Whatever does not fit raises :class:`~.files.CheckpointMismatchError` naming the missing and
unexpected keys and the shape mismatches.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
from torch import nn

from .cache import resolve
from .catalogue import DEFAULT_CFG
from .files import CheckpointMismatchError, read_checkpoint, read_safetensors, strip_prefix

__all__ = ["adapt_input_conv", "load_into", "load_pretrained", "load_safetensors", "load_state_dict_checked",
           "mismatch_report"]

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


def mismatch_report(source: str, model: nn.Module, missing: List[str], unexpected: List[str],
                    mismatched: List[str]) -> str:
    """The lines of a :class:`CheckpointMismatchError`: missing and unexpected keys, shape mismatches (10 each)."""
    def show(items: List[str]) -> str:
        return ", ".join(items[:10]) + (f" ... (+{len(items) - 10} more)" if len(items) > 10 else "")

    lines = [f"{source} does not fit {type(model).__name__}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {show(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {show(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): {show(mismatched)}")
    return "\n".join(lines)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv weight ``(O, I, kh, kw)`` to ``in_chans`` inputs.

    3 -> 1 sums the colour filters (a grey image equal to R=G=B then gives the same response);
    other counts repeat the filters cyclically and rescale by ``I / in_chans`` (timm's choice).
    """
    c_in = weight.shape[1]
    if c_in == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // c_in)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (c_in / in_chans)


def load_into(
    model: nn.Module,
    state_dict: Dict[str, torch.Tensor],
    *,
    source: str = "<checkpoint>",
    allow_missing_prefixes: Tuple[str, ...] = ("fpn.",),
) -> Dict[str, List[str]]:
    """Load a ResNet state dict into ``model`` with the adaptations transfer learning needs.

    * a classifier (``fc.*``) whose shape differs, or that the model does not have, is dropped;
    * the first conv is adapted to the model's input channels (:func:`adapt_input_conv`);
    * stages the model does not hold (a backbone cut at ``res4``) are skipped;
    * parameters under ``allow_missing_prefixes`` (e.g. a new FPN) may be absent.

    Anything else that does not fit raises :class:`CheckpointMismatchError` naming the missing and
    unexpected keys and the shape mismatches. Returns ``{"dropped": [...], "adapted": [...]}``.
    """
    sd = strip_prefix(state_dict, "conv1.weight")
    own = model.state_dict()
    dropped, adapted = [], []
    held_layers = {k.split(".")[0] for k in own if k.startswith("layer")}
    sd = dict(sd)
    for k in list(sd):
        top = k.split(".")[0]
        if top == "fc" and (k not in own or own[k].shape != sd[k].shape):
            dropped.append(k)
            del sd[k]
        elif top.startswith("layer") and top not in held_layers:
            del sd[k]  # a stage this backbone does not build
        elif k.endswith("num_batches_tracked") and k not in own:
            del sd[k]  # FrozenBatchNorm2d / GroupNorm hold no counter
    if "conv1.weight" in sd and "conv1.weight" in own and sd["conv1.weight"].shape[1] != own["conv1.weight"].shape[1]:
        old = tuple(sd["conv1.weight"].shape)
        sd["conv1.weight"] = adapt_input_conv(sd["conv1.weight"], own["conv1.weight"].shape[1])
        adapted.append(f"conv1.weight {old} -> {tuple(sd['conv1.weight'].shape)}")
    if dropped:  # a new classifier keeps its fresh initialisation
        allow_missing_prefixes = tuple(allow_missing_prefixes) + ("fc.",)
    missing = [k for k in own if k not in sd and not k.startswith(allow_missing_prefixes)]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd if k in own and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            mismatch_report(source, model, missing, unexpected, mismatched)
            + "\n  (is it the same depth, block type and norm? plain twins have no downsample.* keys)")
    model.load_state_dict(sd, strict=False)
    if dropped:
        log.info("%s: classifier %s not loaded (shape differs or model has none)", source, dropped)
    return {"dropped": dropped, "adapted": adapted}


def load_pretrained(model: nn.Module, arch: str, pretrained: Union[bool, str, os.PathLike]) -> dict:
    """Resolve ``pretrained`` for ``arch``, load it into ``model`` and return its ``pretrained_cfg``.

    The config (mean/std, input size, interpolation) comes from the catalogue for known files, from
    the checkpoint's own ``pretrained_cfg`` for this project's checkpoints, else ImageNet defaults.
    """
    path, cfg = resolve(arch, pretrained)
    sd, meta = read_checkpoint(path)
    load_into(model, sd, source=str(path))
    if not cfg:
        saved = meta.get("pretrained_cfg")
        if isinstance(saved, str):  # safetensors metadata holds strings
            import json

            saved = json.loads(saved)
        cfg = dict(saved) if isinstance(saved, Mapping) else dict(DEFAULT_CFG)
    cfg["file"] = str(path)
    return cfg


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
