"""train_det.py --image-size/--anchor-sizes/--aspect-ratios auto and --sampler repeat_factor, in-process on a tiny
synthetic set: the chosen values are logged, stored in config.yaml and the checkpoint, and rebuild the same model."""
import json

import yaml

import train_det
from heads.detection.ensemble import load_detector

TINY = ["--backbone", "resnet18", "--synthetic-train", "8", "--synthetic-val", "2", "--synthetic-size", "64",
        "--batch-size", "2", "--workers", "0", "--fpn-channels", "16", "--representation-size", "32",
        "--rpn-pre-nms-top-n-train", "50", "--rpn-post-nms-top-n-train", "20", "--rpn-pre-nms-top-n-test", "50",
        "--rpn-post-nms-top-n-test", "20", "--box-batch-size-per-image", "16", "--rpn-batch-size-per-image", "32",
        "--max-iters", "2", "--num-pictures", "0", "--check-images", "none", "--no-progress"]


def test_auto_anchors_image_size_and_repeat_factor_sampler(tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level("INFO")
    rc = train_det.main([*TINY, "--image-size", "auto", "--anchor-sizes", "auto", "--aspect-ratios", "auto",
                         "--sampler", "repeat_factor", "--repeat-thresh", "0.9", "--data-dir", str(tmp_path / "data"),
                         "--output", str(out)])
    assert rc == 0
    assert "--image-size auto:" in caplog.text and "boxes with an anchor at IoU >= 0.5:" in caplog.text
    assert "repeat-factor sampling (t=0.9):" in caplog.text and "images per epoch instead of 8" in caplog.text and "the rarest class" in caplog.text
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    chosen = json.loads((out / "auto_choices.json").read_text())
    assert chosen["chosen"] == {k: cfg[k] for k in ("image_size", "anchor_sizes", "aspect_ratios")}
    assert isinstance(cfg["image_size"], int) and len(cfg["anchor_sizes"]) == 5 and len(cfg["aspect_ratios"]) == 3
    assert chosen["coverage_after"]["iou_0.5"] >= chosen["coverage_before"]["iou_0.5"]
    model, ckpt = load_detector(out / "checkpoint_last.pt")  # what eval_det / predict / export rebuild
    gen = model.rpn.anchor_generator
    assert [s for level in gen.sizes for s in level] == [float(s) for s in cfg["anchor_sizes"]]
    assert list(gen.aspect_ratios[0]) == [float(r) for r in cfg["aspect_ratios"]]
    assert ckpt["config"]["image_size"] == cfg["image_size"]
    # the chosen values are valid --config values: they parse back to the same flags
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump({k: cfg[k] for k in ("image_size", "anchor_sizes", "aspect_ratios")}))
    parsed = train_det.parse_args(train_det.build_parser(), ["--config", str(again)])
    assert parsed.anchor_sizes == cfg["anchor_sizes"] and parsed.image_size == cfg["image_size"]


def test_auto_mixed_with_numbers_is_a_bad_argument(tmp_path, caplog):
    rc = train_det.main([*TINY, "--anchor-sizes", "auto", "16", "--output", str(tmp_path / "o"),
                         "--data-dir", str(tmp_path / "data")])
    assert rc == 2 and "stands alone" in caplog.text
