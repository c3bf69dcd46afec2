"""tools/predict.py end to end: folders with broken files, parity with tools/eval_det.py, classifier and localizer
checkpoints, clear errors, an interrupted run's valid JSON (tiny models trained for a few iterations, CPU)."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train_det import TINY  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY_DET = [*TINY, "--image-size", "96", "--synthetic-train", "8", "--synthetic-val", "6", "--synthetic-size", "96",
            "--num-pictures", "0", "--max-iters", "4", "--eval-every", "100"]  # >= 65 px: exported detectors


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


predict = _tool("predict")
eval_det = _tool("eval_det")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    base = tmp_path_factory.mktemp("pred")
    out = base / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_det.py"), *TINY_DET, "--data-dir",
                           str(base / "data"), "--output", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = base / "data" / "shapes_s0"
    return {"ckpt": out / "checkpoint_last.pt", "val_json": root / "annotations" / "instances_val.json",
            "val_images": root / "val", "base": base}


def test_a_folder_with_broken_files_is_predicted_and_the_bad_ones_named(det, tmp_path, capsys):
    src = tmp_path / "imgs"
    shutil.copytree(det["val_images"], src / "sub")
    (src / "empty.jpg").write_bytes(b"")
    (src / "garbage.png").write_bytes(b"\x89PNG not really")
    good = sorted((src / "sub").glob("*.png"))[0].read_bytes()
    (src / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "broken.mp4").write_bytes(b"not a video")
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(src / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), 60 * i, np.uint8))
    writer.release()
    out = tmp_path / "out"
    rc = predict.main(["--checkpoint", str(det["ckpt"]), "--source", str(src), "--recursive", "--output", str(out),
                       "--max-pictures", "2", "--save-txt", "--no-progress", "--score-thresh", "0",
                       "--vid-stride", "2"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "8 image(s)" in text and "img/s" in text and "waited for images" in text  # 6 files, 2 video frames
    bad = ["broken.mp4", "empty.jpg", "garbage.png", "truncated.png"]
    skipped = json.loads((out / "skipped.json").read_text())
    assert sorted(Path(s["file_name"]).name for s in skipped) == bad
    assert all(name in text for name in bad)
    records = json.loads((out / "predictions.json").read_text())
    assert records and {"file_name", "category_id", "category_name", "bbox", "score"} <= set(records[0])
    assert {r["category_id"] for r in records} <= {3, 7, 11, 15, 19}
    assert len(list((out / "pictures").glob("*.png"))) == 2 and len(list((out / "labels").glob("*.txt"))) == 8
    assert sorted((out / "labels").glob("clip_*.txt"))[-1].name == "clip_000002.txt"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 8 and summary["skipped"] == 4 and 0 <= summary["wait_share"] <= 1


# name -> (checkpoint .pt, tmp dir) -> the model file predict.py gets
def _exported(fmt):
    def make(ckpt, tmp):
        pytest.importorskip("onnxruntime")
        from heads.export import export_checkpoint

        return export_checkpoint(ckpt, fmt, tmp / f"model.{fmt}")
    return make


MODEL_FILES = {"pt": lambda ckpt, tmp: ckpt, "onnx": _exported("onnx"), "pt2": _exported("pt2")}


@pytest.mark.parametrize("fmt", sorted(MODEL_FILES))
def test_parity_predict_coco_json_gives_eval_det_ap(det, tmp_path, fmt, capsys):
    """The Parity target: predict.py --coco-json on the val images scores the AP eval_det.py gives the .pt, and
    writes the same detections (loadRes reads predictions.json as is)."""
    from pycocotools.coco import COCO

    from res_backbone.evaluation.coco import coco_evaluate

    model_file = MODEL_FILES[fmt](det["ckpt"], tmp_path)
    assert eval_det.main(["--checkpoint", str(det["ckpt"]), "--val-json", str(det["val_json"]), "--val-images",
                          str(det["val_images"]), "--workers", "0", "--num-pictures", "0", "--no-progress",
                          "--output", str(tmp_path / "eval")]) == 0
    assert predict.main(["--checkpoint", str(model_file), "--source", str(det["val_images"]), "--coco-json",
                         str(det["val_json"]), "--no-pictures", "--no-progress", "--output", str(tmp_path / "p")]) == 0
    ref = json.loads((tmp_path / "eval" / "detections.json").read_text())
    got = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(got) == len(ref) > 0
    for a, b in zip(sorted(got, key=lambda d: (d["image_id"], -d["score"])),
                    sorted(ref, key=lambda d: (d["image_id"], -d["score"]))):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert abs(a["score"] - b["score"]) < 1e-4 and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 1e-2
    ap_eval = json.loads((tmp_path / "eval" / "metrics.json").read_text())["AP"]
    ap_pred = coco_evaluate(str(det["val_json"]), str(tmp_path / "p" / "predictions.json"))["AP"]
    assert abs(ap_pred - ap_eval) <= 1e-3
    COCO(str(det["val_json"])).loadRes(str(tmp_path / "p" / "predictions.json"))


def test_clear_errors_exit_2(det, tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--output", str(tmp_path / "o"), "--no-progress"]
    assert predict.main(["--checkpoint", str(det["ckpt"]), "--source", str(empty), *args]) == 2
    assert "empty: no image or video files" in caplog.text
    assert predict.main(["--checkpoint", str(tmp_path / "missing.pt"), "--source", str(det["val_images"]), *args]) == 2
    assert "missing.pt" in caplog.text
    assert predict.main(["--checkpoint", str(det["ckpt"]), "--source", str(det["val_images"]), "--classes", "dog",
                         *args]) == 2
    assert "unknown class 'dog'" in caplog.text and "circle (3)" in caplog.text
    caplog.clear()
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"")
    assert predict.main(["--checkpoint", str(det["ckpt"]), "--source", str(only_bad), *args]) == 2
    assert "x.png" in caplog.text and "no image could be predicted" in caplog.text


def test_an_interrupted_run_leaves_valid_json(det, tmp_path, monkeypatch):
    from heads import predict_run

    calls = {"n": 0}
    real_add = predict_run._Writer.add

    def add_then_stop(self, item, result, image):
        real_add(self, item, result, image)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(predict_run._Writer, "add", add_then_stop)
    cfg = predict_run.PredictConfig(checkpoint=[str(det["ckpt"])], source=[str(det["val_images"])],
                                    output=str(tmp_path / "o"), max_pictures=0, progress=False, score_thresh=0.0)
    with pytest.raises(KeyboardInterrupt):
        predict_run.run_prediction(cfg)
    records = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert len({r["file_name"] for r in records}) == 3


@pytest.fixture(scope="module")
def cls_and_loc(tmp_path_factory):
    from res_backbone.data.fashion_mnist import write_fake_fashion_mnist

    base = tmp_path_factory.mktemp("clsloc")
    write_fake_fashion_mnist(base / "fmnist", n_train=32, n_test=16)
    common = ["--backbone", "resnet20", "--batch-size", "8", "--warmup-iters", "0", "--no-progress", "--max-iters", "2"]
    for tool, extra in (("train_cls", ["--data-dir", str(base / "fmnist"), "--threads", "1"]),
                        ("train_loc", ["--fmnist-root", str(base / "fmnist"), "--data-dir", str(base / "data"),
                                       "--fmnist-train", "16", "--fmnist-val", "8", "--canvas", "32",
                                       "--item-scale", "16", "28", "--num-pictures", "0", "--grid", "2",
                                       "--box-channels", "16", "--hidden", "32"])):
        assert _tool(tool).main([*common, *extra, "--output", str(base / tool)]) == 0
    return base / "train_cls" / "checkpoint_last.pt", base / "train_loc" / "checkpoint_last.pt"


def test_classifier_and_localizer_checkpoints(cls_and_loc, det, tmp_path, caplog):
    from PIL import Image

    img = tmp_path / "in" / "photo.png"
    img.parent.mkdir()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(img)
    cls_ck, loc_ck = cls_and_loc
    for ck, task in ((cls_ck, "classification"), (loc_ck, "localization")):
        out = tmp_path / task
        assert predict.main(["--checkpoint", str(ck), "--source", str(img), "--topk", "3", "--output", str(out),
                             "--no-progress", "--save-txt"]) == 0
        (rec,) = json.loads((out / "predictions.json").read_text())
        assert len(rec["topk"]) == 3 and rec["topk"][0]["score"] >= rec["topk"][1]["score"]
        assert rec["category_name"] == rec["topk"][0]["category_name"]
        if task == "localization":
            x, y, w, h = rec["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 50.001 and y + h <= 40.001
        assert (out / "pictures" / "photo.png").is_file()
    # a classifier where a detector is expected
    assert eval_det.main(["--checkpoint", str(cls_ck), "--output", str(tmp_path / "e"), "--no-progress"]) == 2
    assert "a classification model, but a detection model is expected" in caplog.text
    assert predict.main(["--checkpoint", str(det["ckpt"]), str(cls_ck), "--source", str(img), "--output",
                         str(tmp_path / "mix"), "--no-progress"]) == 2
    assert "an ensemble needs the same task and classes" in caplog.text


def test_sigterm_exits_143_with_valid_json_of_the_finished_images(det, tmp_path):
    import signal
    import time

    lst = tmp_path / "many.txt"
    lst.write_text("\n".join(str(p) for p in sorted(det["val_images"].glob("*.png")) * 100) + "\n")
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "predict.py"), "--checkpoint", str(det["ckpt"]),
                             "--source", str(lst), "--batch-size", "1", "--no-pictures", "--no-progress",
                             "--score-thresh", "0", "--output", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "predictions.json").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "predictions.json holds the images finished" in err
    records = json.loads((out / "predictions.json").read_text())
    assert isinstance(records, list) and len({r["file_name"] for r in records}) >= 1
