#!/usr/bin/env python
"""The transfer study: does Fashion-MNIST pre-training help detection and localization at equal time?

    python tools/transfer_study.py --output docs/transfer --budget-minutes 45     # the study, ~45 min, 2-core CPU
    python tools/transfer_study.py --cls-checkpoint runs/fmnist_cls_r18/checkpoint_best.pt ...   # reuse step 1
    python tools/transfer_study.py --quick --fmnist-root /tmp/fake --output /tmp/ts    # smoke test, seconds

1. Pre-training: a resnet18 classifier on the Fashion-MNIST *train* split (``cls_run``, grey input,
   --pretrain-iters iterations, images inverted with probability --pretrain-invert), or the given
   --cls-checkpoint.
2. Detection: canvases of 1-4 Fashion-MNIST *test-split* items on textured backgrounds
   (``res_backbone.data.detection_fmnist``; items never seen in pre-training; train and val canvases
   use disjoint items). A resnet18-FPN Faster R-CNN is trained in four arms (``transfer_study.ARMS``:
   from scratch; pretrained with frozen BN; pretrained, fine-tune all; pretrained with the backbone
   frozen for the first quarter) for the SAME training time each, COCO AP on the val canvases
   measured --num-evals times (evaluation time not counted).
3. Localization: the same four arms on the built-in single-object set (``localization_fmnist``:
   train-split items for training, unseen test-split items for validation), ILSVRC top-1
   localization error.

The grey classifier feeds RGB canvases through the pipeline of ``res_backbone.transfer``: first conv
``w/3`` per colour channel, the grey mean/std repeated. Budget: what --budget-minutes leaves after
step 1, less 15% kept for rendering, model building and evaluation, is split between the tasks
(--det-share, 70% detection) and equally between the arms: about 6.5 and 2.8 minutes of training per
detection and localization arm at the defaults; --det-minutes / --loc-minutes set them directly.
--clock cpu counts this process's CPU time instead of wall-clock (with --threads 1, about an idle
machine's wall-clock: for measuring on a machine other jobs share).

Writes into --output: transfer.json (every number, the options, timings, the machine),
transfer_det.png (AP against iterations and training minutes, one curve per arm), transfer_loc.png
(top-1 localization error likewise) and transfer.md (tables of the final numbers). Checkpoints of
step 1 go to --work-dir; rendered data to --data-dir (reused while its options match).

Exit codes: 0 done, 2 bad arguments or data not found.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from res_backbone.engine.config import opt_float  # noqa: E402

log = logging.getLogger("transfer_study")

EVAL_ALLOWANCE = 0.15  # share of the time left after step 1 kept for rendering, model building and evaluation (~10% measured)
DET_MODEL = dict(fpn_channels=64, representation_size=256, anchor_sizes=((16,), (32,), (64,), (128,), (256,)),
                 rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                 rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=128, box_batch_size_per_image=128)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--output", default="docs/transfer", help="folder for transfer.json/.md and the two PNGs (default docs/transfer)")
    a("--work-dir", default="runs/transfer", help="pre-training run folder (checkpoints; default runs/transfer)")
    a("--data-dir", default=".cache/transfer", help="where the detection and localization sets are rendered")
    a("--fmnist-root", default=None,
      help="Fashion-MNIST idx folder (default $RB_FASHION_MNIST or /usr/share/datasets/fashion-mnist)")
    a("--cls-checkpoint", default=None, help="skip step 1: use this train_cls.py checkpoint (resnet18, grey)")
    a("--tasks", default="det,loc", help="comma-separated subset of det,loc (default both)")
    a("--arms", default=None,
      help="comma-separated subset of the arms (scratch, pretrained_frozen_bn, pretrained_finetune_all, "
           "pretrained_freeze_25); default all four")
    b = p.add_argument_group("budget")
    b.add_argument("--budget-minutes", type=float, default=45.0,
                   help="wall-clock target of the whole study, steps 1-3 with data and evaluation (default 45)")
    b.add_argument("--det-share", type=float, default=0.7, help="share of the arms' time for detection (default 0.7)")
    b.add_argument("--det-minutes", type=opt_float, default=None, help="training minutes per detection arm (overrides)")
    b.add_argument("--loc-minutes", type=opt_float, default=None, help="training minutes per localization arm (overrides)")
    b.add_argument("--num-evals", type=int, default=6, help="evaluations per arm, evenly spaced in time (default 6)")
    b.add_argument("--pretrain-iters", type=int, default=1500,
                   help="step 1: classifier iterations, batch 64 (default 1500, ~3.7 min here)")
    b.add_argument("--pretrain-invert", type=float, default=0.5,
                   help="step 1: probability of inverting a training image (default 0.5: the canvases hold items of "
                        "both polarities, see --det-dark-prob; 0 trains on Fashion-MNIST's bright-on-dark only)")
    d = p.add_argument_group("detection")
    d.add_argument("--det-train", type=int, default=2000, help="training canvases (default 2000)")
    d.add_argument("--det-val", type=int, default=150, help="validation canvases (default 150)")
    d.add_argument("--det-canvas", type=int, default=128, help="canvas side = detector input side (default 128)")
    d.add_argument("--det-scale", type=float, nargs=2, default=[24.0, 56.0], metavar=("MIN", "MAX"),
                   help="an item's 28 px frame is scaled to a side in [MIN, MAX] px (default 24 56)")
    d.add_argument("--det-dark-prob", type=float, default=0.5,
                   help="share of canvases with a dark background and bright items, Fashion-MNIST's polarity; the "
                        "others are light with dark items (default 0.5)")
    d.add_argument("--det-batch", type=int, default=8, help="images per iteration (default 8)")
    d.add_argument("--det-lr", type=float, default=0.02, help="SGD learning rate (default 0.02)")
    lo = p.add_argument_group("localization")
    lo.add_argument("--loc-train", type=int, default=10000, help="training images (default 10000)")
    lo.add_argument("--loc-val", type=int, default=1000, help="validation images (default 1000)")
    lo.add_argument("--loc-canvas", type=int, default=64, help="canvas side (default 64)")
    lo.add_argument("--loc-batch", type=int, default=64, help="images per iteration (default 64)")
    lo.add_argument("--loc-lr", type=float, default=0.002, help="AdamW learning rate (default 0.002)")
    r = p.add_argument_group("run")
    r.add_argument("--amp", default="bf16", choices=("none", "bf16"), help="mixed precision (default bf16, ~1.7x here)")
    r.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared 2-core CPU)")
    r.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and order (default 0)")
    r.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="what the per-arm budgets count: wall-clock seconds (default), or this process's CPU seconds "
                        "(with --threads 1 about an idle machine's wall-clock; for measuring on a shared machine)")
    r.add_argument("--quick", action="store_true",
                   help="tiny sizes and seconds-long budgets (a smoke test; numbers mean nothing)")
    return p


def apply_quick(args: argparse.Namespace) -> None:
    """--quick: sizes that run the whole pipeline in well under a minute (for tests)."""
    args.pretrain_iters, args.num_evals = 4, 2
    args.det_train, args.det_val, args.det_canvas, args.det_scale, args.det_batch = 8, 4, 64, [20.0, 30.0], 2
    args.loc_train, args.loc_val, args.loc_canvas, args.loc_batch = 16, 8, 32, 8
    args.det_lr = min(args.det_lr, 0.01)  # 4 pre-training steps leave BN statistics that 0.02 can blow up on 8 canvases
    args.det_minutes = args.det_minutes or 0.04
    args.loc_minutes = args.loc_minutes or 0.02


def pretrain(args, work: Path) -> dict:
    """Step 1: the grey resnet18 classifier (or the given checkpoint's record)."""
    from res_backbone.engine import cls_run

    if args.cls_checkpoint:
        import torch

        ck = torch.load(args.cls_checkpoint, map_location="cpu", weights_only=True)
        return {"checkpoint": str(args.cls_checkpoint), "arch": ck.get("model_name"), "iters": ck.get("iter"),
                "top1_err": (ck.get("metrics") or {}).get("top1_err"), "reused": True}
    cfg = cls_run.ClsTrainConfig(
        output=str(work / "pretrain"), backbone="resnet18", data_dir=args.fmnist_root, max_iters=args.pretrain_iters,
        batch_size=64 if not args.quick else 8, lr=0.05, schedule="cosine", warmup_iters=min(30, args.pretrain_iters),
        augment="flip", invert=args.pretrain_invert, amp=args.amp, channels_last=True, limit_val=2000, seed=args.seed,
        progress=False, checkpoint_every=10**6)
    m = cls_run.run(cfg)
    return {"checkpoint": str(work / "pretrain" / "checkpoint_best.pt"), "arch": "resnet18", "iters": m.get("iter"),
            "top1_err": m.get("top1_err"), "train_time_s": m.get("train_time_s"), "invert": args.pretrain_invert,
            "reused": False}


def run_arms(args, budget_s: float, batch_size: int, lr: float, warmup_iters: int, setup, task: str) -> list:
    """Train every arm of ``transfer_study.ARMS`` for ``budget_s`` seconds; ``setup(arm, policy, norm, norm_eval)``
    returns ``(model, runner, data, optimizer, evaluate, transfer_info)`` for one arm."""
    import torch

    from res_backbone import transfer
    from res_backbone.engine.budget import train_for_budget
    from res_backbone.engine.run_common import seed_everything
    from res_backbone.engine.transfer_study import ARMS, final_point

    arms, hint = [], None
    for arm in (a for a in ARMS if not args.arms or a.name in args.arms):
        seed_everything(args.seed)  # every arm starts from the same RNG state (heads, data order)
        policy, norm, norm_eval = transfer.resolve_bn_policy(arm.bn_policy, None, pretrained=arm.pretrained,
                                                             batch_size=batch_size)
        model, runner, data, optimizer, evaluate, info = setup(arm, policy, norm, norm_eval)
        log.info("%s arm %s (%s): %.2f min of training", task, arm.name, arm.label, budget_s / 60)
        res = train_for_budget(runner, data.train_loader, data.train_sampler, optimizer, device=torch.device("cpu"),
                               budget_s=budget_s, lr=lr, evaluate=partial(evaluate, arm.name), num_evals=args.num_evals,
                               warmup_iters=warmup_iters, freeze=transfer.BackboneFreeze(model.backbone, 0),
                               freeze_fraction=arm.freeze_fraction, unfrozen_s_per_iter=hint, amp=args.amp,
                               channels_last=True, clock=time.process_time if args.clock == "cpu" else time.perf_counter)
        if arm.name == "pretrained_finetune_all":  # the unfrozen speed, for planning the freeze arm
            hint = res["s_per_iter"]
        arms.append({"name": arm.name, "label": arm.label, "transfer": info, **res, "final": final_point(res["curve"])})
    return arms


def detection_arms(args, ckpt: str, budget_s: float) -> dict:
    """Step 2: the four arms on the composed detection set."""
    import torch

    from heads import build_detector
    from res_backbone import transfer
    from res_backbone.data.detection_fmnist import write_fmnist_detection
    from res_backbone.engine import det_run
    from res_backbone.engine.distributed import DistInfo
    from res_backbone.engine.optim import build_optimizer

    t0 = time.perf_counter()
    lo, hi = args.det_scale
    root = Path(args.data_dir) / (f"det_c{args.det_canvas}_s{lo:g}-{hi:g}_d{args.det_dark_prob:g}_n{args.det_train}-"
                                  f"{args.det_val}_seed{args.seed}")
    paths = write_fmnist_detection(root, root=args.fmnist_root, num_train=args.det_train, num_val=args.det_val,
                                   canvas=args.det_canvas, scale=(lo, hi), dark_prob=args.det_dark_prob, seed=args.seed)
    render_s = time.perf_counter() - t0
    cfg = det_run.DetTrainConfig(
        output=str(Path(args.work_dir) / "det"), backbone="resnet18", image_size=args.det_canvas,
        batch_size=args.det_batch, lr=args.det_lr, schedule="cosine", warmup_iters=50 if not args.quick else 0,
        amp=args.amp, channels_last=True, workers=0, seed=args.seed, progress=False, **paths)
    dist = DistInfo()

    def setup(arm, policy, norm, norm_eval):
        train_set, val_set = det_run.load_datasets(cfg, dist)
        model = build_detector("resnet18", num_classes=len(train_set.cat_ids), pretrained=ckpt if arm.pretrained else False,
                               frozen_stages=0, norm=norm, **DET_MODEL)
        info = transfer.configure_backbone(model.backbone, bn_policy=policy, norm_eval=norm_eval)
        data = det_run.prepare_data(cfg, dist, train_set, val_set, info["mean"], info["std"])
        model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, name="sgd", lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

        def evaluate(name: str, it: int) -> dict:
            m = det_run.evaluate(model, data, cfg, torch.device("cpu"), None, is_main=True, write=False, progress=False)
            log.info("det %s: iteration %d AP %.3f AP50 %.3f", name, it, m["AP"], m["AP50"])
            return {"AP": m["AP"], "AP50": m["AP50"]}

        return model, model, data, optimizer, evaluate, info

    arms = run_arms(args, budget_s, args.det_batch, cfg.lr, cfg.warmup_iters, setup, "detection")
    return {"budget_s": budget_s, "render_s": round(render_s, 1), "data": paths, "train_images": args.det_train,
            "val_images": args.det_val, "canvas": args.det_canvas, "batch_size": args.det_batch, "lr": args.det_lr,
            "model": {"backbone": "resnet18", "arch": "fpn", **DET_MODEL}, "arms": arms}


def localization_arms(args, ckpt: str, budget_s: float) -> dict:
    """Step 3: the four arms on the built-in single-object localization set."""
    import torch

    from heads.localization import build_localizer, localization_loss
    from res_backbone import transfer
    from res_backbone.engine import loc_run
    from res_backbone.engine.localization import LossAdapter
    from res_backbone.engine.localization import evaluate as loc_evaluate
    from res_backbone.engine.optim import build_optimizer

    t0 = time.perf_counter()
    cfg = loc_run.LocTrainConfig(
        output=str(Path(args.work_dir) / "loc"), data_dir=str(Path(args.data_dir) / "loc"), fmnist_root=args.fmnist_root,
        fmnist_train=args.loc_train, fmnist_val=args.loc_val, canvas=args.loc_canvas,
        item_scale=(28.0, 56.0) if args.loc_canvas >= 56 else (16.0, float(args.loc_canvas) * 0.8),
        batch_size=args.loc_batch, lr=args.loc_lr, warmup_iters=50 if not args.quick else 0, amp=args.amp,
        channels_last=True, seed=args.seed, progress=False)
    train_set, val_set = loc_run.load_datasets(cfg)
    render_s = time.perf_counter() - t0
    loss_fn = partial(localization_loss, cls_weight=cfg.cls_weight, l1_weight=cfg.l1_weight, giou_weight=cfg.giou_weight)

    def setup(arm, policy, norm, norm_eval):
        model = build_localizer("resnet18", train_set.num_classes, "scr", pretrained=ckpt if arm.pretrained else None,
                                input_size=cfg.image_size, norm=norm)
        info = transfer.configure_backbone(model.backbone, bn_policy=policy, norm_eval=norm_eval)
        data = loc_run.prepare_data(cfg, train_set, val_set, info["mean"], info["std"])
        model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, name="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)

        def evaluate(name: str, it: int) -> dict:
            m = loc_evaluate(model, data.val_loader, data.val_set, device=torch.device("cpu"), amp=args.amp,
                             channels_last=True, progress=False)
            log.info("loc %s: iteration %d top-1 loc err %.2f%%", name, it, m["top1_loc_err"])
            return {k: m[k] for k in ("top1_loc_err", "top1_cls_err", "mean_iou", "gt_known_loc_err")}

        return model, LossAdapter(model, loss_fn), data, optimizer, evaluate, info

    arms = run_arms(args, budget_s, args.loc_batch, cfg.lr, cfg.warmup_iters, setup, "localization")
    return {"budget_s": budget_s, "render_s": round(render_s, 1), "train_images": args.loc_train,
            "val_images": args.loc_val, "canvas": args.loc_canvas, "batch_size": args.loc_batch, "lr": args.loc_lr,
            "arms": arms}


def arm_budgets(args, spent_s: float, tasks) -> dict:
    """Training seconds per arm of each task: explicit minutes, or the rest of --budget-minutes split."""
    left = max(0.0, args.budget_minutes * 60 - spent_s) * (1 - EVAL_ALLOWANCE)
    shares = {"det": args.det_share if "loc" in tasks else 1.0, "loc": 1 - args.det_share if "det" in tasks else 1.0}
    explicit = {"det": args.det_minutes, "loc": args.loc_minutes}
    n_arms = len(args.arms) if args.arms else 4
    out = {}
    for t in tasks:
        out[t] = explicit[t] * 60 if explicit[t] else left * shares[t] / n_arms
        if not explicit[t] and out[t] < 10:
            raise ValueError(f"--budget-minutes {args.budget_minutes:g} leaves {out[t]:.0f} s per {t} arm after "
                             f"{spent_s / 60:.1f} min of pre-training and set-up; raise it or set --{t}-minutes")
    return out


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - {"det", "loc"}:
        parser.error(f"--tasks takes det and/or loc, got {args.tasks!r}")
    from res_backbone.engine.transfer_study import ARMS

    names = [a.name for a in ARMS]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    if args.arms is not None and (not args.arms or set(args.arms) - set(names)):
        parser.error(f"--arms takes a subset of {', '.join(names)}")
    if not 0.0 < args.det_share < 1.0:
        parser.error(f"--det-share must be in (0, 1), got {args.det_share}")
    if args.quick:
        apply_quick(args)
    import torch

    from res_backbone.data.fashion_mnist import FashionMNISTNotFoundError
    from res_backbone.engine.checkpoint import atomic_write_text
    from res_backbone.engine.transfer_study import machine_info, markdown_report, plot_curves

    torch.set_num_threads(args.threads)
    out, work = Path(args.output), Path(args.work_dir)
    start = time.perf_counter()
    result = {"options": vars(args), "machine": machine_info(), "timings": {}}

    def write() -> None:
        result["timings"]["total_s"] = round(time.perf_counter() - start, 1)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(result, indent=2) + "\n", out / "transfer.json")
        atomic_write_text(markdown_report(result) + "\n", out / "transfer.md")

    try:
        t = time.perf_counter()
        result["pretrain"] = pretrain(args, work)
        result["timings"]["pretrain_s"] = round(time.perf_counter() - t, 1)
        write()
        budgets = arm_budgets(args, time.perf_counter() - start, tasks)
        log.info("training per arm: %s", {k: f"{v / 60:.2f} min" for k, v in budgets.items()})
        ckpt = result["pretrain"]["checkpoint"]
        steps = {"det": ("detection", detection_arms, "AP", "COCO AP (val)", "transfer_det.png", "Detection"),
                 "loc": ("localization", localization_arms, "top1_loc_err", "top-1 localization error (%)",
                         "transfer_loc.png", "Localization")}
        for task in tasks:
            key, run, metric, ylabel, png, title = steps[task]
            t = time.perf_counter()
            result[key] = run(args, ckpt, budgets[task])
            result["timings"][f"{key}_s"] = round(time.perf_counter() - t, 1)
            plot_curves(result[key]["arms"], metric, ylabel, out / png,
                        f"{title} on unseen Fashion-MNIST items, equal training time per arm",
                        "training time (min)" if args.clock == "wall" else "training CPU time (min)")
            write()
    except (FileNotFoundError, FashionMNISTNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(markdown_report(result))
    print(f"-> {out / 'transfer.json'}, {out / 'transfer.md'}, {out}/transfer_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
