"""Throughput of this project's ResNets against torchvision's and timm's, measured in one process.

Contenders are timed interleaved: every repeat runs each of them once, starting from a different
one each time, and the median over repeats is reported, so slow drift on a shared machine (thermal
throttling, a neighbour's job) spreads over all contenders instead of favouring whoever ran first.

Inference contenders:

* ``torchvision`` / ``timm``: the models as users typically run them, ``.eval()`` under
  ``torch.inference_mode()`` on NCHW contiguous input.
* ``ours_eager``: our model run exactly like the baselines (no fast path), for a fair comparison.
* ``ours``: :func:`~res_backbone.inference.prepare_for_inference` (folded BN, channels-last
  weights) fed channels-last input.
* with ``ablation=True`` also ``ours_fold`` (BN folded only, NCHW input) and ``ours_fused``
  (``ours`` plus fused ReLU/residual epilogues, ``fuse=True``): what each step buys.

Training contenders run one step (forward, cross-entropy, backward, SGD with momentum) in
``train()`` mode: torchvision, timm and ``ours_eager`` on NCHW, ``ours`` channels-last (weights and
input), the layout this project's training tools use.
"""
from __future__ import annotations

import copy

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .inference import prepare_for_inference
from .registry import create_model

BASELINES = ("torchvision", "timm")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def build_contenders(name: str, num_classes: int = 1000) -> Dict[str, nn.Module]:
    """torchvision's, timm's and our ``name`` with identical weights (torchvision's random init)."""
    import timm
    import torchvision

    tv = getattr(torchvision.models, name)(num_classes=num_classes)
    tm = timm.create_model(name, pretrained=False, num_classes=num_classes)
    ours = create_model(name, num_classes=num_classes)
    state = tv.state_dict()
    tm.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    return {"torchvision": tv, "timm": tm, "ours": ours}


def _autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _infer_fn(model: nn.Module, x: torch.Tensor, device: torch.device, amp: str) -> Callable[[], object]:
    def run():
        with torch.inference_mode(), _autocast(device, amp):
            return model(x)

    return run


