"""heads/detection/slicing.py: tile grid and merge rules (golden, hand-made boxes), the sliced predictor end to
end with a thresholding stand-in detector (fast), and a trained detector on a 2048 px scene (slow)."""
import numpy as np
import pytest
import torch
from torch import nn

from heads.detection.predictor import DetectionPredictor
from heads.detection.slicing import cut_flags, merge_sliced, tile_windows

META = {"task": "detection", "cat_ids": [3, 7], "class_names": ["a", "b"], "mean": [0.5] * 3, "std": [0.25] * 3,
        "image_size": 200, "num_classes": 2}


def test_tile_windows_cover_the_image_with_the_overlap():
    wins = tile_windows(1000, 900, 400, 0.25)
    xs = sorted({w[0] for w in wins})
    ys = sorted({w[1] for w in wins})
    assert xs == [0, 300, 500] and ys == [0, 300, 600]  # the last column/row flush with the far edge
    assert all(w[2] - w[0] == 400 and w[3] - w[1] == 400 for w in wins)
    assert tile_windows(100, 150, 400, 0.2) == [(0, 0, 150, 100)]  # smaller than a tile: one window
    with pytest.raises(ValueError, match="overlap"):
        tile_windows(100, 100, 50, 1.0)


def test_full_pass_adds_the_whole_image_as_one_more_window():
    from heads.detection.slicing import Slicer

    pred = DetectionPredictor(nn.Identity(), META, fast=False)
    img = np.zeros((300, 500, 3), np.uint8)
    tiles = Slicer(200, 0.25).prepare(pred, img)
    full = Slicer(200, 0.25, full=True).prepare(pred, img)
    assert len(full) == len(tiles) + 1 and full[-1][2] == (0, 0, 500, 300)
    assert full[-1][0].shape[-1] == 200  # the whole image at the predictor's size


def test_cut_flags_ignore_image_borders():
    boxes = torch.tensor([[0.0, 0, 10, 10], [395, 50, 400, 60], [100, 100, 120, 120]])
    assert cut_flags(boxes, (0, 0, 400, 400), (1000, 1000), 2).tolist() == [False, True, False]
    assert cut_flags(boxes, (0, 0, 400, 400), (400, 400), 2).tolist() == [False, False, False]


def _merge(rows, **kw):
    """rows: (x0, y0, x1, y1, score, label, cut, tile)."""
    t = torch.tensor(rows, dtype=torch.float64)
    out = merge_sliced(t[:, :4], t[:, 4].float(), t[:, 5].long(), t[:, 6].bool(), t[:, 7].long(), **kw)
    return [[round(v) for v in b] + [round(float(s), 2), int(lab)]
            for b, s, lab in zip(out["boxes"].tolist(), out["scores"], out["labels"])]


def test_merge_golden_cases():
    # one object whole in two tiles: reported once, the better score
    assert _merge([(10, 10, 30, 30, 0.8, 1, 0, 0), (11, 10, 30, 31, 0.9, 1, 0, 1)]) == [[11, 10, 30, 31, 0.9, 1]]
    # two tiles name the same object differently: one box
    assert _merge([(10, 10, 30, 30, 0.8, 1, 0, 0), (10, 10, 30, 30, 0.6, 2, 0, 1)]) == [[10, 10, 30, 30, 0.8, 1]]
    # ... but within one tile the detector's own per-class answers stay
    assert len(_merge([(10, 10, 30, 30, 0.8, 1, 0, 0), (10, 10, 30, 30, 0.6, 2, 0, 0)])) == 2
    # a fragment cut by a tile edge, scoring higher and of another class, next to the whole object: dropped
    assert _merge([(80, 10, 100, 30, 0.95, 2, 1, 0), (80, 10, 120, 30, 0.7, 1, 0, 1)]) == [[80, 10, 120, 30, 0.7, 1]]
    # an object larger than the overlap, cut in both tiles: the two parts fused into one box
    assert _merge([(50, 50, 100, 80, 0.9, 1, 1, 0), (90, 51, 160, 80, 0.8, 1, 1, 1)]) == [[50, 50, 160, 80, 0.9, 1]]
    # neighbours of one class stay apart; a cut box with no whole counterpart survives
    assert len(_merge([(0, 0, 10, 10, 0.9, 1, 0, 0), (12, 0, 22, 10, 0.9, 1, 0, 1), (40, 0, 50, 10, 0.5, 1, 1, 2)])) == 3


