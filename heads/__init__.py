"""Task heads on res_backbone features (dependencies flow res_backbone <- heads <- tools)."""
from .classification import ClassificationHead, Classifier, NumClassesMismatchError, build_classifier, load_classifier
from .detection import FasterRCNN, build_detector
from .localization import LocalizationHead, LocalizationModel, build_localizer, load_localizer, localization_loss

__all__ = ["ClassificationHead", "Classifier", "FasterRCNN", "NumClassesMismatchError", "build_classifier",
           "build_detector", "load_classifier", "LocalizationHead", "LocalizationModel", "build_localizer",
           "load_localizer", "localization_loss"]
