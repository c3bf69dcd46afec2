"""Pretrained weights, offline: cache lookup, file formats, checked loading (the catalogue: :mod:`.weights`).

Nothing here touches the network. ``pretrained=True`` looks where torchvision
(``$TORCH_HOME/hub/checkpoints/<file>``) and timm (the Hugging Face cache,
``$HF_HUB_CACHE/models--timm--<model>.<tag>/snapshots/*/model.safetensors``) would have stored the
files; a missing file fails at once, naming every place searched and the file to put there.

Every load uses ``torch.load(..., weights_only=True)`` or safetensors, so a checkpoint cannot run
code. Accepted layouts: a plain state dict (torchvision, timm), ``{"model": sd}``,
``{"state_dict": sd}`` (this project's checkpoints are ``{"model": sd, ...}``), ``module.`` (DDP)
or any other common prefix in front of ``conv1.weight`` (e.g. ``backbone.`` of a detector).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .weights import IMAGENET_MEAN, IMAGENET_STD, WEIGHTS, WeightsEntry, entries_for  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")

# The catalogue's data lives in :mod:`res_backbone.weights`; these names stay importable from here.
CATALOGUE: Tuple[WeightsEntry, ...] = WEIGHTS

DEFAULT_CFG = WeightsEntry("", "none", "none", "").pretrained_cfg() | {"tag": None, "source": None}


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


class PretrainedNotFoundError(FileNotFoundError):
    """No pretrained file where the caches would hold it (nothing is downloaded)."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the model."""


def resolve(arch: str, pretrained: Union[bool, str, os.PathLike]) -> Tuple[Path, dict]:
    """Turn a ``pretrained`` argument into ``(file, pretrained_cfg)``, never touching the network.

    Args:
        arch: registered depth, e.g. ``"resnet50"`` (plain twins have no ImageNet weights).
        pretrained: ``True`` (first catalogued file found locally), a catalogue tag
            (``"tv_in1k"``, ``"tv2_in1k"``, ``"a1_in1k"``, ``"a1h_in1k"``; torchvision's
            ``"IMAGENET1K_V1"``/``"IMAGENET1K_V2"`` too), or a path to a checkpoint file.

    Raises:
        PretrainedNotFoundError: naming every directory searched and the file name to place there.
    """
    if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool):
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


# ---------------------------------------------------------------------- reading files
def read_checkpoint(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a checkpoint file safely and return ``(state_dict, metadata)``.

    ``.safetensors`` files are read with safetensors; everything else with
    ``torch.load(weights_only=True)``, so a file carrying pickled code is refused. ``metadata`` holds
    this project's extra fields (``pretrained_cfg``, ``arch``...) when present.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from .serialization import read_safetensors  # JSON metadata of save_safetensors decoded

        return read_safetensors(path)
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


def _strip_prefix(sd: Dict[str, torch.Tensor], anchor: str) -> Dict[str, torch.Tensor]:
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
    sd = _strip_prefix(state_dict, "conv1.weight")
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
