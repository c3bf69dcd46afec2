"""Throughput of this project's ResNets against torchvision's and timm's, measured in one process.

Contenders are timed interleaved (:func:`~studies.timing.time_interleaved`; median over repeats).
Every library runs in both memory formats, so the table says which part of our gain comes from the
memory format (which anyone can use) and which from folding BatchNorm (which needs our fast path):

===================  ============================================================================
``torchvision``      torchvision's model, ``.eval()``, ``torch.inference_mode()``, NCHW input
``torchvision_cl``   the same with channels-last weights and input (its best eager setting)
``timm``/``timm_cl`` timm's model, likewise
``ours_eager``       our model run exactly like the baselines (NCHW, no fast path)
``ours_cl``          our model, channels-last weights and input, BatchNorm not folded
``ours``             :func:`~res_backbone.inference.prepare_for_inference`: BN folded, channels-last
===================  ============================================================================

Mode ``features`` times timm 1.0's feature API against the plain forward on the same model and stages
(``ours_eager``, NCHW): ``ours_forward_features`` (stem + every stage, the last map),
``ours_intermediates_last`` (``forward_intermediates(x, indices=1)``: the same stages and map, so only the
API's own cost) and ``ours_intermediates_all`` (every level's map kept alive, as detection adapters ask);
:func:`intermediates_overhead` gives the time ratios.

With ``ablation=True`` also ``ours_fold`` (BN folded only, NCHW input) and ``ours_fused`` (``ours``
plus fused ReLU/residual epilogues, ``fuse=True``). :func:`attribution` splits ``ours / ours_eager``
into ``memory_format = ours_cl / ours_eager`` and ``bn_folding = ours / ours_cl``.

Training contenders run one step (forward, cross-entropy, backward, SGD with momentum) in
``train()`` mode: every library in NCHW and channels-last (``ours`` is ours channels-last, the
layout this project's training tools use; there is no BN folding in training).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from res_backbone.complexity import count_macs, count_params
from res_backbone.inference import prepare_for_inference
from res_backbone.registry import create_model, get_arch

from .timing import AMP_DTYPES, BenchResult, autocast, time_interleaved

#: the baselines: each library's model in NCHW and in channels-last
BASELINES = ("torchvision", "torchvision_cl", "timm", "timm_cl")
INFER_CONTENDERS = BASELINES + ("ours_eager", "ours_cl", "ours")
ABLATION_CONTENDERS = ("ours_fold", "ours_fused")
TRAIN_CONTENDERS = ("torchvision", "torchvision_cl", "timm", "timm_cl", "ours_eager", "ours")
FEATURE_CONTENDERS = ("ours_forward_features", "ours_intermediates_last", "ours_intermediates_all")
_CHANNELS_LAST = ("torchvision_cl", "timm_cl", "ours_cl", "ours", "ours_fused")


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


def _channels_last(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _infer_fn(model: nn.Module, x: torch.Tensor, device: torch.device, amp: str) -> Callable[[], object]:
    def run():
        with torch.inference_mode(), autocast(device, amp):
            return model(x)

    return run


def _features_fns(model: nn.Module, x: torch.Tensor, device: torch.device, amp: str) -> Dict[str, Callable[[], object]]:
    """``forward_features``, ``forward_intermediates`` of the last level and of every level, on one input."""
    def call(method, **kwargs):
        def run():
            with torch.inference_mode(), autocast(device, amp):
                return method(x, **kwargs)

        return run

    return dict(zip(FEATURE_CONTENDERS, (call(model.forward_features), call(model.forward_intermediates, indices=1),
                                         call(model.forward_intermediates))))


def _train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, amp: str) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _inputs(x: torch.Tensor, names: Iterable[str]) -> Dict[str, torch.Tensor]:
    cl = x.contiguous(memory_format=torch.channels_last)
    return {k: (cl if k in _CHANNELS_LAST else x) for k in names}


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
        repeats, warmup: see :func:`~studies.timing.time_interleaved`.
        device: ``cpu`` or ``cuda``.
        amp: ``none``, ``bf16`` or ``fp16`` autocast for every contender.
        ablation: also time ``ours_fold`` and ``ours_fused`` (see the module docstring).
        progress: called after every timed or warm-up call.

    Returns:
        ``{"model", "results": [BenchResult.to_dict()...], "ratios": [...], "attribution": [...],
        "max_rel_diff": {...}}``; each ratio row is ``{mode, batch_size, contender, vs_<baseline>...}``
        (img/s ratios against every baseline), each attribution row see :func:`attribution`.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    dev = torch.device(device)
    models = {k: m.to(dev).eval() for k, m in build_contenders(name).items()}
    infer_models = {
        "torchvision": models["torchvision"], "torchvision_cl": _channels_last(models["torchvision"]),
        "timm": models["timm"], "timm_cl": _channels_last(models["timm"]),
        "ours_eager": models["ours"], "ours_cl": _channels_last(models["ours"]),
        "ours": prepare_for_inference(models["ours"]),
    }
    if ablation:
        infer_models["ours_fold"] = prepare_for_inference(models["ours"], channels_last=False)
        infer_models["ours_fused"] = prepare_for_inference(models["ours"], fuse=True)
    results: List[BenchResult] = []
    diffs: Dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for bs in batch_sizes:
        inputs = _inputs(torch.randn(bs, 3, image_size, image_size, generator=gen).to(dev), infer_models)
        fns = {k: _infer_fn(m, inputs[k], dev, amp) for k, m in infer_models.items()}
        ref = fns["torchvision"]()
        for k in list(fns)[1:]:
            diffs[f"{k}_b{bs}"] = max_rel_diff(fns[k](), ref)
        times = time_interleaved(fns, repeats, warmup, dev, progress)
        results += [BenchResult(name, k, "infer", bs, t) for k, t in times.items()]
        feats = _features_fns(models["ours"], inputs["ours_eager"], dev, amp)
        diffs[f"intermediates_final_b{bs}"] = max_rel_diff(feats["ours_intermediates_all"]()[0],
                                                           feats["ours_forward_features"]())
        times = time_interleaved(feats, repeats, warmup, dev, progress)
        results += [BenchResult(name, k, "features", bs, t) for k, t in times.items()]
    if train_batch_size:
        x = torch.randn(train_batch_size, 3, image_size, image_size, generator=gen).to(dev)
        y = torch.randint(0, 1000, (train_batch_size,), generator=gen).to(dev)
        # every contender trains its own copy of the weights; "ours" trains channels-last, the layout
        # the training tools use (--channels-last), "ours_eager" NCHW like the plain baselines
        train_models = {"torchvision": copy.deepcopy(models["torchvision"]), "timm": copy.deepcopy(models["timm"]),
                        "ours_eager": copy.deepcopy(models["ours"])}
        train_models.update(torchvision_cl=_channels_last(models["torchvision"]), timm_cl=_channels_last(models["timm"]),
                            ours=_channels_last(models["ours"]))
        inputs = _inputs(x, train_models)
        fns = {k: _train_fn(train_models[k], inputs[k], y, dev, amp) for k in TRAIN_CONTENDERS}
        times = time_interleaved(fns, repeats, warmup, dev, progress)
        results += [BenchResult(name, k, "train", train_batch_size, t) for k, t in times.items()]
    return {
        "model": name,
        "results": [r.to_dict() for r in results],
        "ratios": ratios(results),
        "attribution": attribution(results),
        "intermediates_overhead": intermediates_overhead(results),
        "max_rel_diff": diffs,
    }


def intermediates_overhead(results: Iterable[BenchResult]) -> List[dict]:
    """Per batch size ``{batch_size, forward_features_ms, intermediates_last_ms, intermediates_all_ms,
    last_ratio, all_ratio}``: median times and their ratios to ``forward_features`` (1.0 = no overhead)."""
    ms = {(r.batch_size, r.contender): r.median_s * 1e3 for r in results if r.mode == "features"}
    rows = []
    for bs in dict.fromkeys(b for b, _ in ms):
        base, last, every = (ms[bs, k] for k in FEATURE_CONTENDERS)
        rows.append({"batch_size": bs, "forward_features_ms": base, "intermediates_last_ms": last,
                     "intermediates_all_ms": every, "last_ratio": last / base, "all_ratio": every / base})
    return rows


def ratios(results: Iterable[BenchResult]) -> List[dict]:
    """img/s of every ``ours*`` contender divided by each baseline's, per mode and batch size."""
    results = list(results)
    by_key = {(r.mode, r.batch_size, r.contender): r.img_per_s for r in results}
    rows = []
    for r in results:
        if r.contender in BASELINES or r.mode == "features":  # features: ours against ours, see intermediates_overhead
            continue
        row = {"mode": r.mode, "batch_size": r.batch_size, "contender": r.contender}
        for base in BASELINES:
            ref = by_key.get((r.mode, r.batch_size, base))
            row[f"vs_{base}"] = r.img_per_s / ref if ref else None
        rows.append(row)
    return rows


