"""tools/train_cls.py end to end on a tiny fake Fashion-MNIST (CPU, seconds): outputs, checkpoint
contract (create_model/create_backbone load it), SIGTERM + resume, and the error paths."""
import contextlib
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from res_backbone import create_backbone, create_model
from res_backbone.data.fashion_mnist import write_fake_fashion_mnist
from res_backbone.engine.logger import RunLogger

ROOT = Path(__file__).resolve().parents[2]
NET = "resnet20"


def _load_tool():
    spec = importlib.util.spec_from_file_location("train_cls_tool", ROOT / "tools" / "train_cls.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train_cls = _load_tool()


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """--threads 1 (fast on a busy 2-core machine) sets a process-wide value: give it back afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _args(data, out, *extra):
    return ["--backbone", NET, "--threads", "1", "--data-dir", str(data), "--epochs", "2", "--batch-size", "16",
            "--warmup-iters", "2", "--lr", "0.05", "--log-every", "1", "--no-progress", "--output", str(out), *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cls")
    data = write_fake_fashion_mnist(base / "fmnist", n_train=64, n_test=32)
    out = base / "run"
    assert train_cls.main(_args(data, out)) == 0
    return data, out


def test_run_writes_every_output(run):
    _, out = run
    for name in ("config.yaml", "checkpoint_last.pt", "checkpoint_best.pt", "log.jsonl", "metrics.json"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("top1_err", "top5_err", "loss", "best_top1_err", "train_time_s", "img_per_s", "train_top1_err"):
        assert isinstance(metrics[key], float), key
    assert metrics["iter"] == 8 and metrics["n"] == 32 and len(metrics["per_class_acc"]) == 10
    assert metrics["per_class_acc"]["Trouser"] is not None
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in logs if "lr" in r]
    assert [r["iteration"] for r in train] == list(range(1, 9))
    assert sum("top5_err" in r and "epoch" in r for r in logs) == 2  # one evaluation per epoch
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["backbone"] == NET and cfg["num_classes"] == 10 and cfg["in_chans"] == 1 and cfg["lr"] == 0.05
    assert cfg["workers"] == 0 and cfg["device"] in ("cpu", "cuda")


def test_checkpoint_contract_and_loading(run):
    data, out = run
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ckpt["task"] == "classification" and ckpt["model_name"] == NET and ckpt["iter"] == 8
    assert ckpt["epoch"] == 2 and len(ckpt["classes"]) == 10 and ckpt["library_version"]
    assert ckpt["model_kwargs"] == {"num_classes": 10, "in_chans": 1, "drop_rate": 0.0}
    pcfg = ckpt["pretrained_cfg"]
    assert pcfg["input_size"] == [1, 28, 28] and pcfg["mean"] == [0.286] and pcfg["num_classes"] == 10

    loaded = create_model(NET, **ckpt["model_kwargs"], pretrained=str(out / "checkpoint_last.pt")).eval()
    direct = create_model(NET, **ckpt["model_kwargs"]).eval()
    direct.load_state_dict(ckpt["model"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), direct(x))
    assert loaded.pretrained_cfg["mean"] == [0.286]

    # The loaded model reproduces the run's final evaluation.
    from res_backbone.data.classification import build_cls_datasets
    from heads.classification.loop import evaluate

    val = build_cls_datasets(data_dir=data, train=False).val
    m = evaluate(loaded, torch.utils.data.DataLoader(val, batch_size=16), torch.device("cpu"))
    assert m["top1_err"] == pytest.approx(json.loads((out / "metrics.json").read_text())["top1_err"])

    # A backbone (RGB by default: conv1 adapted 1 -> 3) gives the classifier's features on grey x 3.
    backbone = create_backbone(NET, pretrained=str(out / "checkpoint_best.pt")).eval()
    best = create_model(NET, num_classes=10, in_chans=1, pretrained=str(out / "checkpoint_best.pt")).eval()
    with torch.no_grad():
        feats = backbone(x.repeat(1, 3, 1, 1))
        last = backbone.feature_info[-1]["name"]
        assert torch.allclose(feats[last], best.forward_features(x), atol=1e-5)


@contextlib.contextmanager
def _sigterm_at(iteration, monkeypatch):
    """SIGTERM to this process right after the training log record of ``iteration``."""
    original = RunLogger.log

    def log_and_stop(self, record, step=None, prefix=""):
        original(self, record, step, prefix)
        if prefix == "train/" and step == iteration and "lr" in record:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "log", log_and_stop)
    try:
        yield
    finally:
        monkeypatch.setattr(RunLogger, "log", original)


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(run, tmp_path, monkeypatch):
    data, ref = run
    out = tmp_path / "stopped"
    with _sigterm_at(3, monkeypatch):
        assert train_cls.main(_args(data, out)) == 143
    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["iter"] == 3
    assert train_cls.main(_args(data, out, "--resume", "auto")) == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logs if "lr" in r] == list(range(1, 9))
    assert any(r.get("event") == "preempted" for r in logs)
    resumed = torch.load(out / "checkpoint_last.pt", weights_only=True)["model"]
    uninterrupted = torch.load(ref / "checkpoint_last.pt", weights_only=True)["model"]
    for k, v in uninterrupted.items():
        assert torch.allclose(resumed[k].float(), v.float(), atol=1e-5), k


def test_time_budget_sizes_the_run_and_resume_keeps_the_plan(run, tmp_path, monkeypatch):
    data, _ = run
    out = tmp_path / "budget"
    args = _args(data, out, "--epochs", "1000", "--time-budget", "0.1", "--eval-every", "1000", "--log-every", "10")
    with _sigterm_at(40, monkeypatch):
        assert train_cls.main(args) == 143
    stopped = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert stopped["iter"] == 40 and stopped["plan_max_iters"] > 40  # sized at 30, before the stop
    assert train_cls.main(args + ["--resume", "auto"]) == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    sized = [r for r in logs if r.get("event") == "time_budget"]
    # sized after 30 iterations, re-sized every 100; the resumed session keeps the plan (no new calibration)
    assert sized[0]["iteration"] == 30 and all(r["iteration"] % 100 == 0 for r in sized[1:])
    m = json.loads((out / "metrics.json").read_text())
    assert m["iter"] == m["max_iters"] == (sized[-1]["max_iters"] if len(sized) > 1 else stopped["plan_max_iters"])
    assert 40 < m["iter"] < 4000  # sized, not the cap of 1000 epochs
    assert m["train_time_s"] == pytest.approx(6.0, abs=30 * sized[0]["s_per_iter"] + 0.6)  # the budget, kept


def test_optimizer_adamw_flag(run, tmp_path):
    data, _ = run
    out = tmp_path / "adamw"
    args = _args(data, out, "--optimizer", "adamw", "--weight-decay", "0.05", "--epochs", "1")
    args[args.index("--lr") + 1] = "none"  # the optimiser's default rate
    assert train_cls.main(args) == 0
    ck = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ck["config"]["optimizer"] == "adamw" and ck["config"]["lr"] == 1e-3
    state = next(iter(ck["optimizer"]["state"].values()))
    assert "exp_avg_sq" in state  # an AdamW state, not SGD's momentum buffer
    assert all(g["fused"] for g in ck["optimizer"]["param_groups"])


def _tree(root, classes, n=3, size=(28, 28)):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("L", size, 40 * i + 10).save(root / c / f"{i}.png")
    return root


def test_wrong_num_classes_and_new_dataset_resume_fail_clearly(run, tmp_path, caplog):
    data, out = run
    assert train_cls.main(_args(data, tmp_path / "a", "--num-classes", "5")) == 2
    assert "--num-classes 5 does not match the data, which has 10 classes" in caplog.text
    caplog.clear()
    tree = _tree(tmp_path / "two", ["left", "right"])
    folder_args = ["--backbone", NET, "--threads", "1", "--train-dir", str(tree), "--val-dir", str(tree),
                   "--in-chans", "1", "--input-size", "28", "--batch-size", "4", "--max-iters", "2", "--no-progress",
                   "--workers", "0"]
    rc = train_cls.main(folder_args + ["--output", str(tmp_path / "b"), "--resume", str(out / "checkpoint_last.pt")])
    assert rc == 2
    assert "trained with num_classes=10" in caplog.text and "num_classes=2" in caplog.text
    caplog.clear()
    # --pretrained with a classifier of another size: fc dropped and re-initialised, and the log says so.
    best = str(out / "checkpoint_best.pt")
    rc = train_cls.main(folder_args + ["--output", str(tmp_path / "c"), "--pretrained", best])
    assert rc == 0
    assert "10-class classifier but this run has num_classes=2: fc dropped and re-initialised" in caplog.text
    ck = torch.load(tmp_path / "c" / "checkpoint_last.pt", weights_only=True)
    assert ck["classes"] == ["left", "right"] and ck["model"]["fc.weight"].shape == (2, 64)


def test_bad_inputs_exit_2_with_a_message(tmp_path, caplog):
    assert train_cls.main(["--data-dir", str(tmp_path / "none"), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "apt-get" in caplog.text
    caplog.clear()
    tree = _tree(tmp_path / "t", ["a", "b"])
    (tree / "b" / "1.png").write_bytes(b"garbage")
    rc = train_cls.main(["--backbone", NET, "--threads", "1", "--train-dir", str(tree), "--val-dir", str(tree),
                         "--input-size", "28", "--batch-size", "2", "--max-iters", "3", "--no-progress",
                         "--workers", "0", "--output", str(tmp_path / "o2")])
    assert rc == 2 and "1.png" in caplog.text and "cannot decode" in caplog.text
    caplog.clear()
    (tree / "c").mkdir()
    rc = train_cls.main(["--train-dir", str(tree), "--output", str(tmp_path / "o3"), "--no-progress"])
    assert rc == 2 and "holds no images" in caplog.text


def test_help_and_config_files(run, capsys):
    parser = train_cls.build_parser()
    undocumented = [a.dest for a in parser._actions if not a.help]
    assert undocumented == []
    with pytest.raises(SystemExit):
        train_cls.main(["--help"])
    assert "--label-smoothing" in capsys.readouterr().out
    cfg = ROOT / "configs" / "cls" / "fmnist_resnet20.yaml"
    from res_backbone.engine.config import parse_with_config

    args = parse_with_config(parser, ["--config", str(cfg), "--epochs", "1"])
    assert args.backbone == "resnet20" and args.epochs == 1 and args.batch_size == 64 and args.amp == "bf16"
    _, out = run  # a run's config.yaml holds only valid options: it reruns the same run
    again = parse_with_config(train_cls.build_parser(), ["--config", str(out / "config.yaml")])
    assert again.num_classes == 10 and again.lr == 0.05 and again.output == str(out)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
