"""tools/bench.py end to end in a subprocess: summary and a tiny backbone run, JSON checked (no timings asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "tools" / "bench.py"


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_help_lists_every_flag():
    out = _run("backbone", "--help")
    for flag in ("--models", "--batch-sizes", "--repeats", "--warmup", "--device", "--amp", "--threads",
                 "--output", "--image-size", "--ablation"):
        assert flag in out


def test_summary_json(tmp_path):
    out_file = tmp_path / "summary.json"
    stdout = _run("summary", "--models", "resnet18,resnet50,plain50", "--image-size", "64", "--output", str(out_file))
    assert "resnet50" in stdout
    data = json.loads(out_file.read_text())
    assert data["image_size"] == 64
    rows = {r["model"]: r for r in data["models"]}
    assert list(rows) == ["resnet18", "resnet50", "plain50"]
    assert rows["resnet50"]["params"] == 25_557_032  # torchvision's resnet50
    # basic blocks have no 1x1 to move the stride to; bottlenecks save multiply-adds with it there
    assert rows["resnet18"]["macs_v1_5"] == rows["resnet18"]["macs_stride_in_1x1"]
    assert rows["resnet50"]["macs_stride_in_1x1"] < rows["resnet50"]["macs_v1_5"]
    assert rows["plain50"]["params"] < rows["resnet50"]["params"]


@pytest.mark.parametrize("extra", [[], ["--threads", "1"]], ids=["default", "one_thread"])
def test_backbone_tiny_run(tmp_path, extra):
    out_file = tmp_path / "bench.json"
    stdout = _run(
        "backbone", "--models", "resnet18", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
        "--image-size", "32", "--train-batch-size", "2", "--no-progress", "--output", str(out_file), *extra,
    )
    assert "ours" in stdout
    data = json.loads(out_file.read_text())
    assert {"command", "environment", "config", "runs"} <= set(data)
    assert data["environment"]["torch"]
    (run,) = data["runs"]
    assert run["model"] == "resnet18"
    got = {(r["mode"], r["batch_size"], r["contender"]) for r in run["results"]}
    # every library in both memory formats (channels-last is the baselines' best eager setting)
    infer = ("torchvision", "torchvision_cl", "timm", "timm_cl", "ours_eager", "ours_cl", "ours")
    train = ("torchvision", "torchvision_cl", "timm", "timm_cl", "ours_eager", "ours")
    features = ("ours_forward_features", "ours_intermediates_last", "ours_intermediates_all")  # timm's feature API
    assert got == {("infer", 1, k) for k in infer} | {("train", 2, k) for k in train} | {("features", 1, k) for k in features}
    (overhead,) = run["intermediates_overhead"]
    assert overhead["all_ratio"] == pytest.approx(overhead["intermediates_all_ms"] / overhead["forward_features_ms"])
    assert run["max_rel_diff"]["intermediates_final_b1"] == 0 and "forward_intermediates, same stages" in stdout
    for r in run["results"]:
        assert len(r["times_s"]) == 1 and r["img_per_s"] > 0 and r["median_ms"] > 0
    assert {(q["mode"], q["contender"]) for q in run["ratios"]} == {
        ("infer", "ours_eager"), ("infer", "ours_cl"), ("infer", "ours"), ("train", "ours_eager"), ("train", "ours")}
    for q in run["ratios"]:
        assert all(q[f"vs_{b}"] > 0 for b in ("torchvision", "torchvision_cl", "timm", "timm_cl"))
    # which part of the gain is memory format and which BN folding: the factors multiply to the total
    by = {(r["mode"], r["contender"]): r["img_per_s"] for r in run["results"]}
    (a_inf, a_train) = run["attribution"]
    assert (a_inf["mode"], a_train["mode"]) == ("infer", "train")
    assert a_inf["memory_format"] == pytest.approx(by["infer", "ours_cl"] / by["infer", "ours_eager"])
    assert a_inf["bn_folding"] == pytest.approx(by["infer", "ours"] / by["infer", "ours_cl"])
    assert a_inf["memory_format"] * a_inf["bn_folding"] == pytest.approx(a_inf["total"])
    assert a_inf["vs_torchvision_best"] == pytest.approx(
        by["infer", "ours"] / max(by["infer", "torchvision"], by["infer", "torchvision_cl"]))
    assert a_train["bn_folding"] is None and a_train["memory_format"] == pytest.approx(a_train["total"])
    assert "memory format" in stdout and "BN folding" in stdout
    # same weights in all three libraries: outputs agree
    assert all(d < 1e-4 for d in run["max_rel_diff"].values())


def test_time_interleaved_rotates_order():
    from studies.timing import time_interleaved

    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = time_interleaved(fns, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_report_renders_markdown(tmp_path):
    out_file = tmp_path / "bench.json"
    _run("backbone", "--models", "resnet18", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
         "--image-size", "32", "--no-train", "--no-progress", "--output", str(out_file))
    md = _run("report", str(out_file))
    assert "### resnet18" in md and "| infer | 1 | **ours** |" in md


def test_report_bad_file_is_named(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    proc = subprocess.run([sys.executable, str(BENCH), "report", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "x.json" in proc.stderr and "'runs'" in proc.stderr


def test_bench_deploy_times_a_detector_checkpoint(tmp_path, capsys):
    from heads.detection import build_detector
    from studies.bench_deploy import bench_deploy, markdown

    kw = dict(backbone="resnet18", num_classes=2, fpn_channels=16, representation_size=32, rpn_pre_nms_top_n_test=50,
              rpn_post_nms_top_n_test=20)
    torch.manual_seed(0)
    torch.save({"model": build_detector(pretrained=False, **kw).state_dict(), "task": "detection", "arch": "resnet18",
                "detector_kwargs": kw, "cat_ids": [1, 2], "class_names": ["a", "b"], "config": {"image_size": 96}},
               tmp_path / "det.pt")
    result = bench_deploy(str(tmp_path / "det.pt"), [], [96], repeats=2, warmup=1)
    rows = {r["contender"]: r for r in result["rows"]}
    assert set(rows) == {"eager (as trained)", "inference copy"} and result["peak_gflops"] > 0
    assert all(r["ms_per_image"] > 0 and r["gmacs"] > 0 and 0 < r["share_of_peak"] for r in rows.values())
    assert "| 96 | inference copy |" in markdown(result)


def test_bench_deploy_models_against_torchvision(tmp_path):
    """--models: torchvision's FasterRCNN and ours with the same weights; ours gives torchvision's detections.
    (The ONNX rows' equivalence is tests/heads/export's; here they would cost a minute of export.)"""
    from studies.bench_deploy import bench_deploy_models, markdown_models

    result = bench_deploy_models(["resnet18"], [64], repeats=1, warmup=0, compile=False, onnx=False,
                                 workdir=str(tmp_path))
    rows = {r["contender"]: r for r in result["rows"]}
    assert set(rows) == {"torchvision (NCHW)", "torchvision (channels-last)", "ours as built", "inference copy"}
    assert rows["ours as built"]["num_detections"] > 0
    for name in ("ours as built", "inference copy"):
        assert rows[name]["within_tolerance"] and rows[name]["same_labels"], rows[name]
    assert max(r["x_torchvision_best"] for k, r in rows.items() if k.startswith("torchvision")) == 1.0
    assert "| resnet18-FPN | 64 | inference copy |" in markdown_models(result)
    rows["inference copy"].update(contender="ONNX Runtime int8", within_tolerance=False)
    assert "approximate (int8): labels the same" in markdown_models(result)