def attribution(results: Iterable[BenchResult]) -> List[dict]:
    """Where our speed-up comes from, per mode and batch size (img/s ratios).

    Rows ``{mode, batch_size, memory_format, bn_folding, total, vs_torchvision_best, vs_timm_best,
    baseline_memory_format: {torchvision, timm}}``: ``memory_format`` = ``ours_cl / ours_eager``
    (inference) or ``ours / ours_eager`` (training, where nothing is folded), ``bn_folding`` =
    ``ours / ours_cl`` (inference only, ``None`` in training), ``total`` = ``ours / ours_eager``,
    ``vs_<lib>_best`` = ``ours`` against the faster of that library's two memory formats, and
    ``baseline_memory_format`` what channels-last gives the baselines themselves.
    """
    ips = {(r.mode, r.batch_size, r.contender): r.img_per_s for r in results}
    rows = []
    for mode, bs in dict.fromkeys((m, b) for m, b, _ in ips):
        get = lambda k: ips.get((mode, bs, k))  # noqa: E731
        eager, cl, ours = get("ours_eager"), get("ours_cl"), get("ours")
        if not (eager and ours):
            continue
        row = {"mode": mode, "batch_size": bs, "memory_format": (cl or ours) / eager,
               "bn_folding": ours / cl if cl else None, "total": ours / eager}
        for lib in ("torchvision", "timm"):
            best = max(v for v in (get(lib), get(f"{lib}_cl")) if v)
            row[f"vs_{lib}_best"] = ours / best
        row["baseline_memory_format"] = {lib: get(f"{lib}_cl") / get(lib) for lib in ("torchvision", "timm")}
        rows.append(row)
    return rows


