"""Single-object localization: a class and a box per image, over a backbone's last feature map.

    model = build_localizer("resnet18", num_classes=10, mode="scr")      # or "pcr"
    out = model(images)                    # {"logits": (N, K), "boxes": (N, 4) or (N, K, 4)}
    losses = localization_loss(out, labels, boxes)                      # cls + L1 + GIoU terms
    pred = model.predict(images, k=5)      # top-5 classes, scores and the box of each

Box format everywhere: ``xyxy`` normalised by the input's width and height (0..1 covers the image).
The box branch predicts ``(cx, cy, w, h)`` through a sigmoid and returns the corners, so a box is
never inverted; corners may leave [0, 1] by up to half a box during training, ``predict`` clamps them.

Two modes, after the ResNet paper's ImageNet localization (section A of its appendix) and OverFeat:

* ``"scr"`` - single-class regression: one class-agnostic box per image;
* ``"pcr"`` - per-class regression: one box per class; the loss trains the ground-truth class's box
  and ``predict`` returns, with each predicted class, that class's box.

A second, R-CNN-style pass (``crop_size > 0``; the ResNet paper's ILSVRC localization entry classified
its box proposals with a second network run on the cropped regions): the image region inside the box
(enlarged by ``crop_context`` per side, resized to ``crop_size`` squared with RoIAlign) goes through the
backbone's convolutions again (with normalisation layers of its own) and a second classifier scores it. The crop shows the object at one scale and with
little background - what a classifier pre-trained on centred objects knows - so the class comes from
where the object is, not from the whole canvas. Training crops come from jittered ground-truth boxes,
test crops from the predicted box; the reported class probabilities are the mean of both classifiers'.

"On top of a classifier": :func:`build_localizer` with ``cls_checkpoint=`` (a ``tools/train_cls.py``
checkpoint) takes the backbone and the classifier from it, frozen (no gradients, BatchNorm
statistics fixed); only the box branch trains.
"""
from .build import build_localizer, load_localizer
from .crop_pass import crop_regions, jitter_boxes, tied_copy
from .loss import localization_loss
from .model import MODES, LocalizationHead, LocalizationModel, cxcywh_to_xyxy, topk_predictions

__all__ = ["LocalizationHead", "LocalizationModel", "build_localizer", "load_localizer", "localization_loss"]