def _train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, amp: str) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def bench_model(
    name: str,
    *,
    batch_sizes: Sequence[int] = (1, 8),
    train_batch_size: Optional[int] = 8,
    image_size: int = 224,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    amp: str = "none",
    ablation: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Benchmark inference (and one training step) of torchvision's, timm's and our ``name``.

    Args:
        name: a ResNet that all three libraries provide (``resnet18``..``resnet152``).
        batch_sizes: inference batch sizes.
        train_batch_size: batch of the timed training step; ``None`` or 0 skips training.
        image_size: square input side.
        repeats, warmup: see :func:`time_interleaved`.
        device: ``cpu`` or ``cuda``.
        amp: ``none``, ``bf16`` or ``fp16`` autocast for every contender.
        ablation: also time ``ours_fold`` and ``ours_fused`` (see the module docstring).
        progress: called after every timed or warm-up call.

    Returns:
        ``{"model", "results": [BenchResult.to_dict()...], "ratios": [...], "max_rel_diff": {...}}``;
        each ratio row is ``{mode, batch_size, contender, vs_torchvision, vs_timm}`` (img/s ratios).
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    dev = torch.device(device)
    models = {k: m.to(dev).eval() for k, m in build_contenders(name).items()}
    infer_models = {
        "torchvision": models["torchvision"],
        "timm": models["timm"],
        "ours_eager": models["ours"],
        "ours": prepare_for_inference(models["ours"]),
    }
    if ablation:
        infer_models["ours_fold"] = prepare_for_inference(models["ours"], channels_last=False)
        infer_models["ours_fused"] = prepare_for_inference(models["ours"], fuse=True)
    channels_last_input = ("ours", "ours_fused")
    cl = torch.channels_last
    results: List[BenchResult] = []
    diffs: Dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for bs in batch_sizes:
        x = torch.randn(bs, 3, image_size, image_size, generator=gen).to(dev)
        inputs = {k: (x.contiguous(memory_format=cl) if k in channels_last_input else x) for k in infer_models}
        fns = {k: _infer_fn(m, inputs[k], dev, amp) for k, m in infer_models.items()}
        ref = fns["torchvision"]()
        for k in list(fns)[1:]:
            diffs[f"{k}_b{bs}"] = max_rel_diff(fns[k](), ref)
        times = time_interleaved(fns, repeats, warmup, dev, progress)
        results += [BenchResult(name, k, "infer", bs, t) for k, t in times.items()]
    if train_batch_size:
        x = torch.randn(train_batch_size, 3, image_size, image_size, generator=gen).to(dev)
        y = torch.randint(0, 1000, (train_batch_size,), generator=gen).to(dev)
        # ours_eager trains NCHW like the baselines (same arithmetic); ours trains channels-last,
        # the layout the training tools use (--channels-last), on its own copy of the weights.
        fns = {
            "torchvision": _train_fn(models["torchvision"], x, y, dev, amp),
            "timm": _train_fn(models["timm"], x, y, dev, amp),
            "ours_eager": _train_fn(copy.deepcopy(models["ours"]), x, y, dev, amp),
            "ours": _train_fn(copy.deepcopy(models["ours"]).to(memory_format=cl), x.contiguous(memory_format=cl), y, dev, amp),
        }
        times = time_interleaved(fns, repeats, warmup, dev, progress)
        results += [BenchResult(name, k, "train", train_batch_size, t) for k, t in times.items()]
    return {
        "model": name,
        "results": [r.to_dict() for r in results],
        "ratios": ratios(results),
        "max_rel_diff": diffs,
    }


def ratios(results: Iterable[BenchResult]) -> List[dict]:
    """img/s of every ``ours*`` contender divided by each baseline's, per mode and batch size."""
    results = list(results)
    by_key = {(r.mode, r.batch_size, r.contender): r.img_per_s for r in results}
    rows = []
    for r in results:
        if r.contender in BASELINES:
            continue
        row = {"mode": r.mode, "batch_size": r.batch_size, "contender": r.contender}
        for base in BASELINES:
            ref = by_key.get((r.mode, r.batch_size, base))
            row[f"vs_{base}"] = r.img_per_s / ref if ref else None
        rows.append(row)
    return rows


def count_calls(batch_sizes: Sequence[int], train: bool, repeats: int, warmup: int, ablation: bool = False) -> int:
    """How many timed and warm-up calls :func:`bench_model` makes (for a progress bar's total)."""
    infer = 6 if ablation else 4
    return (repeats + warmup) * (infer * len(batch_sizes) + (4 if train else 0))


def markdown_report(payload: dict) -> str:
    """Markdown tables (one per model) of a ``tools/bench.py backbone --output`` JSON payload."""
    env = payload.get("environment", {})
    lines = [
        f"`{payload.get('command', '')}`",
        "",
        f"torch {env.get('torch')}, torchvision {env.get('torchvision')}, timm {env.get('timm')}, "
        f"{env.get('threads')} threads on {env.get('cpu_count')} cores; median img/s over interleaved repeats.",
    ]
    for run in payload["runs"]:
        ratio = {(q["mode"], q["batch_size"], q["contender"]): q for q in run["ratios"]}
        lines += ["", f"### {run['model']}", "",
                  "| mode | batch | contender | img/s | ms / call | vs torchvision | vs timm |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for r in run["results"]:
            q = ratio.get((r["mode"], r["batch_size"], r["contender"]))
            vs = f"{q['vs_torchvision']:.2f} | {q['vs_timm']:.2f}" if q else " | "
            name = f"**{r['contender']}**" if r["contender"] == "ours" else r["contender"]
            lines.append(f"| {r['mode']} | {r['batch_size']} | {name} | {r['img_per_s']:.2f} | {r['median_ms']:.1f} | {vs} |")
    return "\n".join(lines) + "\n"
