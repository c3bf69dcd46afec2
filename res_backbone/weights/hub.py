"""Share a ResNet the way timm users do: timm's hub folder (``config.json`` + ``model.safetensors``).

:func:`save_for_timm_hub` writes a classifier or a backbone (a model of :func:`res_backbone.create_model`
or of ``timm.create_model('rb_*')``, or a checkpoint of ``tools/train_cls.py`` / ``tools/weights.py
convert``) so that ``timm.create_model('local-dir:FOLDER', pretrained=True)`` (or ``hf-hub:USER/REPO``
once the folder is uploaded) rebuilds it: architecture ``rb_<name>``, class count, architecture
options, mean/std, input size, interpolation and crop, and bitwise-equal logits, checked by loading the
folder back through timm. :func:`.hub_folder.read_hub_folder` is the reverse: it turns such a folder (or
``hf-hub:USER/REPO`` in the local Hugging Face cache) into the weights file and data config that
``create_model(name, pretrained=FOLDER)`` and ``--pretrained FOLDER`` load.

The folder layout is timm's (``timm.models.save_for_hf``)::

    config.json        {"architecture": "rb_resnet20", "num_classes": 10, "num_features": 64,
                        "global_pool": "avg", "model_args": {"in_chans": 3, ...},
                        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [...], ...}, "label_names": [...]}
    model.safetensors  the state dict, parameter names as torchvision's
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .catalogue import DEFAULT_CFG
from .files import CheckpointMismatchError, read_checkpoint, save_safetensors
from .hub_folder import CFG_KEYS, HUB_CONFIG, HUB_WEIGHTS, is_hub_source, read_hub_folder  # noqa: F401 (re-export)

PathLike = Union[str, os.PathLike]
TIMM_PREFIX = "rb_"
# ResNet keywords that change the architecture (not training-time options such as frozen_stages, drop_rate)
_ARG_KEYS = ("in_chans", "shortcut", "stride_in_1x1", "output_stride", "norm", "stem_width", "widths", "global_pool")


@dataclass
class HubExport:
    """What :func:`save_for_timm_hub` wrote and how it was checked."""

    folder: Path
    architecture: str
    num_classes: int
    model_args: dict
    pretrained_cfg: dict
    checks: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        """What was written and checked, and how to load it (``tools/weights.py export-hub`` prints these)."""
        cfg = self.pretrained_cfg
        return ([f"wrote {self.folder}: {self.architecture}, {self.num_classes} classes, model_args {self.model_args}",
                 f"  data config: input {cfg.get('input_size')}, mean {cfg.get('mean')}, std {cfg.get('std')}"]
                + [f"  checked: {line}" for line in self.checks]
                + [f"  load it: timm.create_model('local-dir:{self.folder}', pretrained=True), "
                   f"or create_model(name, pretrained='{self.folder}') / --pretrained {self.folder}"])


def _arch_args(model: nn.Module) -> dict:
    """The architecture keywords that rebuild ``model`` (recorded by ``create_model`` or timm's factory)."""
    recorded = dict(getattr(model, "model_kwargs", None) or getattr(model, "_model_args", None) or {})
    args = {k: recorded[k] for k in _ARG_KEYS if k in recorded}
    args.update(in_chans=int(model.in_chans), global_pool=model.global_pool,
                norm="bn" if model.norm == "sync_bn" else model.norm)  # SyncBatchNorm is BatchNorm at rest
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def _model_name(model: nn.Module) -> str:
    name = getattr(model, "model_name", None) or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise ValueError(f"{type(model).__name__} carries no model_name; build it with res_backbone.create_model "
                         "or timm.create_model('rb_...'), or pass a checkpoint file")
    return name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name.split(".")[0]


def model_from_checkpoint(path: PathLike) -> nn.Module:
    """Rebuild the ResNet of a checkpoint that names its model (``{"model", "model_name" or "arch",
    "model_kwargs", "pretrained_cfg", "classes"...}``); a file without ``fc.*`` gives ``num_classes=0``."""
    from .files import strip_prefix
    from .load import load_state_dict_checked

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sd, meta = read_checkpoint(path)
    name = meta.get("model_name") or meta.get("arch")
    if not isinstance(name, str):
        raise CheckpointMismatchError(f"{path}: no 'model_name' or 'arch' entry, so the architecture is unknown; "
                                      "expected a checkpoint of tools/train_cls.py or tools/weights.py convert")
    sd = strip_prefix(sd, "conv1.weight")
    kwargs = {k: v for k, v in dict(meta.get("model_kwargs") or {}).items() if k in _ARG_KEYS}
    num_classes = int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else 0
    model = _rebuild(name, num_classes=num_classes, **kwargs)
    own = model.state_dict()
    load_state_dict_checked(model, {k: v for k, v in sd.items() if k in own or not k.endswith("num_batches_tracked")},
                            source=str(path))
    cfg = meta.get("pretrained_cfg")
    model.pretrained_cfg = {**model.pretrained_cfg, **(cfg if isinstance(cfg, Mapping) else {})}
    model.label_names = list(meta["classes"]) if isinstance(meta.get("classes"), (list, tuple)) else None
    return model


def _rebuild(name: str, **kwargs) -> nn.Module:
    """``create_model`` whose weights are loaded next (so no warning about frozen random statistics)."""
    from ..registry import create_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without pretrained weights")
        return create_model(name, **kwargs)


def _as_classifier(source: Union[nn.Module, PathLike]) -> nn.Module:
    from ..resnet import ResNet, ResNetBackbone

    if not isinstance(source, nn.Module):
        return model_from_checkpoint(source)
    if isinstance(source, ResNetBackbone):
        if source.fpn is not None or len(source.stages()) != source.num_stages:
            raise ValueError("only a backbone with every stage and no FPN is a timm model; build it with "
                             "create_backbone(name) (default out_features, fpn=False)")
    elif not isinstance(source, ResNet):
        raise TypeError(f"expected a res_backbone ResNet / ResNetBackbone or a checkpoint path, "
                        f"got {type(source).__name__}")
    # Rebuild from the recorded facts alone and load the weights strictly: what timm will do from config.json.
    classes = source.num_classes if isinstance(getattr(source, "fc", None), nn.Linear) else 0
    model = _rebuild(_model_name(source), num_classes=classes, **_arch_args(source))
    model.load_state_dict(source.state_dict(), strict=True)
    model.pretrained_cfg = dict(getattr(source, "pretrained_cfg", None) or DEFAULT_CFG)
    model.label_names = getattr(source, "label_names", None)
    return model


def hub_config(model: nn.Module, label_names: Optional[Sequence[str]] = None) -> dict:
    """timm's ``config.json`` for ``model`` (a :class:`~res_backbone.resnet.ResNet` with ``model_name``)."""
    args = _arch_args(model)
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k in CFG_KEYS and v is not None}
    side = tuple(cfg.get("input_size") or DEFAULT_CFG["input_size"])[-2:]
    cfg.update(input_size=[args["in_chans"], *side], num_classes=model.num_classes, first_conv="conv1",
               classifier="fc", fixed_input_size=False)
    cfg.setdefault("test_input_size", None)
    if cfg["test_input_size"] is None:
        cfg.pop("test_input_size")
    else:
        cfg["test_input_size"] = [args["in_chans"], *tuple(cfg["test_input_size"])[-2:]]
    config = {"architecture": TIMM_PREFIX + _model_name(model), "num_classes": model.num_classes,
              "num_features": model.num_features, "global_pool": model.global_pool,
              "model_args": args, "pretrained_cfg": cfg}
    names = label_names if label_names is not None else getattr(model, "label_names", None)
    if names:
        if len(names) != model.num_classes:
            raise ValueError(f"{len(names)} label names for a classifier of {model.num_classes} classes")
        config["label_names"] = list(names)
    return json.loads(json.dumps(config))  # tuples -> lists, and a check that it is JSON


