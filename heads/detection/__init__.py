"""Faster R-CNN on ResNet features: anchors, box coding, matching, sampling, RPN, RoI heads."""
from .anchors import AnchorGenerator
from .box_coder import BoxCoder, decode_boxes, encode_boxes
from .faster_rcnn import LOSS_KEYS, FasterRCNN, build_detector
from .matcher import Matcher
from .postprocess import postprocess_detections
from .roi_heads import BoxPredictor, MultiLevelRoIAlign, Res5Head, RoIHeads, TwoFCHead
from .rpn import RegionProposalNetwork, RPNHead
from .sampler import BalancedSampler

__all__ = [
    "AnchorGenerator", "BalancedSampler", "BoxCoder", "BoxPredictor", "FasterRCNN", "LOSS_KEYS", "Matcher",
    "MultiLevelRoIAlign", "RPNHead", "RegionProposalNetwork", "Res5Head", "RoIHeads", "TwoFCHead",
    "build_detector", "decode_boxes", "encode_boxes", "postprocess_detections",
]
