"""tools/degradation.py and tools/grad_flow.py end to end through main(argv) on a fake Fashion-MNIST."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from res_backbone.data.fashion_mnist import write_fake_fashion_mnist
from studies.analysis import degradation_summary

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_threads():
    """The runs below pass --threads 1 (tiny models gain nothing from more, and a shared machine loses);
    the setting is process-wide, so put it back for the tests that follow."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=48, n_test=24)


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_degradation_writes_png_and_json(data_dir, tmp_path, capsys):
    out = tmp_path / "deg"
    rc = _tool("degradation").main([
        "--depths", "20", "--iters", "3", "--batch-size", "8", "--eval-every", "2", "--log-every", "2",
        "--limit-test", "16", "--data-dir", str(data_dir), "--output", str(out), "--no-progress", "--threads", "1",
    ])
    assert rc == 0
    assert _png_size(out / "degradation.png")[0] >= 800
    report = json.loads((out / "degradation.json").read_text())
    assert set(report) == {"experiment", "config", "nets", "summary"}
    cfg = report["config"]
    assert (cfg["iters"], cfg["batch_size"], cfg["lr"], cfg["n_train"], cfg["n_test"]) == (3, 8, 0.1, 48, 16)
    assert cfg["milestones"] == [0.5, 0.75] and cfg["weight_decay"] == 1e-4 and cfg["momentum"] == 0.9
    nets = report["nets"]
    assert [(n["name"], n["depth"], n["residual"]) for n in nets] == [("plain20", 20, False), ("resnet20", 20, True)]
    for n in nets:
        assert set(n) == {"name", "depth", "residual", "params", "final_train_error", "final_test_error", "time_s",
                          "s_per_iter", "curves"}
        assert n["params"] == 269_434  # option-A shortcuts have no parameters: twins are equal in size
        assert n["curves"]["iters"] == [2, 3] and n["curves"]["test_iters"] == [2, 3]
        assert n["final_train_error"] == n["curves"]["train_error"][-1]
        assert n["final_test_error"] == n["curves"]["test_error"][-1]
        assert 0 <= n["final_test_error"] <= 100
    assert set(report["summary"]) == {"plain", "resnet"}
    assert report["summary"]["plain"]["final_train_error"] == {"20": nets[0]["final_train_error"]}
    assert "plain20" in capsys.readouterr().out


def test_degradation_summary_signs():
    summary = degradation_summary([
        {"depth": 20, "residual": False, "final_train_error": 10.0, "final_test_error": 12.0},
        {"depth": 56, "residual": False, "final_train_error": 14.0, "final_test_error": 15.0},
        {"depth": 20, "residual": True, "final_train_error": 9.0, "final_test_error": 11.0},
        {"depth": 56, "residual": True, "final_train_error": 7.5, "final_test_error": None},
    ])
    assert summary["plain"]["deeper_minus_shallower_train_error"] == pytest.approx(4.0)
    assert summary["plain"]["deeper_minus_shallower_test_error"] == pytest.approx(3.0)
    assert summary["resnet"]["deeper_minus_shallower_train_error"] == pytest.approx(-1.5)
    assert "deeper_minus_shallower_test_error" not in summary["resnet"]


def test_degradation_bad_inputs_exit_2(tmp_path, caplog):
    tool = _tool("degradation")
    assert tool.main(["--depths", "20", "--data-dir", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 2
    assert "dataset-fashion-mnist" in caplog.text
    assert tool.main(["--depths", "21", "--data-dir", str(tmp_path), "--output", str(tmp_path)]) == 2
    assert "plain21" in caplog.text
    with pytest.raises(SystemExit):
        tool.main(["--depths", "twenty"])


def test_grad_flow_writes_png_and_json(data_dir, tmp_path, capsys):
    png = tmp_path / "gf" / "grad_flow.png"
    rc = _tool("grad_flow").main([
        "--depth", "20", "--steps", "2", "--batch-size", "8", "--data-dir", str(data_dir), "--output", str(png),
        "--no-progress", "--threads", "1",
    ])
    assert rc == 0
    assert _png_size(png)[0] >= 800  # two panels
    report = json.loads(png.with_suffix(".json").read_text())
    assert set(report) == {"experiment", "config", "nets", "summary"}
    assert set(report["nets"]) == {"plain20", "resnet20"}
    for name, net in report["nets"].items():
        assert len(net["layers"]) == len(net["init"]) == len(net["after"]) == 19
        assert net["layers"][0] == "conv1"
        assert all(v > 0 for v in net["init"] + net["after"])
        assert net["first_last_ratio"]["init"] == pytest.approx(net["init"][0] / net["init"][-1])
        assert net["first_last_ratio"]["after"] == pytest.approx(net["after"][0] / net["after"][-1])
    ratio = report["summary"]["plain_over_residual"]["init"]
    nets = report["nets"]
    assert ratio == pytest.approx(nets["plain20"]["first_last_ratio"]["init"] / nets["resnet20"]["first_last_ratio"]["init"])
    assert "first/last" in capsys.readouterr().out


def test_grad_flow_init_only_and_missing_data(data_dir, tmp_path, caplog):
    tool = _tool("grad_flow")
    js = tmp_path / "numbers.json"
    assert tool.main(["--depth", "20", "--steps", "0", "--batch-size", "4", "--data-dir", str(data_dir),
                      "--output", str(tmp_path / "g.png"), "--json", str(js), "--threads", "1"]) == 0
    assert set(json.loads(js.read_text())["summary"]["plain_over_residual"]) == {"init"}
    assert tool.main(["--data-dir", str(tmp_path / "missing"), "--output", str(tmp_path / "x.png")]) == 2
    assert "dataset-fashion-mnist" in caplog.text
