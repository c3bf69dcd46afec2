"""``tools/bench.py deploy``: per-image latency of one trained detector through each way of running it.

Contenders, interleaved in one process on the same inputs and threads: the model as trained (eval mode), its
inference copy (:func:`res_backbone.prepare_for_inference`: BN folded, channels-last), and each exported file given
(``--files``: ONNX through onnxruntime's CPU provider, ``.pt2``, TorchScript). The median over ``--repeats`` is
reported per input size, with each contender's multiply-adds per second as a share of this machine's measured
fp32 peak (a large ``torch.mm`` on the same threads), so the table says how close to the limit each path is.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence

import torch

from studies.timing import environment, time_interleaved

__all__ = ["bench_deploy", "matmul_peak_gflops"]


def matmul_peak_gflops(threads: int, sizes: Sequence[int] = (1024, 2048, 3072), repeats: int = 3) -> float:
    """This machine's fp32 peak as ``torch.mm`` of square matrices reaches it (GFLOP/s; the best over ``sizes``).
    A contender above 100% computes fewer multiply-adds than the direct convolution counts (e.g. Winograd)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats)) / 1e9)
    return best


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _macs(model, x, sizes) -> int:
    """Multiply-adds of one forward (convolutions and linear layers), counted by fvcore-free hooks."""
    total = [0]

    def conv(m, inp, out):
        total[0] += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        total[0] += out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.inference_mode():
        model(x, sizes)
    for h in hooks:
        h.remove()
    return total[0]


def bench_deploy(checkpoint: str, files: Sequence[str], sizes: Sequence[int], repeats: int = 15, warmup: int = 2,
                 threads: int = 0) -> Dict:
    """Latency (ms per image) of ``checkpoint``'s detector and ``files`` at each square input side in ``sizes``."""
    from heads.export import load_checkpoint_model
    from heads.exported import load_exported

    if threads:
        torch.set_num_threads(threads)
    model, meta = load_checkpoint_model(checkpoint)
    if meta["task"] != "detection":
        raise ValueError(f"{checkpoint}: bench.py deploy times detectors; this is a {meta['task']} checkpoint")
    fast = model.inference_copy()
    exported = {f"{load_exported(f).format}:{f}": load_exported(f) for f in files}
    peak = matmul_peak_gflops(torch.get_num_threads())
    rows: List[Dict] = []
    for side in sizes:
        x, s = torch.randn(1, 3, side, side), [(side, side)]
        fns = {"eager (as trained)": lambda: model(x, s), "inference copy": lambda: fast(x, s)}
        fns.update({name: (lambda m=m: m(x, s)) for name, m in exported.items()})
        with torch.inference_mode():
            times = time_interleaved(fns, repeats, warmup)
        gmacs = _macs(model, x, s) / 1e9
        for name, t in times.items():
            ms = 1000 * statistics.median(t)
            rows.append({"contender": name, "image_size": side, "ms_per_image": round(ms, 2),
                         "gmacs": round(gmacs, 2), "share_of_peak": round(2 * gmacs / (ms / 1000) / peak, 3)})
    return {"checkpoint": checkpoint, "peak_gflops": round(peak, 1), "rows": rows,
            "environment": environment(torch.get_num_threads())}


def markdown(result: Dict) -> str:
    """The rows as a markdown table, with the speed-up over the model as trained at the same size."""
    base = {r["image_size"]: r["ms_per_image"] for r in result["rows"] if r["contender"] == "eager (as trained)"}
    lines = ["| size | contender | ms / image | x as trained | share of fp32 peak |", "|---:|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['image_size']} | {r['contender']} | {r['ms_per_image']:.1f} | "
                     f"{base[r['image_size']] / r['ms_per_image']:.2f} | {100 * r['share_of_peak']:.1f}% |")
    return "\n".join(lines)
