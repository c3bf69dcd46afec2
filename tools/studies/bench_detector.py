"""Speed of our Faster R-CNN against torchvision's with the same depth and weights, in one process.

Both detectors hold the same weights (torchvision's random init, BatchNorm statistics perturbed,
converted with :func:`~heads.detection.convert.load_torchvision_detector`) and the same config
(torchvision's defaults; its ``min_size = max_size = image_size`` and mean 0 / std 1, so its
transform keeps the input as is). Contenders, timed interleaved (median over repeats):

* ``torchvision``: ``FasterRCNN`` on ``resnet_fpn_backbone`` (FrozenBatchNorm, stem + res2 frozen),
  called as users call it: a list of images, its internal transform included.
* ``ours_eager``: our model in eval/train mode on the NCHW batch.
* ``ours`` (inference only): :func:`~res_backbone.inference.prepare_for_inference` (BN folded,
  channels-last; with ``amp``, conv and linear weights stored in the autocast dtype).

Training runs one SGD step (forward with targets, sum of losses, backward, step).

With ``count_ops`` each contender also runs once, untimed, under
:func:`~studies.timing.count_dispatch`: the ATen operators it dispatches and the host syncs
among them. On a GPU at batch 1 a detector is bound by the host (launch overhead per operator), so
this count predicts the GPU ratio where no GPU is at hand.

Equivalence: in float32 every run checks ``ours_eager`` and ``ours`` against torchvision's
detections (:func:`compare_detections`) and states whether they are within :data:`BOX_TOLERANCE_PX`
and :data:`SCORE_TOLERANCE` (:func:`equivalence_failures`; ``tools/bench.py detector`` exits 1
when not). Under ``amp`` two libraries' rounding differs, so their paired difference says little:
each contender is compared with its own float32 result instead (:func:`amp_drift`).
"""
from __future__ import annotations

import copy
import statistics
import warnings
from typing import Callable, List, Optional

import torch

from heads.detection.convert import load_torchvision_detector
from heads.detection.faster_rcnn import build_detector
from res_backbone.inference import prepare_for_inference

from .timing import AMP_DTYPES, BenchResult, autocast, count_dispatch, time_interleaved


#: float32 equivalence with torchvision, max over paired detections. The eager path runs torchvision's
#: arithmetic (differences ~1e-4 px come from our RoIAlign's summation order); the fast path folds
#: BatchNorm into the convolutions and runs channels-last kernels, whose float32 rounding over 50
#: layers reaches ~1e-3 px on ResNet-50-FPN at 512 px (docs/bench_detector_cpu.md)
BOX_TOLERANCE_PX = {"ours_eager": 1e-3, "ours": 3e-3}
SCORE_TOLERANCE = 1e-4


def build_pair(depth: str, num_classes: int, image_size: int, seed: int = 0):
    """torchvision's and our detector with identical weights (frozen BN, stem + res2 frozen)."""
    from torchvision.models.detection import FasterRCNN as TVFasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(seed)
    body = resnet_fpn_backbone(backbone_name=depth, weights=None, trainable_layers=3)
    tv = TVFasterRCNN(body, num_classes=num_classes + 1, min_size=image_size, max_size=image_size,
                      image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    with torch.no_grad():
        for m in tv.modules():
            if type(m).__name__ == "FrozenBatchNorm2d":
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        # spread objectness and class scores, so NMS and post-processing see a realistic workload
        # (torchvision's init gives ~1/(K+1) class scores: no detection above 0.05, nothing to compare)
        tv.rpn.head.cls_logits.weight.normal_(0, 0.1)
        tv.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frozen BN without pretrained: weights come next
        ours = build_detector(depth, num_classes=num_classes, norm="frozen_bn", frozen_stages=2)
    load_torchvision_detector(ours, tv.state_dict())
    return tv, ours


def _targets(batch: int, size: int, device: torch.device, num_classes: int) -> List[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = 16 + torch.rand(4, 2, generator=g) * size * 0.35
        out.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                    "labels": torch.randint(1, num_classes + 1, (4,), generator=g).to(device)})
    return out