class ThresholdDetector(nn.Module):
    """A stand-in detector: every bright connected blob of a (normalised) image is a class-1 box."""

    def forward(self, images, sizes):
        from scipy import ndimage

        outs = []
        for im, (h, w) in zip(images, sizes):
            mask = (im[0, :h, :w] > 1.0).numpy()
            lab, _ = ndimage.label(mask)
            boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(lab)]
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            outs.append({"boxes": b, "scores": torch.full((len(b),), 0.9), "labels": torch.ones(len(b), dtype=torch.long)})
        return outs


def test_sliced_prediction_reports_seam_objects_once(monkeypatch):
    pytest.importorskip("scipy")
    from predict_scene import match

    rng = np.random.default_rng(0)
    img = np.zeros((1000, 1000, 3), np.uint8)
    objects = []
    seams = [w[2] for w in tile_windows(1000, 1000, 200, 0.25) if w[2] < 1000]
    for k in range(60):
        s = int(rng.integers(20, 40))
        x = int(rng.choice(seams)) - s // 2 if k % 2 == 0 else int(rng.integers(0, 1000 - s))
        y = int(rng.integers(0, 1000 - s))
        if img[max(0, y - 3):y + s + 3, max(0, x - 3):x + s + 3].any():
            continue
        img[y:y + s, x:x + s] = 255
        objects.append((3, [x, y, x + s, y + s]))
    pred = DetectionPredictor(ThresholdDetector(), META, fast=False, slice_size=200, slice_overlap=0.25, batch_size=8)
    r = pred(img)
    recall, dups, frags = match(objects, r.boxes.tolist(), r.category_ids)
    assert recall == 1.0 and dups == 0.0 and frags == 0.0, (recall, dups, frags)
    assert len(r) == len(objects)
    # without the cut rule (no box flagged as cut), fragments survive next to the whole boxes: the test can fail
    import heads.detection.slicing as slicing

    monkeypatch.setattr(slicing, "cut_flags", lambda boxes, *a: torch.zeros(len(boxes), dtype=torch.bool))
    r = pred(img)
    assert match(objects, r.boxes.tolist(), r.category_ids)[2] > 0.05


@pytest.mark.study
def test_trained_detector_sliced_vs_whole_on_a_2048px_scene(tmp_path):
    """The issue's target: >= 90% of the objects found at IoU 0.5 with <= 2% duplicates by sliced prediction,
    far fewer by one pass at the training size. The demo recipe (600 iterations, ~5 min on 2 CPU cores; 300
    iterations leave a detector too weak for it). Measured: sliced recall 0.980, duplicates 0.000; whole image
    recall 0.000 (the `make demo` model: 0.993 / 0.000 / 0.000)."""
    import subprocess
    import sys
    from pathlib import Path

    from predict_scene import large_scene, match

    root = Path(__file__).resolve().parents[3]
    out = tmp_path / "det"
    subprocess.run([sys.executable, str(root / "tools" / "train_det.py"), "--config", str(root / "configs/det/demo.yaml"),
                    "--eval-every", "1000", "--num-pictures", "0", "--no-progress",
                    "--data-dir", str(tmp_path / "data"), "--output", str(out)], check=True, cwd=root,
                   capture_output=True, timeout=1800)
    img, objects = large_scene(2048, n_objects=150, obj_px=(32, 64), tile=256, overlap=0.3)
    ck = [str(out / "checkpoint_last.pt")]
    whole = DetectionPredictor.from_files(ck, score_thresh=0.5, workers=0)(img)
    sliced = DetectionPredictor.from_files(ck, score_thresh=0.5, batch_size=8, workers=0, slice_size=256,
                                           slice_overlap=0.3)(img)
    r_whole = match(objects, whole.boxes.tolist(), whole.category_ids)
    r_sliced = match(objects, sliced.boxes.tolist(), sliced.category_ids)
    print(f"whole: recall {r_whole[0]:.3f}; sliced: recall {r_sliced[0]:.3f}, duplicates {r_sliced[1]:.3f}")
    assert r_sliced[0] >= 0.9 and r_sliced[1] <= 0.02
    assert r_whole[0] < 0.5 * r_sliced[0]
