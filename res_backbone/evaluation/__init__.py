"""Evaluation: COCO box metrics through pycocotools."""
from .coco import STAT_NAMES, coco_evaluate, gather_results, load_coco_gt, to_coco_results, write_detections_json

__all__ = ["STAT_NAMES", "coco_evaluate", "gather_results", "load_coco_gt", "to_coco_results",
           "write_detections_json"]
