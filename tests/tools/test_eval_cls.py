"""tools/eval_cls.py end to end on tiny checkpoints and a fake Fashion-MNIST / a tiny ImageFolder (CPU, seconds)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from res_backbone.data.fashion_mnist import write_fake_fashion_mnist
from res_backbone.weights.testing import write_tiny_cls_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import eval_cls  # noqa: E402

PROTOCOLS = {"center", "10crop", "multiscale"}


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_cls")
    data = write_fake_fashion_mnist(base / "fmnist", n_train=4, n_test=12)
    ckpts = [write_tiny_cls_checkpoint(base / f"run{i}" / "checkpoint_best.pt", seed=i) for i in range(2)]
    return base, data, ckpts


def test_one_checkpoint_defaults_write_next_to_it(fmnist, capsys):
    base, data, ckpts = fmnist
    assert eval_cls.main(["--checkpoint", str(ckpts[0]), "--data-dir", str(data), "--batch-size", "5",
                          "--protocol", "center,multiscale", "--scales", "28,40", "--no-progress"]) == 0
    report = json.loads((ckpts[0].parent / "eval_cls.json").read_text())
    assert list(report["results"]) == ["checkpoint_best.pt"]
    assert set(report["results"]["checkpoint_best.pt"]) == {"center", "multiscale"}
    p = report["protocols"]
    assert (p["crop"], p["resize"], p["scales"], p["source_mode"]) == (28, 32, [28, 40], "pad")
    assert p["fill"] == pytest.approx([-0.2860 / 0.3530])
    assert report["data"]["n_images"] == 12
    out = capsys.readouterr().out
    assert "| checkpoint_best.pt | multiscale |" in out and "top-5 err (%)" in out


def test_two_checkpoints_give_every_row_and_the_ensemble(fmnist):
    base, data, ckpts = fmnist
    out = base / "ens"
    assert eval_cls.main(["--checkpoint", *map(str, ckpts), "--data-dir", str(data), "--limit", "8",
                          "--scales", "28,32", "--average", "logits", "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "eval_cls.json").read_text())
    rows = report["results"]
    assert set(rows) == {"run0/checkpoint_best.pt", "run1/checkpoint_best.pt", "ensemble"}
    for per in rows.values():
        assert set(per) == PROTOCOLS
        for errs in per.values():
            assert set(errs) == {"top1_err", "top5_err"}
            assert 0.0 <= errs["top5_err"] <= errs["top1_err"] <= 100.0
            assert errs["top1_err"] * 8 / 100 == pytest.approx(round(errs["top1_err"] * 8 / 100))
    assert report["data"]["n_images"] == 8 and report["protocols"]["average"] == "logits"
    assert report["checkpoints"]["run1/checkpoint_best.pt"]["model_name"] == "resnet20"


def test_bad_inputs_exit_2_with_a_reason(fmnist, tmp_path, caplog):
    base, data, ckpts = fmnist
    common = ["--data-dir", str(data), "--no-progress", "--output", str(tmp_path)]
    assert eval_cls.main(["--checkpoint", str(tmp_path / "nope.pt"), *common]) == 2
    five = write_tiny_cls_checkpoint(tmp_path / "five.pt", num_classes=5)
    assert eval_cls.main(["--checkpoint", str(five), *common]) == 2
    assert "num_classes=5" in caplog.text and "10 classes" in caplog.text
    caplog.clear()
    assert eval_cls.main(["--checkpoint", str(ckpts[0]), str(five), *common]) == 2
    assert "10 classes" in caplog.text
    assert eval_cls.main(["--checkpoint", str(ckpts[0]), "--data-dir", str(tmp_path / "empty"), "--no-progress",
                          "--output", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        eval_cls.main(["--checkpoint", str(ckpts[0]), "--protocol", "5crop"])
    assert not (tmp_path / "eval_cls.json").exists()


def test_image_folder_with_three_channels(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (20, 26, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "val" / name / f"{i}.png")
    ck = write_tiny_cls_checkpoint(tmp_path / "rgb.pt", num_classes=2, in_chans=3, input_size=16,
                                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), classes=["cat", "dog"])
    assert eval_cls.main(["--checkpoint", str(ck), "--val-dir", str(tmp_path / "val"), "--crop", "20",
                          "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval_cls.json").read_text())
    p = report["protocols"]
    # crop 20 > the 18 source: views come from the image resized up; loaded at the largest scale, 46
    assert (p["crop"], p["resize"], p["scales"], p["source_mode"], p["load_size"]) == (
        20, 18, [16, 18, 27, 34, 46], "resize", 46)
    assert set(report["results"]["rgb.pt"]) == PROTOCOLS and report["data"]["n_images"] == 6
    wrong = write_tiny_cls_checkpoint(tmp_path / "wrong.pt", num_classes=2, in_chans=3, classes=["cat", "cow"])
    assert eval_cls.main(["--checkpoint", str(wrong), "--val-dir", str(tmp_path / "val"), "--no-progress"]) == 2
