"""tools/transfer_study.py end to end in --quick mode on stand-in Fashion-MNIST (CPU, well under a minute)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from res_backbone.data.fashion_mnist import write_fake_fashion_mnist
from studies.transfer_study import ARMS

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("tool_transfer_study", ROOT / "tools" / "transfer_study.py")
transfer_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(transfer_study)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    write_fake_fashion_mnist(base / "fmnist", n_train=64, n_test=40)
    n = torch.get_num_threads()
    try:
        rc = transfer_study.main(["--quick", "--fmnist-root", str(base / "fmnist"), "--output", str(base / "out"),
                                  "--work-dir", str(base / "work"), "--data-dir", str(base / "data")])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    return base / "out", json.loads((base / "out" / "transfer.json").read_text())


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_writes_json_png_and_markdown(study):
    out, result = study
    for name in ("transfer.json", "transfer.md", "transfer_det.png", "transfer_loc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "transfer_det.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["machine"]["cpu_count"] >= 1 and _finite(result["timings"]["total_s"])
    assert result["pretrain"]["arch"] == "resnet18" and Path(result["pretrain"]["checkpoint"]).is_file()
    assert result["pretrain"]["invert"] == 0.5  # polarity-blind step 1 by default (--pretrain-invert)
    assert "images inverted with probability 0.5" in (out / "transfer.md").read_text()
    md = (out / "transfer.md").read_text()
    for arm in ARMS:
        assert md.count(f"| {arm.label} |") == 2, arm.label  # one row in each task's table


@pytest.mark.parametrize("task,keys", [("detection", ("AP", "AP50")),
                                       ("localization", ("top1_loc_err", "top1_cls_err", "mean_iou"))])
def test_four_arms_with_finite_numbers(study, task, keys):
    _, result = study
    arms = result[task]["arms"]
    assert [a["name"] for a in arms] == [arm.name for arm in ARMS]
    budget = result[task]["budget_s"]
    for a in arms:
        assert a["iters"] > 0 and a["curve"] and a["curve"][-1]["iter"] == a["iters"]
        assert all(_finite(a["final"][k]) for k in keys), a["final"]
        assert all(_finite(p[k]) for p in a["curve"] for k in keys)
        assert a["train_time_s"] <= budget + 5.0  # equal budgets: no arm runs much past it
    by = {a["name"]: a for a in arms}
    assert by["scratch"]["transfer"]["weights"] is None and by["scratch"]["transfer"]["bn_policy"] == "trainable"
    assert by["pretrained_frozen_bn"]["transfer"]["bn_policy"] == "frozen"
    assert by["pretrained_finetune_all"]["transfer"]["channels"].startswith("1 -> 3")
    assert by["pretrained_freeze_25"]["freeze_iters"] >= 1 and by["scratch"]["freeze_iters"] == 0
