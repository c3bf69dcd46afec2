"""heads/classification/predictor.py and heads/localization/predictor.py: the evaluation pipeline, top-k, boxes in
original pixels (tiny untrained models)."""
import numpy as np
import pytest
import torch

from heads.classification.predictor import ClassificationPredictor
from heads.localization.predictor import LocalizationPredictor


def test_classifier_sees_what_evaluation_feeds_it():
    from res_backbone import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4, in_chans=1).eval()
    meta = {"task": "classification", "num_classes": 4, "class_names": list("abcd"), "cat_ids": None,
            "mean": [0.3], "std": [0.2], "image_size": 28, "crop_pct": 1.0}
    grey = np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)
    with torch.no_grad():  # Fashion-MNIST evaluation: uint8 (1, 28, 28) -> Normalize
        ref = model(((torch.from_numpy(grey).float() / 255 - 0.3) / 0.2)[None, None]).softmax(-1)[0]
    for fast in (False, True):
        r = ClassificationPredictor(model, meta, topk=3, fast=fast)(np.repeat(grey[..., None], 3, 2))
        assert r.names[0] == "abcd"[int(ref.argmax())] and len(r.names) == 3
        assert torch.allclose(r.scores, ref.sort(descending=True).values[:3], atol=1e-5)
    rec = r.to_records()[0]
    assert rec["category_id"] == int(ref.argmax()) and [t["score"] for t in rec["topk"]] == sorted(
        [t["score"] for t in rec["topk"]], reverse=True)
    big = ClassificationPredictor(model, meta, topk=9)(np.zeros((100, 60, 3), np.uint8))  # resized, centre crop
    assert len(big.names) == 4 and big.orig_size == (100, 60)


class HalfBox(torch.nn.Module):
    """An exported-style localizer: class 1 wins, its box is the right half (normalised xyxy)."""

    def forward(self, x):
        n = x.shape[0]
        return {"logits": torch.tensor([[0.0, 3.0, 1.0]]).expand(n, 3),
                "boxes": torch.tensor([[0.5, 0.0, 1.0, 1.0]]).expand(n, 4)}


def test_localizer_boxes_in_original_pixels():
    meta = {"task": "localization", "num_classes": 3, "class_names": ["x", "y", "z"], "cat_ids": [5, 6, 9],
            "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    r = LocalizationPredictor(HalfBox(), meta, topk=2, eager=[False])(np.zeros((40, 100, 3), np.uint8))
    assert r.names == ["y", "z"] and r.category_ids == [6, 9]
    assert r.boxes[0].tolist() == pytest.approx([50, 0, 100, 40])
    assert r.to_records()[0]["bbox"] == pytest.approx([50, 0, 50, 40])
