"""Faults injected into the training tools, end to end (CPU, tiny runs in-process): signals at four points
of the loop, a crash during a checkpoint write, damaged checkpoints, non-finite losses.

A signal is injected at a named point of the loop with ``RB_FAULT_INJECT`` (res_backbone/engine/faults.py):

* ``batch`` - a batch was loaded, before its forward pass (between iterations / data loading);
* ``step``  - between backward() and the optimiser update (the middle of a step);
* ``eval``  - during an evaluation in the middle of the run;
* ``save``  - during a checkpoint write (bytes written, not yet renamed).

Each run must exit 143 with a loadable ``checkpoint_last.pt`` at the right iteration and a ``log.jsonl``
of complete lines; ``--resume auto`` must then finish the run with the same iterations, evaluations
and (detection, deterministic) the same final weights as an uninterrupted run.
"""
import contextlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from res_backbone.data.fashion_mnist import write_fake_fashion_mnist
from res_backbone.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from test_train_det import TINY  # noqa: E402


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"preempt_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_det, train_cls, train_loc = _tool("train_det"), _tool("train_cls"), _tool("train_loc")


@contextlib.contextmanager
def _threads(k: int):
    n = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _one_thread():
    # module-scoped fixtures (the uninterrupted reference runs) are set up before this one: they take
    # one thread themselves, since float results may depend on the thread count (matmul blocking)
    with _threads(1):
        yield


