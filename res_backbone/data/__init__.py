"""Detection data: COCO reader (pycocotools semantics), albumentations pipelines, batching, synthetic set."""
from .classification import (
    ClassificationDataError, ClsDatasets, ImageFolderClassification, TensorClassification, build_cls_datasets,
)
from .coco import CocoDetection, CocoFormatError
from .images import ImageDecodeError, ImageTooLargeError, load_rgb_image, safe_join
from .collate import collate_detection, pad_images
from .localization import CocoLocalization, build_loc_eval_transforms, build_loc_train_transforms, collate_localization
from .samplers import (
    EpochBatchSampler, GroupedBatchSampler, ResumableBatchSampler, build_grouped_batch_sampler, group_by_aspect_ratio,
)
from .synthetic import make_synthetic_coco, synthetic_paths
from .transforms import build_eval_transforms, build_train_transforms, worker_init_fn

__all__ = [
    "ClassificationDataError", "ClsDatasets", "ImageFolderClassification", "TensorClassification",
    "build_cls_datasets",
    "CocoDetection", "CocoFormatError", "EpochBatchSampler", "GroupedBatchSampler", "ResumableBatchSampler", "ImageDecodeError", "ImageTooLargeError",
    "build_eval_transforms",
    "build_grouped_batch_sampler", "build_train_transforms", "collate_detection", "group_by_aspect_ratio",
    "load_rgb_image", "make_synthetic_coco", "pad_images", "safe_join", "synthetic_paths",
    "worker_init_fn",
    "CocoLocalization", "build_loc_eval_transforms", "build_loc_train_transforms", "collate_localization",
]
