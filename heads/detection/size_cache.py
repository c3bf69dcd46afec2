"""Tensors that depend only on input sizes (anchors, selection indices, image sizes), built once.

Building them every call costs kernel launches and, on a GPU, host-to-device copies that make the
host wait for the device's queue; a data pipeline that pads to a few sizes pays that once per size.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, TypeVar

import torch

T = TypeVar("T")


def cached_for_size(cache: Dict[Hashable, T], key: Hashable, build: Callable[[], T], limit: int = 16) -> T:
    """``cache[key]``, built with ``build()`` on a miss (outside inference mode, so the tensors are
    usable in and out of it); the cache is emptied when it holds ``limit`` entries."""
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= limit:
            cache.clear()
        with torch.inference_mode(False):
            hit = cache[key] = build()
    return hit
