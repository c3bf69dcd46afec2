"""Bad data never kills a long run: the pre-flight check, both policies, mid-run faults and crashes, in
train_det.py, train_loc.py and train_cls.py (tiny runs on CPU)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train_cls  # noqa: E402  (tools/ is on pytest's pythonpath)
import train_det  # noqa: E402
import train_loc  # noqa: E402
from res_backbone.data.synthetic import make_synthetic_coco
from res_backbone.engine.faults import InjectedFault
from test_train_det import TINY  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = {"missing", "empty", "truncated", "undecodable", "size_mismatch"}


def _damage_pixels(path):
    """Garbage in the pixel data, header and end marker intact: passes the header check, fails to decode."""
    raw = bytearray(path.read_bytes())
    start = raw.index(b"IDAT") + 4
    raw[start:start + 40] = bytes(40)
    path.write_bytes(bytes(raw))


def _break(folder, names):
    """One file of each bad kind among ``names`` (the first five)."""
    (folder / names[0]).unlink()
    (folder / names[1]).write_bytes(b"")
    raw = (folder / names[2]).read_bytes()
    (folder / names[2]).write_bytes(raw[: len(raw) // 2])
    (folder / names[3]).write_bytes(b"not an image at all" * 10)
    with Image.open(folder / names[4]) as im:
        im.resize((im.width + 3, im.height)).save(folder / names[4])


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("badcoco")
    paths = make_synthetic_coco(root, num_train=12, num_val=3, image_size=64, num_classes=3, seed=0)
    return root, paths


def _copy(coco, tmp_path):
    root, paths = coco
    shutil.copytree(root, tmp_path / "data")
    return {k: v.replace(str(root), str(tmp_path / "data")) for k, v in paths.items()}


def _train_names(paths):
    """The training images with a box (the ones every task reads; localization leaves the others out)."""
    data = json.loads(open(paths["train_json"]).read())
    boxed = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd")}
    return [im["file_name"] for im in data["images"] if im["id"] in boxed]


def _det_args(paths, out, *extra):
    return [*TINY, "--train-json", paths["train_json"], "--train-images", paths["train_images"],
            "--val-json", paths["val_json"], "--val-images", paths["val_images"], "--output", str(out),
            "--num-pictures", "0", *extra]


def _loc_args(paths, out, *extra):
    return ["--backbone", "resnet20", "--train-json", paths["train_json"], "--train-images", paths["train_images"],
            "--val-json", paths["val_json"], "--val-images", paths["val_images"], "--image-size", "32",
            "--batch-size", "4", "--warmup-iters", "0", "--grid", "2", "--box-channels", "8", "--hidden", "16",
            "--num-pictures", "0", "--no-progress", "--output", str(out), *extra]


def _report(out):
    return json.loads((out / "bad_images.json").read_text())


@pytest.mark.parametrize("tool", ["det", "loc"])
def test_preflight_lists_every_bad_file_then_error_stops_and_skip_trains(coco, tmp_path, tool, caplog):
    paths = _copy(coco, tmp_path)
    names = _train_names(paths)
    _break(tmp_path / "data" / "train", names)
    main, args = (train_det.main, _det_args) if tool == "det" else (train_loc.main, _loc_args)
    out = tmp_path / "run"
    assert main(args(paths, out, "--max-iters", "2")) == 2
    assert {b["kind"] for b in _report(out)["bad"]} == KINDS and not list(out.glob("checkpoint*.pt"))
    assert "5 bad image(s) found before training" in caplog.text and names[0] in caplog.text
    assert main(args(paths, out, "--max-iters", "2", "--on-bad-image", "skip")) == 0
    report = _report(out)
    assert report["policy"] == "skip" and len(report["bad"]) == 5 and report["checked"] >= len(names) + 1
    assert "on_bad_image: skip" in (out / "config.yaml").read_text()
    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["task"] in ("detection", "localization")


@pytest.mark.parametrize("tool", ["det", "loc"])
def test_a_file_that_fails_mid_run_keeps_the_training_done(coco, tmp_path, tool, caplog):
    paths = _copy(coco, tmp_path)
    names = _train_names(paths)
    for name in names[:6]:  # half the split: some batch after the first meets one
        _damage_pixels(tmp_path / "data" / "train" / name)
    main, args = (train_det.main, _det_args) if tool == "det" else (train_loc.main, _loc_args)
    out = tmp_path / "run"
    assert main(args(paths, out, "--max-iters", "6", "--batch-size", "2")) == 2
    assert "bad image during training" in caplog.text and "--resume auto" in caplog.text
    ck = torch.load(out / "checkpoint_last.pt", weights_only=True)  # present and loadable
    assert ck.get("iteration", ck.get("iter")) >= 0
    assert main(args(paths, tmp_path / "skip", "--max-iters", "6", "--batch-size", "2",
                     "--on-bad-image", "skip")) == 0
    mid = _report(tmp_path / "skip")["mid_run"]
    assert mid and all("cannot decode" in m["error"] or "truncated" in m["error"].lower() for m in mid)


def _folders(root, n=6, size=20):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n if split == "train" else 2):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    return root


def _cls_args(root, out, *extra):
    return ["--backbone", "resnet20", "--train-dir", str(root / "train"), "--val-dir", str(root / "val"),
            "--input-size", "16", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--warmup-iters", "0",
            "--no-progress", "--output", str(out), *extra]


def test_train_cls_folders_preflight_and_skip(tmp_path, caplog):
    root = _folders(tmp_path / "imgs")
    (root / "train" / "a" / "0.png").write_bytes(b"")
    (root / "train" / "b" / "1.png").write_bytes(b"junk" * 30)
    assert train_cls.main(_cls_args(root, tmp_path / "run")) == 2
    assert {b["kind"] for b in _report(tmp_path / "run")["bad"]} == {"empty", "undecodable"}
    assert train_cls.main(_cls_args(root, tmp_path / "run", "--on-bad-image", "skip")) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["top1_err"] is not None


@pytest.mark.parametrize("tool", ["det", "loc", "cls"])
def test_an_exception_mid_step_writes_an_emergency_checkpoint(coco, tmp_path, tool, monkeypatch, caplog):
    monkeypatch.setenv("RB_FAULT_INJECT", "step:2:RAISE")
    out = tmp_path / "run"
    if tool == "det":
        with pytest.raises(InjectedFault):  # a single process lets it propagate, traceback and all
            train_det.main(_det_args(coco[1], out, "--max-iters", "4", "--checkpoint-every", "1"))
    elif tool == "loc":
        assert train_loc.main(_loc_args(coco[1], out, "--max-iters", "4", "--checkpoint-every", "1")) == 1
    else:
        root = _folders(tmp_path / "imgs")
        assert train_cls.main(_cls_args(root, out, "--checkpoint-every", "1")) == 1
    emergency = torch.load(out / "checkpoint_emergency.pt", weights_only=True)
    last = torch.load(out / "checkpoint_last.pt", weights_only=True)  # the last good one, untouched
    it = lambda ck: ck.get("iteration", ck.get("iter"))  # noqa: E731
    assert it(emergency) == 2 and it(last) == 2 and "emergency checkpoint" in caplog.text


def test_check_images_tool(coco, tmp_path, capsys):
    import check_images

    paths = _copy(coco, tmp_path)
    args = ["--json", paths["train_json"], "--images", paths["train_images"], "--output", str(tmp_path / "c"),
            "--no-progress"]
    assert check_images.main(args) == 0
    assert "12 images OK (header mode, 0 from the cache)" in capsys.readouterr().out
    assert check_images.main(args) == 0 and "12 from the cache" in capsys.readouterr().out
    _break(tmp_path / "data" / "train", _train_names(paths))
    assert check_images.main(args + ["--mode", "full"]) == 2
    assert len(_report(tmp_path / "c")["bad"]) == 5
    with pytest.raises(SystemExit):
        check_images.main(["--output", str(tmp_path)])


def test_evaluation_tools_check_first(coco, tmp_path, caplog):
    import eval_cls
    import eval_loc

    root = _folders(tmp_path / "imgs")
    assert train_cls.main(_cls_args(root, tmp_path / "cls", "--max-iters", "1", "--check-images", "none")) == 0
    (root / "val" / "a" / "0.png").write_bytes(b"")
    common = ["--checkpoint", str(tmp_path / "cls" / "checkpoint_last.pt"), "--val-dir", str(root / "val"),
              "--protocol", "center", "--no-progress", "--output", str(tmp_path / "ev")]
    assert eval_cls.main(common) == 2 and "empty" in caplog.text
    assert eval_cls.main(common + ["--on-bad-image", "skip"]) == 0
    report = json.loads((tmp_path / "ev" / "eval_cls.json").read_text())
    assert report["data"]["bad_images_left_out"] == 1 and report["data"]["n_images"] == 3
    paths = _copy(coco, tmp_path)
    assert train_loc.main(_loc_args(paths, tmp_path / "loc", "--max-iters", "1")) == 0
    val = json.loads(open(paths["val_json"]).read())
    (tmp_path / "data" / "val" / val["images"][0]["file_name"]).unlink()
    args = ["--checkpoint", str(tmp_path / "loc" / "checkpoint_last.pt"), "--no-progress",
            "--output", str(tmp_path / "le")]
    assert eval_loc.main(args) == 2 and "missing: 1" in caplog.text


def test_train_cls_mid_run_fault_keeps_the_training_done(tmp_path, caplog):
    root = _folders(tmp_path / "imgs", n=8)
    for i in range(4, 8):  # damaged pixels: the header check passes, decoding fails when a batch reaches them
        _damage_pixels(root / "train" / "a" / f"{i}.png")
    out = tmp_path / "run"
    assert train_cls.main(_cls_args(root, out, "--batch-size", "2")) == 2
    assert "bad image during training" in caplog.text
    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["iter"] >= 0
    assert train_cls.main(_cls_args(root, tmp_path / "skip", "--batch-size", "2", "--on-bad-image", "skip")) == 0
    assert _report(tmp_path / "skip")["mid_run"]


def test_eval_det_checks_first(coco, tmp_path, caplog):
    import eval_det

    paths = _copy(coco, tmp_path)
    assert train_det.main(_det_args(paths, tmp_path / "det", "--max-iters", "1")) == 0
    val = json.loads(open(paths["val_json"]).read())
    (tmp_path / "data" / "val" / val["images"][0]["file_name"]).write_bytes(b"")
    args = ["--checkpoint", str(tmp_path / "det" / "checkpoint_last.pt"), "--workers", "0", "--num-pictures", "0",
            "--no-progress", "--output", str(tmp_path / "ev")]
    assert eval_det.main(args) == 2 and "empty: 1" in caplog.text
    assert eval_det.main(args + ["--on-bad-image", "skip"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["evaluated"]["bad_images_left_out"] == 1