def compare_detections(ref: List[dict], out: List[dict]) -> dict:
    """How far ``out`` is from ``ref``: each reference detection is paired with the same-label
    detection of ``out`` whose box is nearest (so two near-tied scores swapping places by float
    rounding do not count as a difference).

    Returns:
        ``{"same_labels"`` (same multiset of labels per image), ``"num_detections"``,
        ``"max_box_diff_px"``, ``"max_score_diff"}`` (max over paired detections).
    """
    same, box, score = True, 0.0, 0.0
    for r, o in zip(ref, out):
        if not torch.equal(r["labels"].sort().values, o["labels"].sort().values):
            same = False
            continue
        if not len(r["labels"]):
            continue
        dist = torch.cdist(r["boxes"].double(), o["boxes"].double(), p=float("inf"))
        dist[r["labels"][:, None] != o["labels"][None, :]] = float("inf")
        d, j = dist.min(dim=1)
        box = max(box, float(d.max()))
        score = max(score, float((r["scores"] - o["scores"][j]).abs().max()))
    return {"same_labels": same, "num_detections": [len(r["labels"]) for r in ref],
            "max_box_diff_px": box if same else None, "max_score_diff": score if same else None}


def within_tolerance(contender: str, diff: dict) -> bool:
    """Whether one :func:`compare_detections` result meets the stated float32 tolerance."""
    return bool(diff["same_labels"]) and diff["max_box_diff_px"] <= BOX_TOLERANCE_PX[contender] \
        and diff["max_score_diff"] <= SCORE_TOLERANCE


def equivalence_failures(run: dict) -> List[str]:
    """One line per contender of a :func:`bench_detector` result beyond the float32 tolerance (none under amp)."""
    return [f"{run['model']} {k}: same labels {e['same_labels']}, max |box diff| {e['max_box_diff_px']} px "
            f"(tolerance {BOX_TOLERANCE_PX[k]:g}), max |score diff| {e['max_score_diff']} (tolerance {SCORE_TOLERANCE:g})"
            for k, e in run.get("equivalence", {}).items() if not e["within_tolerance"]]


def amp_drift(ref: List[dict], out: List[dict], min_iou: float = 0.5) -> dict:
    """How far a contender's detections under autocast (``out``) are from its own float32 ones (``ref``).

    Each float32 detection is matched with the same-label detection of ``out`` that overlaps it most
    (IoU >= ``min_iou``); a low-precision run may keep or drop detections near the score threshold.

    Returns:
        ``{"num_detections": [[float32 per image], [amp per image]], "matched_fraction"`` (of the
        float32 detections), ``"max_box_diff_px", "median_box_diff_px", "max_score_diff"}`` over the
        matched pairs (``None`` when nothing matched).
    """
    from torchvision.ops import box_iou

    total, boxes, scores = 0, [], []
    for r, o in zip(ref, out):
        total += len(r["labels"])
        if not len(r["labels"]) or not len(o["labels"]):
            continue
        iou = box_iou(r["boxes"].float(), o["boxes"].float())
        iou[r["labels"][:, None] != o["labels"][None, :]] = 0.0
        best, j = iou.max(dim=1)
        ok = best >= min_iou
        boxes += (r["boxes"][ok].float() - o["boxes"][j[ok]].float()).abs().amax(dim=1).tolist()
        scores += (r["scores"][ok].float() - o["scores"][j[ok]].float()).abs().tolist()
    return {"num_detections": [[len(r["labels"]) for r in ref], [len(o["labels"]) for o in out]],
            "matched_fraction": len(boxes) / total if total else None,
            "max_box_diff_px": max(boxes) if boxes else None,
            "median_box_diff_px": statistics.median(boxes) if boxes else None,
            "max_score_diff": max(scores) if scores else None}


