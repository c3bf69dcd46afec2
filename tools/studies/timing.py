"""What the benchmarks share: interleaved timing, per-call results, operator counts, autocast by name.

Contenders are timed interleaved (:func:`time_interleaved`): every repeat runs each of them once,
starting from a different one each time, and the median over repeats is reported, so slow drift on
a shared machine (thermal throttling, a neighbour's job) spreads over all contenders instead of
favouring whoever ran first. :func:`count_dispatch` counts the ATen operators and host syncs of
one call: what a GPU at batch 1 is bound by.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from res_backbone.engine.optim_step import AMP_DTYPES

__all__ = ["AMP_DTYPES", "BenchResult", "DispatchCount", "SYNC_OPS", "autocast", "count_dispatch", "environment",
           "time_interleaved", "write_json"]


def environment(threads: int) -> dict:
    """Library versions, CPU and thread count: what a benchmark's numbers were measured with."""
    import timm
    import torchvision

    return {
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": threads,
    }


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON (parent folders created) and say so."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` (a key of :data:`AMP_DTYPES`); a null context for ``"none"``."""
    dtype = AMP_DTYPES[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@dataclass
class BenchResult:
    """Timings of one contender in one setting.

    Attributes:
        model: architecture name (``resnet50``).
        contender: ``torchvision``, ``timm``, ``ours`` or ``ours_eager``.
        mode: ``infer`` or ``train``.
        batch_size: images per call.
        times_s: seconds per call, one per repeat, in the order measured.
    """

    model: str
    contender: str
    mode: str
    batch_size: int
    times_s: List[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def img_per_s(self) -> float:
        return self.batch_size / self.median_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(median_ms=1000 * self.median_s, img_per_s=self.img_per_s)
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device = torch.device("cpu"),
    on_step: Optional[Callable[[str], None]] = None,
) -> Dict[str, List[float]]:
    """Time each callable ``repeats`` times, interleaved, after ``warmup`` untimed calls each.

    Args:
        fns: name -> zero-argument callable doing one unit of work.
        repeats: timed calls per callable; repeat ``r`` starts with the ``r % len(fns)``-th one.
        warmup: untimed calls per callable first (allocator, oneDNN primitive caches).
        device: synchronised around every call when CUDA.
        on_step: called with the name after every call (progress bars).

    Returns:
        name -> seconds per call, one per repeat.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            if on_step:
                on_step(name)
    _sync(device)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if on_step:
                on_step(name)
    return times


#: operators that make the host wait for a CUDA device: their output size or value is read on the
#: host (``nonzero``, ``.item()``, a boolean-mask index, torchvision's NMS copying its mask back ...)
SYNC_OPS = frozenset({
    "nonzero", "_local_scalar_dense", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "bincount", "equal", "is_nonzero", "nms", "histc", "masked_scatter",
})
#: allocations without a kernel
_NO_KERNEL_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "_unsafe_view", "lift_fresh",
})


@dataclass
class DispatchCount:
    """What one call asked of the device: a proxy for its launch overhead on a GPU at small batch.

    Attributes:
        ops: ATen operators that do work on the device (kernel launches, roughly): everything the
            call dispatched except views, aliases, bare allocations and host-side scalars (the
            ``-1`` of ``torch.where(mask, -1, x)``).
        syncs: host-device synchronisations: :data:`SYNC_OPS`, boolean-mask indexing,
            ``repeat_interleave`` without ``output_size``, copies between host and device and
            ``Tensor.tolist()``.
        by_op: operator name -> count; syncs_by_op: the same for ``syncs``.
    """

    ops: int = 0
    syncs: int = 0
    by_op: Dict[str, int] = field(default_factory=dict)
    syncs_by_op: Dict[str, int] = field(default_factory=dict)

    def to_dict(self, top: int = 25) -> dict:
        ranked = sorted(self.by_op.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        return {"ops": self.ops, "syncs": self.syncs, "top_ops": dict(ranked), "syncs_by_op": dict(sorted(self.syncs_by_op.items()))}


def _is_sync(name: str, func, args, kwargs) -> bool:
    if name in SYNC_OPS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
    if name == "repeat_interleave":
        return isinstance(args[0], torch.Tensor) and "output_size" not in kwargs and (
            func._overloadname == "Tensor" or isinstance(args[1] if len(args) > 1 else None, torch.Tensor))
    if name in ("_to_copy", "copy_"):
        devices = {a.device.type for a in args[:2] if isinstance(a, torch.Tensor)}
        target = kwargs.get("device")
        if target is not None:
            devices.add(torch.device(target).type)
        return len(devices) > 1 and "cpu" in devices and not kwargs.get("non_blocking", False)
    return False


def count_dispatch(fn: Callable[[], object]) -> "tuple[object, DispatchCount]":
    """Run ``fn()`` once and count the ATen operators it dispatches (:class:`DispatchCount`).

    On a GPU at batch 1 a detector is bound by the host: each operator costs a few microseconds of
    Python and launch overhead whatever its size, and each synchronisation stalls the queue. This
    count is the same on the CPU (where it can be measured without a GPU) as on the GPU, except for
    device-dependent branches (torchvision's ``batched_nms`` loops over classes on the CPU above 4k
    boxes, on CUDA above 20k) and host-device copies, which only a GPU run shows.

    Run ``fn`` with autograd on (``torch.no_grad()`` rather than ``inference_mode``, so composite
    operators are counted as the kernels they decompose into). Not for timing: counting slows the
    call down.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    count = DispatchCount()

    def add(name: str, sync: bool) -> None:
        count.ops += 1
        count.by_op[name] = count.by_op.get(name, 0) + 1
        if sync:
            count.syncs += 1
            count.syncs_by_op[name] = count.syncs_by_op.get(name, 0) + 1

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            schema = func._schema
            name = schema.name.split("::")[-1]
            is_view = not schema.is_mutable and any(r.alias_info is not None for r in schema.returns)
            host_scalar = name == "scalar_tensor" and torch.device(kwargs.get("device") or "cpu").type == "cpu"
            if not is_view and not host_scalar and name not in _NO_KERNEL_OPS:
                add(name, _is_sync(name, func, args, kwargs))
            return func(*args, **kwargs)

    tolist = torch.Tensor.tolist

    def counted_tolist(t, *a, **k):  # a device-to-host copy on a GPU; dispatches nothing on the CPU
        add("tolist", True)
        return tolist(t, *a, **k)

    torch.Tensor.tolist = counted_tolist
    try:
        with _Counter():
            out = fn()
    finally:
        torch.Tensor.tolist = tolist
    return out, count
