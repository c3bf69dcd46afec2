"""Image classification on res_backbone features: a pooling + linear head, and checkpoint loading.

    head = ClassificationHead.from_backbone(backbone, num_classes=10)   # reads feature_info[-1]
    model = Classifier(backbone, head)                                    # logits (N, K)
    model, meta = load_classifier("runs/cls/checkpoint_best.pt")        # a ResNet classifier, eval mode

With ``pool=""`` the head returns per-position scores ``(N, K, H, W)``: the linear layer applied
as a 1x1 convolution with the same weights (the fully-convolutional form the paper tests with,
section 3.4). Because the classifier is linear, the mean of those maps over positions equals the
logits of the average-pooled head.
"""
from .build import NumClassesMismatchError, build_classifier, load_classifier
from .head import ClassificationHead, Classifier, Features

__all__ = ["ClassificationHead", "Classifier", "Features", "NumClassesMismatchError", "build_classifier",
           "load_classifier"]
