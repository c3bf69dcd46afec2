"""``tools/analyze_data.py`` as one call: a COCO detection set's statistics, the anchor coverage of a
detector configuration at the training size, plots and advice, written into one folder.

    report = analyze_data("train.json", "train/", "runs/analysis", backbone="resnet50", image_size=512)
    print("\\n".join(report["lines"]))
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from res_backbone.data import CocoDetection
from res_backbone.data.analysis import (
    box_statistics, collect_boxes, data_advice, plot_aspect, plot_sizes, summary_lines,
)
from res_backbone.io import atomic_write_json

from .anchor_fit import anchor_config, anchor_report, plot_coverage

__all__ = ["analyze_data"]

PathLike = Union[str, os.PathLike]


def analyze_data(ann_file: PathLike, image_root: PathLike, output: PathLike, *, backbone: str = "resnet50",
                 arch: str = "fpn", image_size: Union[int, str] = 512, anchor_sizes: Optional[Sequence] = None,
                 aspect_ratios: Optional[Sequence] = None, check_files: bool = True, progress: bool = True,
                 seed: int = 0) -> Dict[str, Any]:
    """Analyse ``ann_file`` for a detector ``build_detector(backbone, arch=arch, anchor_sizes=..., aspect_ratios=...)``
    trained at ``image_size``; write ``analysis.json``, ``sizes.png``, ``aspect.png`` and ``coverage.png`` into
    ``output``.

    Args:
        ann_file, image_root: the COCO json and its image folder, read by :class:`CocoDetection` (bad input
            raises its errors: ``FileNotFoundError``, :class:`~res_backbone.data.coco.CocoFormatError`).
        image_size: the training size (longer side), or ``"auto"`` for the suggested one.
        anchor_sizes, aspect_ratios: as ``train_det.py``'s flags (None: the detector's defaults).
        check_files: read each image's header (size against the json; missing or unreadable files are listed).

    Returns:
        The ``analysis.json`` content plus ``"lines"``: the printed table and advice.
    """
    dataset = CocoDetection(ann_file, image_root, None)
    table = collect_boxes(dataset)
    if image_size == "auto":
        from res_backbone.data.analysis import suggest_image_size

        image_size = suggest_image_size(table)[0]
    stats = box_statistics(dataset, table, int(image_size), check_files=check_files, progress=progress)
    config = anchor_config(backbone=backbone, arch=arch, anchor_sizes=anchor_sizes, aspect_ratios=aspect_ratios)
    anchors = anchor_report(table, int(image_size), config, seed=seed)
    anchors["detector"] = {"backbone": backbone, "arch": arch}
    advice = anchors["advice"] + data_advice(stats)
    result = {**stats, "anchors": anchors, "advice": advice}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out / "analysis.json", indent=2)
    fitted = anchors["fitted"]["anchors"]["anchor_sizes"]
    plot_sizes(stats, out / "sizes.png", [s for level in config.sizes for s in level], [s for lv in fitted for s in lv])
    plot_aspect(stats, out / "aspect.png", config.ratios[0], anchors["fitted"]["anchors"]["aspect_ratios"][0])
    plot_coverage(anchors, out / "coverage.png")
    cov, fit = anchors["current"]["coverage"], anchors["fitted"]["coverage"]
    lines = summary_lines(stats)
    lines.append(f"{'anchor coverage':<22}{'boxes':>7}{'IoU>=0.5':>10}{'IoU>=0.7':>10}{'fitted 0.5':>12}{'fitted 0.7':>12}")
    for name, c, f in [("all", cov, fit)] + [(b, cov["per_bucket"][b], fit["per_bucket"][b]) for b in cov["per_bucket"]]:
        if c["boxes"]:
            lines.append(f"{name:<22}{c['boxes']:>7}{c['iou_0.5']:>10.1%}{c['iou_0.7']:>10.1%}{f['iou_0.5']:>12.1%}"
                         f"{f['iou_0.7']:>12.1%}")
    lines += ["advice:"] + [f"  - {a}" for a in advice]
    lines.append(f"-> {out / 'analysis.json'}, sizes.png, aspect.png, coverage.png")
    return {**result, "lines": lines}
