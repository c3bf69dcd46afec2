"""tools/train_loc.py and tools/eval_loc.py end to end on a tiny built-in set (fake Fashion-MNIST, CPU, seconds)."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from res_backbone.data.fashion_mnist import write_fake_fashion_mnist

import eval_loc  # noqa: E402  (tools/ is on pytest's pythonpath)
import train_loc  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(base: Path, *extra: str):
    return ["--backbone", "resnet20", "--fmnist-root", str(base / "fmnist"), "--data-dir", str(base / "data"),
            "--fmnist-train", "24", "--fmnist-val", "8", "--canvas", "32", "--item-scale", "16", "28",
            "--batch-size", "8", "--warmup-iters", "0", "--lr", "0.003", "--log-every", "1", "--num-pictures", "4",
            "--grid", "2", "--box-channels", "16", "--hidden", "32", "--no-progress", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("loc")
    write_fake_fashion_mnist(base / "fmnist", n_train=48, n_test=16)
    return base


@pytest.fixture(scope="module")
def trained(base):
    out = base / "run"
    assert train_loc.main(_tiny(base, "--mode", "pcr", "--max-iters", "4", "--checkpoint-every", "2",
                                "--output", str(out))) == 0
    return out


def test_train_writes_every_output(trained):
    out = trained
    for name in ("config.yaml", "checkpoint_last.pt", "checkpoint_prev.pt", "checkpoint_best.pt", "log.jsonl",
                 "metrics.json", "predictions/val.png"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    m = json.loads((out / "metrics.json").read_text())
    for k in ("top1_loc_err", "top5_loc_err", "top1_cls_err", "top5_cls_err", "gt_known_loc_err"):
        assert 0.0 <= m[k] <= 100.0, k
    assert 0.0 <= m["mean_iou"] <= 1.0 and m["num_images"] == 8 and m["iter"] == 4 and m["mode"] == "pcr"
    assert m["top5_loc_err"] <= m["top1_loc_err"] and m["top1_cls_err"] <= m["top1_loc_err"]
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in logs if "loss" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert all({"loss_cls", "loss_l1", "loss_giou", "lr", "img_per_s"} <= set(r) for r in train)
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["backbone"] == "resnet20" and cfg["mode"] == "pcr" and cfg["image_size"] == 32
    assert cfg["train_json"].endswith("instances_train.json")
    ck = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ck["task"] == "localization" and ck["iter"] == 4 and ck["localizer_kwargs"]["mode"] == "pcr"
    assert ck["classes"][0] == "T-shirt/top" and ck["cat_ids"] == list(range(1, 11))


def test_eval_recomputes_the_metrics(trained, tmp_path):
    assert eval_loc.main(["--checkpoint", str(trained / "checkpoint_last.pt"), "--output", str(tmp_path),
                          "--no-progress", "--num-pictures", "2"]) == 0
    m, train_m = (json.loads(p.read_text()) for p in (tmp_path / "metrics.json", trained / "metrics.json"))
    for k in ("top1_loc_err", "top5_loc_err", "top1_cls_err", "mean_iou", "gt_known_loc_err"):
        assert m[k] == pytest.approx(train_m[k], abs=1e-6), k
    assert (tmp_path / "predictions" / "val.png").is_file()
    assert eval_loc.main(["--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path)]) == 2
    assert eval_loc.main(["--checkpoint", str(trained / "checkpoint_last.pt"), "--output", str(tmp_path),
                          "--first-cls-weight", "0"]) == 2  # one classifier: nothing to weigh


def test_sigterm_checkpoints_and_resume_continues(base, monkeypatch):
    from heads.localization import train as loc_run

    out = base / "preempted"
    forward = loc_run.LossAdapter.forward
    calls = []

    def signalling(self, *a, **kw):  # the scheduler's SIGTERM arrives during the 2nd iteration
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *a, **kw)

    monkeypatch.setattr(loc_run.LossAdapter, "forward", signalling)
    args = _tiny(base, "--max-iters", "4", "--eval-every", "10", "--output", str(out))
    assert train_loc.main(args) == 143
    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["iter"] == 2
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(loc_run.LossAdapter, "forward", forward)
    assert train_loc.main(args + ["--resume", "auto"]) == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in logs if "event" in r] == ["start", "preempted", "start"]
    assert json.loads((out / "metrics.json").read_text())["iter"] == 4
    assert [r["iteration"] for r in logs if "loss" in r] == [1, 2, 3, 4]
    # data order, augmentation and RNG state are restored: the losses equal an uninterrupted run's
    ref = base / "uninterrupted"
    assert train_loc.main(_tiny(base, "--max-iters", "4", "--eval-every", "10", "--output", str(ref))) == 0
    ref_logs = [json.loads(line) for line in (ref / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logs if "loss" in r] == pytest.approx([r["loss"] for r in ref_logs if "loss" in r],
                                                                     rel=1e-5)


def test_on_top_of_a_classifier_trains_only_the_box_branch(base, tmp_path):
    from res_backbone import create_model

    cls = create_model("resnet20", num_classes=10, in_chans=1)
    ck = tmp_path / "cls.pt"
    torch.save({"model": cls.state_dict(), "model_name": "resnet20",
                "model_kwargs": {"num_classes": 10, "in_chans": 1, "drop_rate": 0.0},
                "pretrained_cfg": {"mean": [0.286], "std": [0.353]}, "task": "classification"}, ck)
    out = tmp_path / "run"
    args = _tiny(base, "--max-iters", "2", "--output", str(out), "--cls-checkpoint", str(ck))
    args.remove("--backbone"), args.remove("resnet20")
    assert train_loc.main(args) == 0
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)
    # the grey-level conv1 adapted to RGB (load_into), the classifier copied, both unchanged by training
    assert torch.allclose(state["model"]["backbone.conv1.weight"], cls.conv1.weight.repeat(1, 3, 1, 1) / 3)
    assert torch.equal(state["model"]["head.cls.fc.weight"], cls.fc.weight)
    assert state["pretrained_cfg"]["mean"] == [0.286] * 3


def test_time_budget_sizes_the_run(base, tmp_path):
    out = tmp_path / "budget"
    assert train_loc.main(_tiny(base, "--max-iters", "1000", "--time-budget", "0.05", "--eval-every", "100",
                                "--output", str(out))) == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    sized = [r for r in logs if r.get("event") == "time_budget"]
    # sized after 30 iterations, then re-sized every 100 from the speed so far
    assert sized[0]["iteration"] == 30 and all(r["iteration"] % 100 == 0 for r in sized[1:])
    m = json.loads((out / "metrics.json").read_text())
    assert m["iter"] == m["max_iters"] == sized[-1]["max_iters"] and 30 <= m["iter"] < 1000  # sized, not the cap
    assert m["train_time_s"] == pytest.approx(3.0, abs=30 * sized[0]["s_per_iter"] + 0.5)  # the budget, kept


def test_crop_pass_recipe_flags_and_eval_override(base, tmp_path):
    out = tmp_path / "crop"
    assert train_loc.main(_tiny(base, "--crop-size", "12", "--box-scale", "0.5", "--first-cls-weight", "0.25",
                                "--max-iters", "3", "--output", str(out))) == 0
    ck = torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert ck["localizer_kwargs"]["crop_size"] == 12 and ck["localizer_kwargs"]["first_cls_weight"] == 0.25
    for w, expected in ((None, 0.25), ("0", 0.0), ("1", 1.0)):  # the checkpoint's weight unless overridden
        assert eval_loc.main(["--checkpoint", str(out / "checkpoint_last.pt"), "--output", str(tmp_path / str(w)),
                              "--no-progress", "--num-pictures", "2", *(["--first-cls-weight", w] if w else [])]) == 0
        assert json.loads((tmp_path / str(w) / "metrics.json").read_text())["first_cls_weight"] == expected
    assert eval_loc.main(["--checkpoint", str(out / "checkpoint_last.pt"), "--output", str(tmp_path / "bad"),
                          "--first-cls-weight", "1.5"]) == 2
    assert train_loc.main(_tiny(base, "--label-smoothing", "1.0", "--max-iters", "1", "--output",
                                str(tmp_path / "ls"))) == 2


def _coco_set(folder: Path) -> Path:
    """8 images of 40x40: categories 3 and 7 (non-contiguous); image 8 has only a crowd box, the others one
    large box and one small box of the other class."""
    from PIL import Image

    (folder / "img").mkdir(parents=True)
    images, anns = [], []
    rng = torch.Generator().manual_seed(0)
    for i in range(1, 9):
        arr = (torch.rand(40, 40, 3, generator=rng) * 60).byte()
        cat = 3 if i % 2 else 7
        arr[8:30, 10:34] = 200 if cat == 3 else 120
        Image.fromarray(arr.numpy()).save(folder / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 40, "height": 40})
        anns.append({"id": 2 * i, "image_id": i, "category_id": cat, "bbox": [10, 8, 24, 22], "iscrowd": int(i == 8)})
        if i < 8:
            anns.append({"id": 2 * i + 1, "image_id": i, "category_id": 10 - cat, "bbox": [0, 32, 6, 6], "iscrowd": 0})
    path = folder / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 3, "name": "bright"}, {"id": 7, "name": "dim"}]}))
    return path


def test_coco_json_with_all_boxes(tmp_path):
    ann = _coco_set(tmp_path / "coco")
    out = tmp_path / "run"
    args = ["--backbone", "resnet20", "--train-json", str(ann), "--train-images", str(tmp_path / "coco" / "img"),
            "--val-json", str(ann), "--val-images", str(tmp_path / "coco" / "img"), "--all-boxes", "--image-size", "32",
            "--batch-size", "4", "--max-iters", "3", "--warmup-iters", "0", "--grid", "2", "--box-channels", "16",
            "--hidden", "32", "--num-pictures", "2", "--no-progress", "--output", str(out)]
    assert train_loc.main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_images"] == 7 and m["skipped_empty"] == 1 and m["all_boxes"] is True  # the crowd-only image
    assert m["classes"] == ["bright", "dim"]
    ck = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ck["cat_ids"] == [3, 7] and ck["image_size"] == 32
    assert eval_loc.main(["--checkpoint", str(out / "checkpoint_last.pt"), "--output", str(tmp_path / "ev"),
                          "--no-progress"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["all_boxes"] is True


def test_bad_inputs_exit_2(base, tmp_path):
    assert train_loc.main(_tiny(base, "--train-json", str(tmp_path / "x.json"), "--output", str(tmp_path))) == 2
    assert train_loc.main(_tiny(base, "--train-json", str(tmp_path / "missing.json"), "--train-images", str(tmp_path),
                                "--output", str(tmp_path / "o"))) == 2
    with pytest.raises(SystemExit):
        train_loc.main(["--mode", "both"])


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        train_loc.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--backbone", "--pretrained", "--mode", "--cls-checkpoint", "--train-json", "--val-json",
                 "--all-boxes", "--image-size", "--epochs", "--max-iters", "--batch-size", "--lr", "--schedule",
                 "--warmup-iters", "--amp", "--channels-last", "--workers", "--seed", "--device", "--output",
                 "--resume", "--l1-weight", "--giou-weight", "--data-dir"):
        assert flag in text, flag
    parser = train_loc.build_parser()
    assert all(a.help for a in parser._actions if a.dest != "help")


def test_config_file_recipe_parses():
    from res_backbone.engine.config import parse_with_config

    args = parse_with_config(train_loc.build_parser(), ["--config", str(ROOT / "configs/loc/fmnist_resnet18.yaml")])
    assert args.backbone == "resnet18" and args.config_sources


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_cache_images_reaches_both_splits_and_bad_values_exit_2(base, tmp_path, monkeypatch):
    from res_backbone.data import coco

    seen = []
    original = coco.CocoDetection.load_image

    def spy(self, index):
        image = original(self, index)
        seen.append((self.cache_bytes, len(self._cache)))
        return image

    monkeypatch.setattr(coco.CocoDetection, "load_image", spy)
    assert train_loc.main(_tiny(base, "--max-iters", "6", "--cache-images", "1", "--output", str(tmp_path / "c"))) == 0
    assert seen and all(limit == 2**20 for limit, _ in seen)  # train and val sets both got the budget
    assert max(n for _, n in seen) > 0  # and kept images (24 train canvases of 32 px: 74 KB)
    assert train_loc.main(_tiny(base, "--max-iters", "1", "--cache-images", "-1", "--output",
                                str(tmp_path / "bad"))) == 2
