"""train_det.py / eval_det.py --diagnostics and --coco-backend end to end on a tiny synthetic run (in-process)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--backbone", "resnet18", "--image-size", "64", "--synthetic-train", "4", "--synthetic-val", "3",
         "--synthetic-size", "64", "--batch-size", "2", "--workers", "0", "--fpn-channels", "16",
         "--representation-size", "32", "--rpn-pre-nms-top-n-test", "200", "--rpn-post-nms-top-n-test", "50",
         "--anchor-sizes", "8", "16", "32", "64", "128", "--warmup-iters", "0", "--num-pictures", "1",
         "--no-progress", "--box-score-thresh", "0.0"]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_and_eval_write_the_diagnostics(tmp_path, capsys, one_thread):
    pytest.importorskip("faster_coco_eval")
    out, ev = tmp_path / "run", tmp_path / "eval"
    assert _tool("train_det").main([*SMALL, "--max-iters", "2", "--data-dir", str(tmp_path / "data"),
                                    "--output", str(out), "--diagnostics", "--diagnostics-score-thresh", "0"]) == 0
    printed = capsys.readouterr().out
    assert "Error breakdown" in printed and "RPN recall" in printed and (out / "diagnostics.json").is_file()
    assert _tool("eval_det").main(["--checkpoint", str(out / "checkpoint_last.pt"), "--workers", "0", "--no-progress",
                                   "--num-pictures", "0", "--coco-backend", "faster", "--diagnostics",
                                   "--diagnostics-score-thresh", "0", "--output", str(ev)]) == 0
    printed = capsys.readouterr().out
    assert "COCO backend faster" in printed and "AP50  recall@.5" in printed and "Error breakdown" in printed
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["coco_backend"] == "faster" and set(metrics["per_class_recall"]) == set(metrics["per_class_AP"])
    for name in ("pr_curves.png", "confusion.png", "confusion.json", "diagnostics.json"):
        assert (ev / name).stat().st_size > 0, name
    diag = json.loads((ev / "diagnostics.json").read_text())
    assert set(diag["error_breakdown"]["dAP50"]) == {"cls", "loc", "both", "dupe", "bkg", "missed"}
    assert diag["error_breakdown"]["AP50"] == pytest.approx(metrics["AP50"])
    rpn = diag["rpn_recall"]
    assert rpn["gt_boxes"]["all"] > 0 and rpn["proposals_kept"] == 50
    assert all(0.0 <= r["all"] <= 1.0 for by_iou in rpn["recall"].values() for r in by_iou.values())
    # recall grows with the number of proposals and falls with the IoU
    assert rpn["recall"]["100"]["0.5"]["all"] <= rpn["recall"]["300"]["0.5"]["all"]
    assert rpn["recall"]["100"]["0.7"]["all"] <= rpn["recall"]["100"]["0.5"]["all"]
    worst = diag["worst_images"]["missed"] + diag["worst_images"]["false_positives"]
    assert len(list((ev / "worst").glob("*.png"))) == len(worst) > 0
    conf = json.loads((ev / "confusion.json").read_text())
    assert conf["classes"][-1] == "background" and len(conf["matrix"]) == len(conf["classes"])
