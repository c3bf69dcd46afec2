"""Feature descriptions: channels and stride per named output, read off the built modules.

``feature_info`` is a list of dicts in timm's format (``num_chs``, ``reduction``, ``module``) plus
the level ``name`` (``stem``, ``res2``..``res5``, ``p2``..``p6``), ordered fine to coarse. Heads
read channels and strides from it (or from ``output_shape()``); nothing guesses them.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union


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


def take_indices(num_levels: int, indices: Optional[Union[int, Sequence[int]]] = None) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices``: which of ``num_levels`` levels to return, and the deepest one.

    Args:
        num_levels: levels the network computes (``len(feature_info)``: 5 ImageNet, 4 CIFAR).
        indices: ``None`` every level; an int ``n`` the last ``n``; a sequence of indices (negative
            ones count from the end).

    Returns:
        ``(absolute indices in the given order, largest of them)``.

    Raises:
        ValueError: an empty selection or an index outside ``0..num_levels - 1``.
    """
    if indices is None:
        indices = num_levels
    if isinstance(indices, int):
        if not 0 < indices <= num_levels:
            raise ValueError(f"indices={indices}: the last-n count must be in 1..{num_levels}")
        taken = list(range(num_levels - indices, num_levels))
    else:
        taken = [num_levels + int(i) if int(i) < 0 else int(i) for i in indices]
        bad = [i for i, t in zip(indices, taken) if not 0 <= t < num_levels]
        if bad or not taken:
            raise ValueError(f"indices={list(indices)}: each must be in {-num_levels}..{num_levels - 1} "
                             f"(this network has {num_levels} levels) and at least one is needed")
    return taken, max(taken)
