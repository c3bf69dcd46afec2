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

__all__ = ["bench_deploy", "bench_deploy_models", "matmul_peak_gflops"]


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


def _onnx_session(model, side: int, path: str, threads: int, int8_calibration: Sequence[torch.Tensor] = ()):
    """An onnxruntime CPU session of ``model``'s detector file (:func:`heads.export.export_model`); with
    ``int8_calibration``, the file quantized statically (QOperator, uint8 activations, int8 weights) on those inputs."""
    import numpy as np
    import onnxruntime as ort

    from heads.export import export_model

    export_model(model, {"task": "detection", "image_size": side}, "onnx", path)
    if int8_calibration:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        feeds = iter([{"images": x.numpy(), "image_sizes": np.array([x.shape[-2:]], dtype=np.int64)}
                      for x in int8_calibration])

        class Reader(CalibrationDataReader):
            def get_next(self):
                return next(feeds, None)

        qpath = path.replace(".onnx", "_int8.onnx")
        quantize_static(path, qpath, Reader(), quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "Relu", "Add", "MaxPool"])
        path = qpath
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        b, s, l = sess.run(None, {"images": x.numpy(), "image_sizes": np.array([x.shape[-2:]], dtype=np.int64)})
        return {"boxes": torch.from_numpy(b), "scores": torch.from_numpy(s), "labels": torch.from_numpy(l)}
    return run


#: contenders of :func:`bench_deploy_models` whose detections differ from torchvision's by construction
#: (int8 arithmetic): compared, not held to the float32 tolerance
APPROXIMATE = ("ONNX Runtime int8",)


def bench_deploy_models(models: Sequence[str], sizes: Sequence[int], repeats: int = 5, warmup: int = 1,
                        threads: int = 0, compile: bool = True, onnx: bool = True, int8: bool = True, workdir: str = ".",
                        num_classes: int = 3, on_step=None) -> Dict:
    """Per-image latency of torchvision's ``FasterRCNN`` and every way of running ours, with the same weights.

    For each ResNet depth in ``models`` and square side in ``sizes``: torchvision's eager model (``min_size =
    max_size =`` the side, NCHW and channels-last: its best), ours as built (what trains), its inference copy,
    ``torch.compile`` of the copy (``compile``), the exported ONNX file through onnxruntime's CPU provider (``onnx``) and
    (``int8``) that file quantized statically, calibrated on two other inputs. Timed interleaved on one input per (depth, side); every
    contender's detections are compared with torchvision's (:func:`studies.bench_detector.compare_detections`).
    """
    import copy
    import os

    from studies.bench_detector import BOX_TOLERANCE_PX, SCORE_TOLERANCE, build_pair, compare_detections

    if threads:
        torch.set_num_threads(threads)
    peak = matmul_peak_gflops(torch.get_num_threads())
    rows: List[Dict] = []
    for depth in models:
        for side in sizes:
            tv, ours = build_pair(depth, num_classes, side)
            tv.eval(), ours.eval()
            tv_cl = copy.deepcopy(tv).to(memory_format=torch.channels_last)
            fast = ours.inference_copy()
            g = torch.Generator().manual_seed(side)
            x, *calib = [torch.rand(1, 3, side, side, generator=g) for _ in range(3)]
            s = [(side, side)]
            one = lambda out: out[0] if isinstance(out, list) else out  # noqa: E731
            fns = {"torchvision (NCHW)": lambda: tv([x[0]])[0],
                   "torchvision (channels-last)": lambda: tv_cl([x[0]])[0],
                   "ours as built": lambda: one(ours(x, s)),
                   "inference copy": lambda: one(fast(x, s))}
            build_s = {}
            if compile:
                compiled = torch.compile(fast)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    compiled(x, s)
                build_s["torch.compile(inference copy)"] = time.perf_counter() - t0
                fns["torch.compile(inference copy)"] = lambda: one(compiled(x, s))
            path = os.path.join(workdir, f"bench_{depth}_{side}.onnx")
            files = ([("ONNX Runtime", ())] if onnx else []) + ([("ONNX Runtime int8", calib)] if onnx and int8 else [])
            for name, cal in files:
                t0 = time.perf_counter()
                run = _onnx_session(ours, side, path, threads, cal)
                build_s[name] = time.perf_counter() - t0
                fns[name] = lambda run=run: run(x)
            with torch.inference_mode():
                ref = fns["torchvision (NCHW)"]()
                diffs = {name: compare_detections([ref], [fn()]) for name, fn in fns.items()}
                times = time_interleaved(fns, repeats, warmup, on_step=on_step)
                gmacs = _macs(ours, x, s) / 1e9
            best_tv = min(statistics.median(times[k]) for k in ("torchvision (NCHW)", "torchvision (channels-last)"))
            for name, t in times.items():
                ms = 1000 * statistics.median(t)
                d = diffs[name]
                same = name.startswith("torchvision") or (name not in APPROXIMATE and (
                    d["same_labels"] and d["max_box_diff_px"] <= BOX_TOLERANCE_PX["ours"]
                    and d["max_score_diff"] <= SCORE_TOLERANCE))
                rows.append({"model": f"{depth}-FPN", "image_size": side, "contender": name, "ms_per_image": round(ms, 1),
                             "x_torchvision_best": round(1000 * best_tv / ms, 3), "gmacs": round(gmacs, 2),
                             "share_of_peak": round(2 * gmacs / (ms / 1000) / peak, 3),
                             "build_s": round(build_s[name], 1) if name in build_s else None,
                             "num_detections": d["num_detections"][0], "same_labels": d["same_labels"],
                             "max_box_diff_px": d["max_box_diff_px"], "max_score_diff": d["max_score_diff"],
                             "within_tolerance": bool(same)})
    return {"peak_gflops": round(peak, 1), "rows": rows, "tolerance": {"box_px": BOX_TOLERANCE_PX["ours"],
            "score": SCORE_TOLERANCE}, "environment": environment(torch.get_num_threads())}