def count_calls(batch_sizes: Sequence[int], train: bool, repeats: int, warmup: int, ablation: bool = False) -> int:
    """How many timed and warm-up calls :func:`bench_model` makes (for a progress bar's total)."""
    infer = len(INFER_CONTENDERS) + (len(ABLATION_CONTENDERS) if ablation else 0)
    infer += len(FEATURE_CONTENDERS)
    return (repeats + warmup) * (infer * len(batch_sizes) + (len(TRAIN_CONTENDERS) if train else 0))


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def attribution_lines(run: dict) -> List[str]:
    """Plain-text lines: the gain of ``ours`` over ``ours_eager`` split into memory format and BN folding."""
    lines = []
    for a in run.get("attribution", []):
        base = a["baseline_memory_format"]
        lines.append(f"{a['mode']:<6} batch {a['batch_size']:>3}: ours / ours_eager {a['total']:.2f}x = memory format "
                     f"{a['memory_format']:.2f}x * BN folding {_fmt(a['bn_folding'])}x; vs the best of torchvision "
                     f"{a['vs_torchvision_best']:.2f}x, of timm {a['vs_timm_best']:.2f}x (channels-last gives "
                     f"torchvision {base['torchvision']:.2f}x, timm {base['timm']:.2f}x)")
    return lines


def print_run(run: dict) -> None:
    """The table of one :func:`bench_model` result, then its attribution lines."""
    print(f"\n{run['model']}  (img/s, median)")
    print(f"{'mode':<8} {'batch':>5} {'contender':<23} {'img/s':>8} {'ms/call':>9} {'vs tv':>7} {'vs tv_cl':>8} "
          f"{'vs timm':>8} {'vs timm_cl':>10}")
    rat = {(r["mode"], r["batch_size"], r["contender"]): r for r in run["ratios"]}
    for r in run["results"]:
        q = rat.get((r["mode"], r["batch_size"], r["contender"]))
        vs = (f"{_fmt(q['vs_torchvision']):>7} {_fmt(q['vs_torchvision_cl']):>8} {_fmt(q['vs_timm']):>8} "
              f"{_fmt(q['vs_timm_cl']):>10}" if q else "")
        print(f"{r['mode']:<8} {r['batch_size']:>5} {r['contender']:<23} {r['img_per_s']:>8.2f} {r['median_ms']:>9.1f} {vs}")
    for line in attribution_lines(run):
        print(line)
    for o in run.get("intermediates_overhead", []):
        print(f"features batch {o['batch_size']:>3}: forward_features {o['forward_features_ms']:.2f} ms; "
              f"forward_intermediates, same stages: last level {o['last_ratio']:.3f}x the time, "
              f"every level kept {o['all_ratio']:.3f}x")


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
            vs = f"{_fmt(q['vs_torchvision'])} | {_fmt(q['vs_timm'])}" if q else " | "
            name = f"**{r['contender']}**" if r["contender"] == "ours" else r["contender"]
            lines.append(f"| {r['mode']} | {r['batch_size']} | {name} | {r['img_per_s']:.2f} | {r['median_ms']:.1f} | {vs} |")
        if run.get("attribution"):
            lines += ["", "Where the gain comes from:", ""] + [f"* {line}" for line in attribution_lines(run)]
    return "\n".join(lines) + "\n"


def model_summary(names: Sequence[str], image_size: int = 224) -> List[dict]:
    """Parameters and multiply-adds of each model, for both bottleneck stride placements (``bench.py summary``).

    CIFAR nets are counted at their own 32x32 input (the paper's Table 6 setting), the others at ``image_size``.
    """
    rows = []
    for name in names:
        side = get_arch(name).get("default_cfg", {}).get("input_size", (3, image_size))[-1]
        size = (3, side, side)
        row = {"model": name, "input_size": side, "params": count_params(create_model(name))}
        row["macs_v1_5"] = count_macs(create_model(name), size)
        row["macs_stride_in_1x1"] = count_macs(create_model(name, stride_in_1x1=True), size)
        rows.append(row)
    return rows


def print_model_summary(rows: Sequence[dict]) -> None:
    print(f"{'model':<10} {'input':>5} {'params (M)':>10} {'GMACs v1.5':>11} {'GMACs paper':>12}")
    for r in rows:
        print(f"{r['model']:<10} {r['input_size']:>5} {r['params'] / 1e6:>10.3f} {r['macs_v1_5'] / 1e9:>11.3f} "
              f"{r['macs_stride_in_1x1'] / 1e9:>12.3f}")
