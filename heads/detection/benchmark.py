"""Speed of our Faster R-CNN against torchvision's with the same depth and weights, in one process.

Both detectors hold the same weights (torchvision's random init, BatchNorm statistics perturbed,
converted with :func:`~heads.detection.convert.load_torchvision_detector`) and the same config
(torchvision's defaults; its ``min_size = max_size = image_size`` and mean 0 / std 1, so its
transform keeps the input as is). Contenders, timed interleaved (median over repeats):

* ``torchvision``: ``FasterRCNN`` on ``resnet_fpn_backbone`` (FrozenBatchNorm, stem + res2 frozen),
  called as users call it: a list of images, its internal transform included.
* ``ours_eager``: our model in eval/train mode on the NCHW batch.
* ``ours`` (inference only): :func:`~heads.detection.faster_rcnn.prepare_for_inference` (BN folded,
  channels-last; with ``amp``, conv and linear weights stored in the autocast dtype).

Training runs one SGD step (forward with targets, sum of losses, backward, step).

With ``count_ops`` each contender also runs once, untimed, under
:func:`~res_backbone.benchmark.count_dispatch`: the ATen operators it dispatches and the host syncs
among them. On a GPU at batch 1 a detector is bound by the host (launch overhead per operator), so
this count predicts the GPU ratio where no GPU is at hand.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import warnings
from typing import Callable, List, Optional

import torch

from res_backbone.benchmark import AMP_DTYPES, BenchResult, count_dispatch, time_interleaved
from res_backbone.inference import prepare_for_inference

from .convert import load_torchvision_detector
from .faster_rcnn import build_detector


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


def _autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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
    ``count_ops`` adds ``"dispatch"``: per mode and contender the :class:`~res_backbone.benchmark.DispatchCount`
    of one call, and ``ops_ratio`` (torchvision's operators / ours) in each ratio row. ``timed=False``
    (with ``count_ops``) skips the timings: ratio rows then hold ``ops_ratio`` only.

    Returns:
        ``{"model", "equivalence": {...}, "results": [BenchResult dicts], "ratios": [...]}``
        (and ``"dispatch"`` with ``count_ops``).
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
            with grad_mode(), _autocast(dev, amp):
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
    equivalence = {"ours_eager": compare_detections(outputs["torchvision"], outputs["ours_eager"]),
                   "ours": compare_detections(outputs["torchvision"], outputs["ours"])}
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
                with _autocast(dev, amp):
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
           "results": [r.to_dict() for r in results], "ratios": ratios}
    if count_ops:
        if not timed:
            ratios += [{"mode": mode, "contender": k} for mode, counts in dispatch.items() for k in counts if k != "torchvision"]
        for q in ratios:
            counts = dispatch[q["mode"]]
            q["ops_ratio"] = counts["torchvision"]["ops"] / counts[q["contender"]]["ops"]
        out["dispatch"] = dispatch
    return out
