"""Evaluation: COCO box metrics through pycocotools; the paper's classification testing protocols."""
from .classification import (
    PROTOCOLS, center_crop, collect_protocol_probs, default_protocol_sizes, ensemble_scores, evaluate_protocols,
    fully_conv_scores, ten_crop_scores, ten_crop_views, topk_errors,
)
from .coco import STAT_NAMES, coco_evaluate, gather_results, load_coco_gt, to_coco_results, write_detections_json
from .localization import localization_errors

__all__ = ["PROTOCOLS", "STAT_NAMES", "center_crop", "coco_evaluate", "collect_protocol_probs",
           "default_protocol_sizes", "ensemble_scores", "evaluate_protocols", "fully_conv_scores", "gather_results",
           "load_coco_gt", "ten_crop_scores", "ten_crop_views", "to_coco_results", "topk_errors",
           "write_detections_json", "localization_errors"]
