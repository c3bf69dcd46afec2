"""Anchor coverage (exact, against the brute force over every anchor) and anchors fitted to the boxes."""
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from heads.detection.anchor_fit import (
    AnchorConfig, anchor_config, anchor_kwargs, auto_choices, best_anchor_iou, coverage, fit_anchors, number_or_auto,
)
from heads.detection.anchors import AnchorGenerator
from res_backbone.data.analysis import BoxTable


def brute_force(boxes, hw, config):
    """The best IoU of each box over every anchor of its (padded) image, as the RPN lays them out."""
    gen = AnchorGenerator(config.sizes, config.ratios, config.strides)
    out = []
    for box, (h, w) in zip(boxes, hw):
        hp, wp = (int(np.ceil(v / 32) * 32) for v in (h, w))
        grids = [(int(np.ceil(hp / s)), int(np.ceil(wp / s))) for s in config.strides]
        anchors = torch.cat(gen.grid_anchors(grids, torch.device("cpu")))
        out.append(float(box_iou(torch.tensor(box[None], dtype=torch.float32), anchors).max()))
    return np.asarray(out)


def random_boxes(n, seed=0, lo=4, hi=200):
    rng = np.random.default_rng(seed)
    hw = rng.integers(60, 300, size=(n, 2)).astype(np.float64)
    side = np.exp(rng.uniform(np.log(lo), np.log(hi), size=(n, 2)))
    wh = np.minimum(side, hw[:, ::-1] - 1)
    x0 = rng.uniform(0, 1, size=(n, 2)) * (hw[:, ::-1] - wh)
    return np.concatenate([x0, x0 + wh], 1), hw


@pytest.mark.parametrize("arch_config", [
    AnchorConfig([4, 8, 16, 32, 64], [(32.0,), (64.0,), (128.0,), (256.0,), (512.0,)], [(0.5, 1.0, 2.0)] * 5),
    AnchorConfig([16], [(12.0, 40.0, 90.0)], [(0.4, 1.3)]),  # C4-like: one level, several sizes
])
def test_coverage_shortcut_equals_brute_force(arch_config):
    boxes, hw = random_boxes(150)
    fast = best_anchor_iou(boxes, hw, arch_config)
    assert np.abs(fast - brute_force(boxes, hw, arch_config)).max() < 1e-5


def test_coverage_on_hand_built_boxes():
    config = AnchorConfig([4], [(16.0,)], [(1.0,)])  # 16x16 anchors centred on (4i, 4j)
    hw = np.full((4, 2), 64.0)
    boxes = np.array([[0, 0, 16, 16],     # centre (8, 8) on the grid: IoU 1
                      [2, 0, 18, 16],     # centre (10, 8): nearest grid x 8 or 12, off by 2 -> 14*16 / (2*256 - 224)
                      [8, 8, 40, 40],     # 32x32 around an anchor: 256 / 1024
                      [20, 20, 28, 28]])  # 8x8 inside an anchor: 64 / 256
    best = best_anchor_iou(boxes, hw, config)
    assert best == pytest.approx([1.0, 224 / 288, 0.25, 0.25], abs=1e-6)
    cov = coverage(best, np.sqrt(np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)))
    assert (cov["iou_0.5"], cov["iou_0.7"], cov["boxes"]) == (0.5, 0.5, 4)
    assert cov["per_bucket"]["small"]["boxes"] == 3 and cov["per_bucket"]["medium"]["iou_0.5"] == 0.0


def test_detector_anchor_config_and_flags():
    cfg = anchor_config(backbone="resnet18")
    assert cfg.strides == [4, 8, 16, 32, 64] and cfg.sizes[0] == (32.0,) and cfg.ratios[0] == (0.5, 1.0, 2.0)
    c4 = anchor_config(backbone="resnet18", arch="c4", **anchor_kwargs([8, 16], [1], "c4"))
    assert c4.strides == [16] and c4.sizes == [(8.0, 16.0)] and c4.ratios == [(1.0,)]
    assert anchor_kwargs([16, 32], [0.5, 2], "fpn") == {"anchor_sizes": [[16], [32]], "aspect_ratios": [[0.5, 2]]}
    assert anchor_kwargs(["auto"], None) == {"anchor_sizes": "auto"}
    with pytest.raises(ValueError, match="stands alone"):
        anchor_kwargs(["auto", 16], None)
    assert number_or_auto("16") == 16 and number_or_auto("0.5") == 0.5 and number_or_auto("AUTO") == "auto"
    with pytest.raises(ValueError):
        number_or_auto("-3")


def small_object_table(n_images=60, seed=1):
    """Boxes of 6-24 px (sqrt area) in 160 px images, shapes near square."""
    rng = np.random.default_rng(seed)
    boxes, index = [], []
    for i in range(n_images):
        for _ in range(5):
            s, r = np.exp(rng.uniform(np.log(6), np.log(24))), np.exp(rng.uniform(-0.3, 0.3))
            w, h = s / np.sqrt(r), s * np.sqrt(r)
            x, y = rng.uniform(0, 160 - w), rng.uniform(0, 160 - h)
            boxes.append([x, y, x + w, y + h])
            index.append(i)
    return BoxTable(np.asarray(boxes), np.ones(len(boxes), np.int64), np.asarray(index),
                    np.full((n_images, 2), 160.0), np.arange(n_images))


def test_fitted_anchors_raise_coverage_of_small_objects():
    table = small_object_table()
    boxes, hw = table.at_size(160)
    default = anchor_config(backbone="resnet18")
    fitted = fit_anchors(boxes, hw, default)
    before = coverage(best_anchor_iou(boxes, hw, default), table.sqrt_area(160))
    after = coverage(best_anchor_iou(boxes, hw, fitted), table.sqrt_area(160))
    assert before["iou_0.5"] < 0.15 and after["iou_0.5"] >= 0.9 and after["iou_0.7"] > before["iou_0.7"]
    sizes = [s for level in fitted.sizes for s in level]
    assert sizes == sorted(sizes) and len(sizes) == 5 and len(fitted.ratios[0]) == 3
    assert fit_anchors(boxes, hw, default).sizes == fitted.sizes  # deterministic


def test_auto_choices_for_training():
    table = small_object_table(20)
    out = auto_choices(table, backbone="resnet18", arch="fpn", image_size="auto", anchor_sizes="auto",
                       aspect_ratios=[[0.5, 1.0, 2.0]])
    assert isinstance(out["image_size"], int) and out["image_size"] > 160  # small objects: upscaled
    assert len(out["anchor_sizes"]) == 5 and all(len(level) == 1 for level in out["anchor_sizes"])
    assert out["aspect_ratios"] == [[0.5, 1.0, 2.0]]  # given: kept
    assert out["coverage_after"]["iou_0.5"] > out["coverage_before"]["iou_0.5"]
    assert any("--image-size auto" in n for n in out["notes"]) and any("->" in n for n in out["notes"])
    fixed = auto_choices(table, backbone="resnet18", arch="fpn", image_size=320, anchor_sizes=None, aspect_ratios=None)
    assert fixed == {"image_size": 320, "anchor_sizes": None, "aspect_ratios": None, "notes": []}


def test_auto_anchors_for_c4_keep_one_level_of_several_sizes():
    out = auto_choices(small_object_table(20), backbone="resnet18", arch="c4", image_size=160, anchor_sizes="auto",
                       aspect_ratios=None)
    assert len(out["anchor_sizes"]) == 1 and len(out["anchor_sizes"][0]) == 5 and out["aspect_ratios"] is None
    assert out["anchor_sizes"][0] == sorted(out["anchor_sizes"][0])