def markdown_models(result: Dict) -> str:
    """:func:`bench_deploy_models` rows as a markdown table."""
    lines = ["| model | size | contender | ms / image | x torchvision's best | share of fp32 peak | same detections |",
             "|---|---:|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        if r["contender"].startswith("torchvision"):
            same = "reference" if r["contender"].endswith("(NCHW)") else "yes" if r["same_labels"] else "no"
        elif r["contender"] in APPROXIMATE:
            same = f"approximate (int8): labels {'the same' if r['same_labels'] else 'differ'}" + (
                f", boxes within {r['max_box_diff_px']:.1f} px" if r["same_labels"] else "")
        elif r["same_labels"]:
            same = f"{'yes' if r['within_tolerance'] else 'no'}: boxes {r['max_box_diff_px']:.1e} px, " \
                   f"scores {r['max_score_diff']:.1e}"
        else:
            same = "no: labels differ" + (" (int8 arithmetic)" if r["contender"] in APPROXIMATE else "")
        lines.append(f"| {r['model']} | {r['image_size']} | {r['contender']} | {r['ms_per_image']:.1f} | "
                     f"{r['x_torchvision_best']:.2f} | {100 * r['share_of_peak']:.1f}% | {same} |")
    return "\n".join(lines)


def markdown(result: Dict) -> str:
    """The rows as a markdown table, with the speed-up over the model as trained at the same size."""
    base = {r["image_size"]: r["ms_per_image"] for r in result["rows"] if r["contender"] == "eager (as trained)"}
    lines = ["| size | contender | ms / image | x as trained | share of fp32 peak |", "|---:|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['image_size']} | {r['contender']} | {r['ms_per_image']:.1f} | "
                     f"{base[r['image_size']] / r['ms_per_image']:.2f} | {100 * r['share_of_peak']:.1f}% |")
    return "\n".join(lines)
