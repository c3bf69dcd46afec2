"""Build a :class:`~heads.classification.head.Classifier` from a backbone name, and rebuild a
classification checkpoint (``tools/train_cls.py``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from res_backbone import create_backbone, create_model
from res_backbone.weights.files import CheckpointMismatchError, read_checkpoint
from res_backbone.weights.load import load_into

from .head import ClassificationHead, Classifier


class NumClassesMismatchError(CheckpointMismatchError, ValueError):
    """The ``num_classes`` asked for differs from the size of a checkpoint's classifier."""


def build_classifier(name: str, num_classes: int, *, pool: str = "avg", drop_rate: float = 0.0,
                     **backbone_kwargs) -> Classifier:
    """``create_backbone(name, **backbone_kwargs)`` + a head over its last level."""
    backbone = create_backbone(name, **backbone_kwargs)
    return Classifier(backbone, ClassificationHead.from_backbone(backbone, num_classes, pool=pool, drop_rate=drop_rate))


def _classifier_size(sd: Dict[str, torch.Tensor]) -> Optional[int]:
    w = sd.get("fc.weight")
    return int(w.shape[0]) if w is not None else None


def load_classifier(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu",
                    num_classes: Optional[int] = None) -> Tuple[nn.Module, dict]:
    """Rebuild and load a classification checkpoint (``{"model", "model_name", "model_kwargs", ...}``).

    The model is ``create_model(meta["model_name"], **meta["model_kwargs"])``; weights are read with
    ``weights_only=True``. ``model.pretrained_cfg`` comes from the checkpoint and the model is
    returned in eval mode on ``map_location``.

    Args:
        path: a checkpoint written by ``tools/train_cls.py`` (or any file of that layout).
        map_location: device for the returned model.
        num_classes: if given, must equal the checkpoint's classifier size (a check, not a resize).

    Returns:
        ``(model, meta)`` where ``meta`` holds the checkpoint's non-tensor entries (``classes``,
        ``pretrained_cfg``, ``config``, ``metrics``...).

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatchError: unreadable file, missing ``model_name``, or weights that do not fit.
        NumClassesMismatchError: ``num_classes`` differs from the checkpoint's classifier.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classification checkpoint {path} does not exist")
    sd, meta = read_checkpoint(path)
    name = meta.get("model_name") or meta.get("arch")
    if not name:
        raise CheckpointMismatchError(
            f"{path}: no 'model_name' entry, so the architecture is unknown; expected a classification "
            "checkpoint of tools/train_cls.py ({'model', 'model_name', 'model_kwargs', 'pretrained_cfg', ...})"
        )
    kwargs = dict(meta.get("model_kwargs") or {})
    saved = _classifier_size(sd)
    declared = kwargs.get("num_classes", saved)
    if saved is None:
        raise CheckpointMismatchError(f"{path}: holds no classifier (no 'fc.weight'); it is a backbone checkpoint")
    if declared != saved:
        raise CheckpointMismatchError(
            f"{path}: model_kwargs['num_classes']={declared} but its classifier fc.weight has {saved} rows"
        )
    if num_classes is not None and num_classes != saved:
        raise NumClassesMismatchError(
            f"{path}: its classifier has {saved} classes (fc.weight {tuple(sd['fc.weight'].shape)}), but "
            f"num_classes={num_classes} was asked for. Evaluating needs the trained classifier: pass "
            f"num_classes={saved} (or leave it unset). To train for {num_classes} classes, build "
            f"create_model({name!r}, num_classes={num_classes}, pretrained={str(path)!r}), which keeps the "
            "backbone and starts a new classifier."
        )
    kwargs["num_classes"] = saved
    model = create_model(name, **kwargs)
    load_into(model, sd, source=str(path))
    cfg = meta.get("pretrained_cfg")
    model.pretrained_cfg = dict(model.pretrained_cfg, **(dict(cfg) if isinstance(cfg, Mapping) else {}))
    model.pretrained_cfg["file"] = str(path)
    return model.to(map_location).eval(), meta
