import numpy as np
import torch
from PIL import Image

from res_backbone.visualize import class_colour, draw_detections, save_prediction_grid


def _image():
    return np.full((48, 64, 3), 40, np.uint8)


def test_draw_detections_writes_png_of_image_size(tmp_path):
    out = draw_detections(_image(), torch.tensor([[5.0, 6, 30, 40]]), torch.tensor([2]), torch.tensor([0.9]),
                          torch.tensor([[4.0, 4, 31, 41]]), torch.tensor([2]), ["a", "b"], tmp_path / "v" / "d.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (64, 48)
        arr = np.asarray(im.convert("RGB"))
    assert (arr != 40).any()
    assert (arr == class_colour(2)).all(-1).any()  # the prediction's class colour is drawn


def test_score_threshold_and_path_input(tmp_path):
    src = tmp_path / "src.png"
    Image.fromarray(_image()).save(src)
    out = draw_detections(src, [[5, 6, 30, 40]], [1], [0.1], None, None, None, tmp_path / "t.png", score_thresh=0.3,
                          upscale=2)
    with Image.open(out) as im:
        assert im.size == (128, 96)
        assert (np.asarray(im.convert("RGB")) == 40).all()  # below threshold, nothing drawn


def test_prediction_grid(tmp_path):
    img = torch.rand(3, 32, 40)
    pred = {"boxes": torch.tensor([[1.0, 1, 20, 20]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.8])}
    tgt = {"boxes": torch.tensor([[2.0, 2, 21, 21]]), "labels": torch.tensor([1])}
    out = save_prediction_grid([img] * 3, [pred] * 3, [tgt] * 3, ["x"], tmp_path / "g.png", ncols=2, pad=4)
    with Image.open(out) as im:
        assert im.size == (2 * 40 + 3 * 4, 2 * 32 + 3 * 4)
