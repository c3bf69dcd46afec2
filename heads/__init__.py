"""Task heads on res_backbone features (dependencies flow res_backbone <- heads <- tools)."""
from .detection import FasterRCNN, build_detector

__all__ = ["FasterRCNN", "build_detector"]
