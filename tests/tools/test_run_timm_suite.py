"""tools/run_timm_suite.py: timm's own tests/test_models.py over two small rb_ models (about a minute on 2 CPU cores).

The suite comes from the sdist of the installed timm, which needs the package index (or the file in
.cache/timm-sdist/). Without it the test does not pass silently: it is reported NOT RUN, with the
reason, in the session summary and in .cache/not_run.txt (tests/tools/conftest.py).
"""
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from studies.timm_suite import EXIT_NO_SDIST, JOINED_TESTS

REPO = Path(__file__).resolve().parents[2]


def test_timm_own_suite(tmp_path, not_run):
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "run_timm_suite.py"), "--models", "rb_resnet18", "rb_plain18",
         "--junit", str(junit)],
        capture_output=True, text=True, timeout=900,
    )
    if proc.returncode == EXIT_NO_SDIST:
        lines = proc.stderr.strip().splitlines() or ["?"]
        not_run(f"timm's own suite needs the timm sdist from the package index (no network here?): "
                f"{lines[0]} ... {lines[-1]}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    for test in ("test_model_load_pretrained", "test_model_features_pretrained"):
        for tag in ("tv_in1k", "a1_in1k"):
            case = cases[f"{test}[1-rb_resnet18.{tag}]"]
            assert case.find("skipped") is None and case.find("failure") is None
    assert any("rb_plain18" in n for n in cases)
    # timm 1.0's feature API tests (selected by module 'resnet' or by name lists) run for ours too, and pass
    for test in JOINED_TESTS:
        for name in ("rb_resnet18", "rb_plain18"):
            (case,) = [c for n, c in cases.items() if n.startswith(f"{test}[") and name in n.split("[")[1]]
            assert case.find("skipped") is None and case.find("failure") is None, (test, name)