def check_hub_folder(folder: PathLike, reference: nn.Module, seed: int = 0) -> List[str]:
    """Load ``folder`` with ``timm.create_model('local-dir:...', pretrained=True)`` and compare it with
    ``reference``: data config and logits on a random batch ``(2, C, H, W)`` of its input size, bitwise.

    Raises:
        CheckpointMismatchError: naming what differs.
    """
    import timm
    from timm.data import resolve_data_config

    loaded = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()
    want = hub_config(reference)["pretrained_cfg"]
    data = resolve_data_config({}, model=loaded)
    got = {"input_size": list(data["input_size"]), "mean": list(data["mean"]), "std": list(data["std"])}
    bad = [f"{k}: timm {got[k]} vs {want.get(k)}" for k in got if want.get(k) is not None
           and [float(v) for v in got[k]] != [float(v) for v in want[k]]]
    if loaded.num_classes != reference.num_classes:
        bad.append(f"num_classes: timm {loaded.num_classes} vs {reference.num_classes}")
    x = torch.randn((2, *got["input_size"]), generator=torch.Generator().manual_seed(seed))
    was_training = reference.training
    with torch.no_grad():
        a, b = loaded(x), reference.eval()(x)
    reference.train(was_training)
    if a.shape != b.shape or not torch.equal(a, b):
        diff = (a - b).abs().max().item() if a.shape == b.shape else f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        bad.append(f"logits differ (max |diff| {diff})")
    if bad:
        raise CheckpointMismatchError(f"{folder}: timm rebuilds a different model: " + "; ".join(bad))
    return [f"timm.create_model('local-dir:{folder}', pretrained=True) is {type(loaded).__name__} "
            f"{loaded.pretrained_cfg.get('architecture')}, {loaded.num_classes} classes",
            f"data config input {got['input_size']}, mean {got['mean']}, std {got['std']} as saved",
            f"logits on a {tuple(x.shape)} batch bitwise equal to the source model's"]


def save_for_timm_hub(source: Union[nn.Module, PathLike], folder: PathLike, *,
                      label_names: Optional[Sequence[str]] = None, overwrite: bool = False,
                      verify: bool = True) -> HubExport:
    """Write ``source`` as a timm hub folder and (``verify``) load it back through timm to check it.

    Args:
        source: a :class:`~res_backbone.resnet.ResNet` (``create_model`` / ``timm.create_model('rb_*')``), a
            full :class:`~res_backbone.resnet.ResNetBackbone` without FPN (saved as ``num_classes=0``), or
            a checkpoint path (``tools/train_cls.py``'s ``classes`` become ``label_names``).
        folder: the folder to write (``config.json``, ``model.safetensors``); filled in a temporary
            sibling and renamed into place, so it is never half-written.
        label_names: class names, one per output (default: the checkpoint's ``classes``).
        overwrite: replace an existing non-empty ``folder``.
        verify: run :func:`check_hub_folder` (needs timm).

    Raises:
        FileExistsError: ``folder`` is not empty and ``overwrite`` is false.
        CheckpointMismatchError: unreadable checkpoint, or timm rebuilds something else.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True (--force) to replace it")
    model = _as_classifier(source).eval()
    config = hub_config(model, label_names)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_safetensors(model, tmp / HUB_WEIGHTS, model_name=config["architecture"],
                         metadata={"model_args": config["model_args"]})
        (tmp / HUB_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    checks = check_hub_folder(folder, model) if verify else []
    return HubExport(folder, config["architecture"], model.num_classes, config["model_args"],
                     config["pretrained_cfg"], checks)