def _logs(out: Path):
    """Every line of log.jsonl parsed (a torn last line would raise here)."""
    text = (out / "log.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _train_iters(logs):
    return [r["iteration"] for r in logs if "loss" in r and "lr" in r]


# ---------------------------------------------------------------- detection: every point, both signals

DET_ITERS = 6  # 8 training images, batch 2: an epoch is 4 iterations, evaluations at 4 and 6


@pytest.fixture(scope="module")
def det_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("preempt_det")
    ref = base / "ref"
    with _threads(1):
        assert train_det.main(_det_args(base, ref)) == 0
    return base


def _det_args(base: Path, out: Path, *extra: str):
    return [*TINY, "--synthetic-train", "8", "--max-iters", str(DET_ITERS), "--checkpoint-every", "2",
            "--deterministic", "--data-dir", str(base / "data"), "--output", str(out), *extra]


# point -> (injected at, checkpoint iteration after the stop, evaluation left pending)
DET_POINTS = {"batch": (2, 3, False), "step": (2, 3, False), "eval": (4, 4, True), "save": (2, 2, False)}


@pytest.mark.parametrize("sig", ["TERM", "INT"])
@pytest.mark.parametrize("point", list(DET_POINTS))
def test_det_signal_at_each_point_then_resume_matches_uninterrupted(det_base, tmp_path, monkeypatch, point, sig):
    at, expect_iter, pending = DET_POINTS[point]
    out = tmp_path / "run"
    monkeypatch.setenv("RB_FAULT_INJECT", f"{point}:{at}:{sig}")
    assert train_det.main(_det_args(det_base, out)) == 143
    monkeypatch.delenv("RB_FAULT_INJECT")

    ckpt = load_checkpoint(out / "checkpoint_last.pt")  # complete, checksum verified
    assert ckpt["iteration"] == expect_iter and bool(ckpt.get("pending_eval")) == pending
    logs = _logs(out)
    stop = [r for r in logs if r.get("event") == "preempted"]
    assert len(stop) == 1 and stop[0]["signal"] == getattr(signal, f"SIG{sig}")
    assert stop[0]["during"] == ("evaluation" if point == "eval" else "training")
    assert _train_iters(logs) == list(range(1, expect_iter + 1))
    assert not list(out.glob(".*.tmp"))

    assert train_det.main(_det_args(det_base, out, "--resume", "auto")) == 0
    logs = _logs(out)
    assert _train_iters(logs) == list(range(1, DET_ITERS + 1))  # every iteration once, none lost
    assert [r["iteration"] for r in logs if "AP" in r] == [4, 6]  # every evaluation once
    final = load_checkpoint(out / "checkpoint_last.pt")
    assert final["iteration"] == DET_ITERS and not final["pending_eval"]
    assert json.loads((out / "metrics.json").read_text())["peak_rss_mib"] > 0
    ref = load_checkpoint(det_base / "ref" / "checkpoint_last.pt")["model"]
    for k, v in ref.items():
        torch.testing.assert_close(final["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def _killed_child(argv, fault):
    os.environ["RB_FAULT_INJECT"] = fault
    sys.exit(train_det.main(argv))


def test_det_crash_during_checkpoint_write_keeps_previous(det_base, tmp_path):
    """SIGKILL between writing a checkpoint's bytes and renaming them: the file under the final name is
    still the previous, complete checkpoint; the resumed run removes the orphaned temporary file."""
    out = tmp_path / "run"
    # A forked child: a killed process like a subprocess, without a second interpreter start-up.
    child = multiprocessing.get_context("fork").Process(target=_killed_child,
                                                        args=(_det_args(det_base, out), "save:4:KILL"))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL
    assert len(list(out.glob(".checkpoint_last.pt.*.tmp"))) == 1
    assert load_checkpoint(out / "checkpoint_last.pt")["iteration"] == 2
    assert train_det.main(_det_args(det_base, out, "--resume", "auto")) == 0
    assert load_checkpoint(out / "checkpoint_last.pt")["iteration"] == DET_ITERS
    assert not list(out.glob(".*.tmp"))
    assert _train_iters(_logs(out))[-2:] == [5, 6]


# ---------------------------------------------------------------- damaged newest checkpoint

def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _random_bytes(p: Path):
    p.write_bytes(os.urandom(p.stat().st_size))


def _flip_byte_in_tensor_data(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # torch.load reads this without complaint; only the checksum sees it
    p.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def det_preempted(det_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("preempted") / "run"
    os.environ["RB_FAULT_INJECT"] = "step:2:TERM"
    try:
        with _threads(1):
            assert train_det.main(_det_args(det_base, out)) == 143
    finally:
        del os.environ["RB_FAULT_INJECT"]
    return out


@pytest.mark.parametrize("damage", [_truncate, _random_bytes, _flip_byte_in_tensor_data])
def test_resume_auto_skips_a_damaged_newest_checkpoint(det_base, det_preempted, tmp_path, caplog, damage):
    out = tmp_path / "run"
    shutil.copytree(det_preempted, out)
    assert load_checkpoint(out / "checkpoint_prev.pt")["iteration"] == 2
    damage(out / "checkpoint_last.pt")
    assert train_det.main(_det_args(det_base, out, "--resume", "auto")) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("checkpoint_last.pt" in w and "skipping" in w for w in warnings), warnings
    starts = [r for r in _logs(out) if r.get("event") == "start"]
    assert starts[-1]["resumed_from"].endswith("checkpoint_prev.pt") and starts[-1]["iteration"] == 2
    assert _train_iters(_logs(out))[-4:] == [3, 4, 5, 6]  # iteration 3 redone from the previous checkpoint
    final = load_checkpoint(out / "checkpoint_last.pt")
    ref = load_checkpoint(det_base / "ref" / "checkpoint_last.pt")["model"]
    for k, v in ref.items():
        torch.testing.assert_close(final["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_explicit_resume_of_a_damaged_checkpoint_is_a_clear_error(det_base, det_preempted, tmp_path, caplog):
    bad = tmp_path / "bad.pt"
    shutil.copy(det_preempted / "checkpoint_last.pt", bad)
    _flip_byte_in_tensor_data(bad)
    assert train_det.main(_det_args(det_base, tmp_path / "o", "--resume", str(bad))) == 2
    assert "bad.pt" in caplog.text and "damaged checkpoint" in caplog.text


# ---------------------------------------------------------------- classification and localization: one point each

def test_cls_sigint_during_evaluation_then_resume(tmp_path, monkeypatch):
    data = write_fake_fashion_mnist(tmp_path / "fmnist", n_train=32, n_test=16)
    args = ["--backbone", "resnet20", "--threads", "1", "--data-dir", str(data), "--epochs", "2", "--batch-size",
            "16", "--warmup-iters", "0", "--lr", "0.05", "--log-every", "1", "--no-progress"]
    out = tmp_path / "run"
    monkeypatch.setenv("RB_FAULT_INJECT", "eval:2:INT")  # the end-of-epoch-1 evaluation
    assert train_cls.main([*args, "--output", str(out)]) == 143
    monkeypatch.delenv("RB_FAULT_INJECT")
    ckpt = load_checkpoint(out / "checkpoint_last.pt")
    assert ckpt["iter"] == 2 and ckpt["pending_eval"]
    assert not (out / "metrics.json").exists()  # the abandoned evaluation wrote nothing
    assert train_cls.main([*args, "--output", str(out), "--resume", "auto"]) == 0
    logs = _logs(out)
    assert [r["iteration"] for r in logs if "top1_err" in r and "epoch" in r] == [2, 4]  # both evaluations
    assert _train_iters(logs) == [1, 2, 3, 4]
    assert json.loads((out / "metrics.json").read_text())["iter"] == 4


def test_loc_sigterm_during_checkpoint_write_then_resume(tmp_path, monkeypatch):
    write_fake_fashion_mnist(tmp_path / "fmnist", n_train=24, n_test=8)
    args = ["--backbone", "resnet20", "--fmnist-root", str(tmp_path / "fmnist"), "--data-dir", str(tmp_path / "data"),
            "--fmnist-train", "16", "--fmnist-val", "8", "--canvas", "32", "--item-scale", "16", "28",
            "--batch-size", "8", "--warmup-iters", "0", "--log-every", "1", "--num-pictures", "1", "--grid", "2",
            "--box-channels", "16", "--hidden", "32", "--no-progress", "--max-iters", "4", "--checkpoint-every", "1",
            "--eval-every", "10", "--output", str(tmp_path / "run")]
    monkeypatch.setenv("RB_FAULT_INJECT", "save:1:TERM")
    assert train_loc.main(args) == 143
    monkeypatch.delenv("RB_FAULT_INJECT")
    assert load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["iter"] == 1
    assert train_loc.main([*args, "--resume", "auto"]) == 0
    logs = _logs(tmp_path / "run")
    assert _train_iters(logs) == [1, 2, 3, 4]
    assert [r["event"] for r in logs if "event" in r] == ["start", "preempted", "start"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["iter"] == 4


# ---------------------------------------------------------------- non-finite losses

def _nan_losses_on_calls(monkeypatch, bad_calls):
    """Make the detector's training forward return NaN losses on the given (1-based) calls."""
    from heads.detection.faster_rcnn import FasterRCNN

    forward, calls = FasterRCNN.forward, []

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) in bad_calls:
                out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(FasterRCNN, "forward", patched)


def test_det_non_finite_losses_skip_then_stop_keeping_the_last_good_checkpoint(det_base, tmp_path, monkeypatch,
                                                                               caplog):
    # Two bad iterations (3 and 4) are skipped and logged; the run finishes.
    out = tmp_path / "few"
    _nan_losses_on_calls(monkeypatch, {3, 4})
    assert train_det.main(_det_args(det_base, out)) == 0
    skipped = [r for r in _logs(out) if r.get("event") == "non_finite_step_skipped"]
    assert [r["iteration"] for r in skipped] == [2, 3] and skipped[0]["loss_cls"] == "nan"
    assert load_checkpoint(out / "checkpoint_last.pt")["iteration"] == DET_ITERS
    monkeypatch.undo()

    # Five in a row (the default limit) stop the run with exit code 3, naming the iteration and the terms.
    out = tmp_path / "many"
    _nan_losses_on_calls(monkeypatch, set(range(2, 8)))
    assert train_det.main(_det_args(det_base, out)) == 3
    assert "iteration 5: 5 consecutive non-finite" in caplog.text and "loss_objectness" in caplog.text
    logs = _logs(out)
    assert [r["iteration"] for r in logs if r.get("event") == "non_finite_step_skipped"] == [1, 2, 3, 4, 5]
    assert logs[-1]["event"] == "stopped_non_finite"
    last, prev = load_checkpoint(out / "checkpoint_last.pt"), load_checkpoint(out / "checkpoint_prev.pt")
    assert (prev["iteration"], last["iteration"]) == (2, 4)
    for k, v in last["model"].items():  # finite, and no update since the first bad step
        assert torch.isfinite(v.float()).all(), k
        if k.endswith(("weight", "bias")) and "bn" not in k:
            assert torch.equal(v, prev["model"][k]), k