def bench_detector(
    depth: str,
    *,
    image_size: int = 512,
    batch_size: int = 1,
    train_batch_size: int = 2,
    num_classes: int = 80,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    amp: str = "none",
    roi_align: str = "auto",
    count_ops: bool = False,
    timed: bool = True,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Time inference and one training step of torchvision's and our Faster R-CNN-FPN on ``depth``.

    ``roi_align`` sets our pooler's implementation (:class:`~heads.detection.roi_heads.MultiLevelRoIAlign`'s ``impl``).
    ``count_ops`` adds ``"dispatch"``: per mode and contender the :class:`~studies.timing.DispatchCount`
    of one call, and ``ops_ratio`` (torchvision's operators / ours) in each ratio row. ``timed=False``
    (with ``count_ops``) skips the timings: ratio rows then hold ``ops_ratio`` only.

    Returns:
        ``{"model", "equivalence": {...}, "results": [BenchResult dicts], "ratios": [...]}``
        (and ``"dispatch"`` with ``count_ops``). In float32 ``equivalence`` maps ``ours_eager`` and
        ``ours`` to :func:`compare_detections` against torchvision plus ``within_tolerance``; under
        ``amp`` it is empty and ``"amp_drift"`` maps every contender to :func:`amp_drift` against its
        own float32 result.
    """
    if not (timed or count_ops):
        raise ValueError("nothing to measure: timed=False needs count_ops=True")
    dev = torch.device(device)
    tv, ours = build_pair(depth, num_classes, image_size)
    ours.roi_heads.pooler.impl = roi_align
    tv, ours = tv.to(dev).eval(), ours.to(dev).eval()
    fast = prepare_for_inference(ours, autocast_dtype=AMP_DTYPES[amp])
    x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)).to(dev)
    sizes = [(image_size, image_size)] * batch_size
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def infer(model, args, grad_mode=torch.inference_mode):
        def run():
            with grad_mode(), autocast(dev, amp):
                return model(*args)
        return run

    infer_args = {"torchvision": (tv, (list(x),)), "ours_eager": (ours, (x, sizes)), "ours": (fast, (x_cl, sizes))}
    infer_fns = {k: infer(m, a) for k, (m, a) in infer_args.items()}
    outputs = {k: fn() for k, fn in infer_fns.items()}
    dispatch = {}
    if count_ops:  # under no_grad: inference_mode would count composite operators before they decompose
        dispatch["infer"] = {}
        for k, (m, a) in infer_args.items():
            fn = infer(m, a, torch.no_grad)
            fn()  # warm, as every call after the first (caches keyed on the grad mode: frozen-BN affine)
            dispatch["infer"][k] = count_dispatch(fn)[1].to_dict()
    equivalence, drift = {}, {}
    if AMP_DTYPES[amp] is None:
        for k in ("ours_eager", "ours"):
            equivalence[k] = compare_detections(outputs["torchvision"], outputs[k])
            equivalence[k]["within_tolerance"] = within_tolerance(k, equivalence[k])
    else:  # each library against its own float32 result (the fast path: its float32 copy)
        fp32_args = dict(infer_args, ours=(prepare_for_inference(ours), (x_cl, sizes)))
        with torch.inference_mode():
            drift = {k: amp_drift(m(*a), outputs[k]) for k, (m, a) in fp32_args.items()}
    results = []
    if timed:
        times = time_interleaved(infer_fns, repeats, warmup, dev, progress)
        results += [BenchResult(depth, k, "infer", batch_size, t) for k, t in times.items()]

    if train_batch_size:
        xt = torch.randn(train_batch_size, 3, image_size, image_size).to(dev)
        targets = _targets(train_batch_size, image_size, dev, num_classes)
        tsizes = [(image_size, image_size)] * train_batch_size

        def train(model, call):
            model = copy.deepcopy(model).train()
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

            def step():
                with autocast(dev, amp):
                    losses = call(model)
                opt.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                opt.step()
            return step

        train_fns = {
            "torchvision": train(tv, lambda m: m(list(xt), [dict(t) for t in targets])),
            "ours_eager": train(ours, lambda m: m(xt, tsizes, targets)),
        }
        if count_ops:
            for fn in train_fns.values():
                fn()  # the first step allocates the momentum buffers
            dispatch["train"] = {k: count_dispatch(fn)[1].to_dict() for k, fn in train_fns.items()}
        if timed:
            times = time_interleaved(train_fns, repeats, warmup, dev, progress)
            results += [BenchResult(depth, k, "train", train_batch_size, t) for k, t in times.items()]

    base = {(r.mode,): r for r in results if r.contender == "torchvision"}
    # the machine's speed drifts between repeats (this project's 2-core CPU: +-15%), and the contenders
    # are timed interleaved, so the median of the per-repeat ratios is the steadier statistic
    ratios = [{"mode": r.mode, "contender": r.contender, "speedup_vs_torchvision": base[(r.mode,)].median_s / r.median_s,
               "speedup_paired_median": statistics.median(
                   t / o for t, o in zip(base[(r.mode,)].times_s, r.times_s))}
              for r in results if r.contender != "torchvision"]
    out = {"model": f"{depth}_fpn", "image_size": image_size, "roi_align": roi_align, "equivalence": equivalence,
           **({"amp_drift": drift} if drift else {}), "results": [r.to_dict() for r in results], "ratios": ratios}
    if count_ops:
        if not timed:
            ratios += [{"mode": mode, "contender": k} for mode, counts in dispatch.items() for k in counts if k != "torchvision"]
        for q in ratios:
            counts = dispatch[q["mode"]]
            q["ops_ratio"] = counts["torchvision"]["ops"] / counts[q["contender"]]["ops"]
        out["dispatch"] = dispatch
    return out


def print_run(run: dict) -> None:
    """The tables of one :func:`bench_detector` result: timings, operator counts, equivalence or amp drift."""
    speed = {(q["mode"], q["contender"]): q for q in run["ratios"]}
    if run["results"]:
        print(f"\n{run['model']}  (ms per call, median; speed-up = torchvision time / ours, of the medians and "
              "the median of the per-repeat ratios)")
        print(f"{'mode':<6} {'batch':>5} {'contender':<12} {'ms/call':>9} {'speed-up':>9} {'paired':>7}")
    else:
        print(f"\n{run['model']}  (not timed: --count-only)")
    for r in run["results"]:
        q = speed.get((r["mode"], r["contender"]))
        print(f"{r['mode']:<6} {r['batch_size']:>5} {r['contender']:<12} {r['median_ms']:>9.1f} "
              + (f"{q['speedup_vs_torchvision']:>9.2f} {q['speedup_paired_median']:>7.2f}" if q else f"{'':>9}"))
    if "dispatch" in run:
        print(f"\n{'mode':<6} {'contender':<12} {'ops':>6} {'syncs':>6} {'ops ratio':>9}   "
              "(ATen operators dispatched per call and host syncs among them; ratio = torchvision's / ours)")
        for mode, counts in run["dispatch"].items():
            for k, c in counts.items():
                q = speed.get((mode, k))
                print(f"{mode:<6} {k:<12} {c['ops']:>6} {c['syncs']:>6} " + (f"{q['ops_ratio']:>9.2f}" if q else f"{'':>9}"))
    for k, e in run["equivalence"].items():
        verdict = "within" if e["within_tolerance"] else "BEYOND"
        print(f"equivalence torchvision vs {k} (float32): same labels {e['same_labels']}, detections "
              f"{e['num_detections']}, max |box diff| {e['max_box_diff_px']} px, max |score diff| {e['max_score_diff']}: "
              f"{verdict} the tolerance ({BOX_TOLERANCE_PX[k]:g} px, {SCORE_TOLERANCE:g})")
    for k, d in run.get("amp_drift", {}).items():
        print(f"{k} under autocast vs its own float32 result: detections {d['num_detections'][1]} vs "
              f"{d['num_detections'][0]}, {d['matched_fraction']} matched (same label, IoU >= 0.5), box diff max "
              f"{d['max_box_diff_px']} px / median {d['median_box_diff_px']} px, max |score diff| {d['max_score_diff']}")
