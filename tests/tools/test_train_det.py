"""tools/train_det.py and tools/eval_det.py end to end on a tiny synthetic set (CPU, seconds)."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--backbone", "resnet18", "--image-size", "64", "--synthetic-train", "12", "--synthetic-val", "4",
    "--synthetic-size", "64", "--batch-size", "2", "--workers", "0", "--fpn-channels", "32",
    "--representation-size", "64", "--rpn-pre-nms-top-n-train", "100", "--rpn-post-nms-top-n-train", "50",
    "--rpn-pre-nms-top-n-test", "100", "--rpn-post-nms-top-n-test", "50", "--box-batch-size-per-image", "32",
    "--rpn-batch-size-per-image", "64", "--anchor-sizes", "8", "16", "32", "64", "128", "--warmup-iters", "0",
    "--schedule", "constant", "--lr", "0.01", "--log-every", "1", "--num-pictures", "2", "--no-progress",
]


def _run(tool, *args, check=True, **kw):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, **kw)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("det")
    out = base / "run"
    _run("train_det.py", *TINY, "--max-iters", "6", "--data-dir", str(base / "data"), "--output", str(out),
         "--checkpoint-every", "4")
    return base, out


def test_train_writes_every_output(trained):
    _, out = trained
    for name in ("config.yaml", "checkpoint_last.pt", "checkpoint_best.pt", "log.jsonl", "metrics.json",
                 "detections.json"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    assert len(list((out / "predictions").glob("*.png"))) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert isinstance(metrics[k], float), k
    assert set(metrics["per_class_AP"]) == {"circle", "square", "triangle", "cross", "ring"}
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in logs if "loss" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all({"loss_objectness", "loss_rpn_box", "loss_cls", "loss_box", "lr", "img_per_s"} <= set(r) for r in train)
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["backbone"] == "resnet18" and cfg["max_iters"] == 6


def test_detections_json_is_accepted_by_pycocotools(trained):
    _, out = trained
    from pycocotools.coco import COCO

    cfg = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    gt = COCO(cfg["val_json"])
    dets = json.loads((out / "detections.json").read_text())
    if dets:
        res = gt.loadRes(str(out / "detections.json"))
        assert set(res.getCatIds()) <= set(gt.getCatIds())
        assert all(d["category_id"] in (3, 7, 11, 15, 19) for d in dets)  # original, non-contiguous ids


def test_eval_ensemble_with_tta(trained):
    base, out = trained
    ev = base / "eval"
    proc = _run("eval_det.py", "--checkpoint", str(out / "checkpoint_last.pt"), str(out / "checkpoint_best.pt"),
                "--tta-scales", "64", "80", "--tta-flip", "--merge", "wbf", "--workers", "0", "--output", str(ev),
                "--no-progress")
    assert "Average Precision" in proc.stdout and "8 variant(s)" in proc.stdout
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["evaluated"]["merge"] == "wbf" and len(metrics["evaluated"]["checkpoints"]) == 2
    assert (ev / "detections.json").is_file() and list((ev / "predictions").glob("*.png"))


def test_bad_inputs_get_clear_errors(trained, tmp_path):
    base, out = trained
    proc = _run("train_det.py", "--backbone", "resnet51", check=False)
    assert proc.returncode == 2 and "resnet50" in proc.stderr and "resnet51" in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    proc = _run("train_det.py", *TINY, "--train-json", str(bad), "--train-images", str(tmp_path),
                "--output", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "bad.json" in proc.stderr
    proc = _run("eval_det.py", "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "e"), check=False)
    assert proc.returncode == 2 and "missing.pt" in proc.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_sise: 2\n")
    proc = _run("train_det.py", "--config", str(cfg), check=False)
    assert proc.returncode == 2 and "batch_sise" in proc.stderr


def test_help_explains_every_flag():
    import eval_det
    import train_det

    for tool in (train_det, eval_det):
        assert "--output" in tool.build_parser().format_help()
    out = train_det.build_parser().format_help()
    for flag in ("--backbone", "--arch", "--config", "--train-json", "--train-images", "--val-json", "--val-images",
                 "--pretrained", "--epochs", "--max-iters", "--batch-size", "--lr", "--image-size", "--amp",
                 "--channels-last", "--compile", "--workers", "--seed", "--device", "--resume"):
        assert flag in out, flag


def _losses(path):
    return {r["iteration"]: r["loss"] for r in map(json.loads, Path(path).read_text().splitlines()) if "loss" in r}


def test_sigterm_checkpoints_and_resume_matches_uninterrupted_run(tmp_path):
    common = [*TINY, "--max-iters", "30", "--deterministic", "--data-dir", str(tmp_path / "data"),
              "--checkpoint-every", "100", "--eval-every", "100"]
    _run("train_det.py", *common, "--output", str(tmp_path / "a"))
    ref = _losses(tmp_path / "a" / "log.jsonl")
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train_det.py"), *common, "--output", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and len(_losses(log)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    stopped = max(_losses(log))
    assert stopped < 30, "the run ended before the signal; nothing to resume"
    import torch

    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ckpt["iteration"] == stopped
    _run("train_det.py", *common, "--output", str(out), "--resume", "auto")
    after = _losses(log)
    assert max(after) == 30
    for it in range(stopped + 1, 31):
        assert after[it] == pytest.approx(ref[it], rel=1e-5, abs=1e-6), (it, after[it], ref[it])


def test_eval_fast_path_matches_the_model_as_trained(trained):
    base, out = trained
    dets = {}
    for name, extra in (("fast", ()), ("eager", ("--no-fast-path",))):
        ev = base / f"eval_{name}"
        _run("eval_det.py", "--checkpoint", str(out / "checkpoint_last.pt"), "--workers", "0", "--num-pictures", "0",
             "--output", str(ev), "--no-progress", *extra)
        assert json.loads((ev / "metrics.json").read_text())["evaluated"]["fast_path"] is (name == "fast")
        dets[name] = sorted(json.loads((ev / "detections.json").read_text()), key=lambda d: (d["image_id"], -d["score"]))
    assert len(dets["fast"]) == len(dets["eager"]) > 0
    for a, b in zip(dets["fast"], dets["eager"]):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert abs(a["score"] - b["score"]) < 1e-4
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 1e-2
