"""tools/bench.py detector end to end on a tiny input (structure and equivalence checked, no timings asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_detector_tiny_run(tmp_path):
    out = tmp_path / "det.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "detector", "--models", "resnet18", "--image-size", "64",
         "--repeats", "1", "--warmup", "0", "--num-classes", "3", "--train-batch-size", "1", "--roi-align", "bag",
         "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][0]
    assert {(r["mode"], r["contender"]) for r in run["results"]} == {
        ("infer", "torchvision"), ("infer", "ours_eager"), ("infer", "ours"),
        ("train", "torchvision"), ("train", "ours_eager")}
    assert run["equivalence"]["ours_eager"]["same_labels"]
    assert run["equivalence"]["ours_eager"]["max_box_diff_px"] <= 1e-3
    assert run["roi_align"] == "bag"
    for q in run["ratios"]:
        assert q["speedup_vs_torchvision"] > 0 and q["speedup_paired_median"] > 0
