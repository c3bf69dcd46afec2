"""Feature descriptions: channels and stride per named output, read off the built modules.

``feature_info`` is a list of dicts in timm's format (``num_chs``, ``reduction``, ``module``) plus
the level ``name`` (``stem``, ``res2``..``res5``, ``p2``..``p6``), ordered fine to coarse. Heads
read channels and strides from it (or from ``output_shape()``); nothing guesses them.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, NamedTuple, Sequence


class ShapeSpec(NamedTuple):
    """Channels and stride of one feature map (detectron2's ``ShapeSpec``, as a plain tuple)."""

    channels: int
    stride: int


def feature_entry(name: str, channels: int, stride: int, module: str) -> dict:
    return {"name": name, "num_chs": int(channels), "reduction": int(stride), "module": module}


def select_features(info: Sequence[dict], names: Iterable[str]) -> List[dict]:
    """Return the entries of ``info`` named in ``names``, in ``info``'s (fine-to-coarse) order.

    Raises:
        ValueError: naming any unknown feature and listing the known ones.
    """
    names = list(names)
    known = [f["name"] for f in info]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown feature name(s) {unknown}; this model provides {known}")
    if not names:
        raise ValueError(f"out_features is empty; choose from {known}")
    return [dict(f) for f in info if f["name"] in names]


def shapes_from_info(info: Sequence[dict]) -> Dict[str, ShapeSpec]:
    return {f["name"]: ShapeSpec(f["num_chs"], f["reduction"]) for f in info}
