"""Numerical faults (non-finite losses and gradients, with and without fp16 AMP), checkpoint integrity
(checksums, a model with NaN never written over a good checkpoint, resume fallbacks) and the
fault-injection hook."""
import json
import logging
import os

import pytest
import torch
from torch import nn

from res_backbone.engine import checkpoint as ck
from res_backbone.engine import faults
from res_backbone.engine.logger import RunLogger
from res_backbone.engine.runner import save_run_checkpoint
from res_backbone.engine.optim_step import NonFiniteLossError, OptimizerStep, autocast

NAN = float("nan")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x))


def _loss(model, x, factor=1.0):
    out = model(x)
    return {"loss_a": out.float().pow(2).mean() * factor, "loss_b": out.float().abs().mean()}


def _weights(model):
    """The parameters (BatchNorm statistics change in every training forward pass, whatever the step does)."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _events(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def test_consecutive_non_finite_losses_stop_naming_iteration_and_terms(tmp_path):
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logger = RunLogger(tmp_path, tensorboard=False)
    step = OptimizerStep(opt, model.parameters(), max_bad_steps=3, logger=logger)
    terms = _loss(model, x)
    assert step(sum(terms.values()), 0, lambda: {k: float(v.detach()) for k, v in terms.items()})
    good = _weights(model)
    with pytest.raises(NonFiniteLossError) as err:
        for it in (1, 2, 3):
            terms = _loss(model, x, factor=NAN)
            assert not step(sum(terms.values()), it, lambda: {k: float(v.detach()) for k, v in terms.items()})
    msg = str(err.value)
    assert "iteration 3" in msg and "3 consecutive" in msg and "loss_a" in msg and "loss_b" in msg
    assert _same(_weights(model), good)  # no update from any bad step
    logger.close()
    skipped = [r for r in _events(tmp_path) if r.get("event") == "non_finite_step_skipped"]
    assert [r["iteration"] for r in skipped] == [1, 2, 3] and skipped[0]["loss_a"] == "nan"


def test_fewer_than_max_bad_steps_are_skipped_logged_and_training_goes_on(tmp_path):
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = RunLogger(tmp_path, tensorboard=False)
    step = OptimizerStep(opt, model.parameters(), max_bad_steps=3, logger=logger)
    pattern = [1.0, NAN, NAN, 1.0, float("inf"), NAN, 1.0]  # never 3 in a row
    updated = []
    for it, factor in enumerate(pattern):
        before = _weights(model)
        terms = _loss(model, x, factor)
        updated.append(step(sum(terms.values()), it, lambda: {k: float(v.detach()) for k, v in terms.items()}))
        assert _same(_weights(model), before) != updated[-1] or not updated[-1]
    assert updated == [f == 1.0 for f in pattern]
    logger.close()
    assert [r["iteration"] for r in _events(tmp_path) if r.get("event") == "non_finite_step_skipped"] == [1, 2, 4, 5]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_fp16_amp_skips_an_overflowing_step_like_the_scaler_and_continues(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Linear(4, 2), torch.randn(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, growth_interval=1000)  # fp16 grads overflow
    logger = RunLogger(tmp_path, tensorboard=False)
    step = OptimizerStep(opt, model.parameters(), scaler=scaler, max_bad_steps=2, logger=logger)
    device = torch.device("cpu")
    results, scales = [], []
    for it in range(60):
        before = _weights(model)
        with autocast(device, "fp16"):
            out = model(x)
        loss = out.float().pow(2).mean() * 1e4
        results.append(step(loss, it, lambda: {"loss": float(loss.detach())}))
        scales.append(scaler.get_scale())
        assert _same(_weights(model), before) == (not results[-1])  # skipped <=> weights unchanged
        if results[-1]:
            break
    assert results[0] is False and results[-1] is True  # overflows skipped (more than max_bad_steps of them)...
    assert len(results) > 2 and scales == sorted(scales, reverse=True)  # ...with the scale lowered each time
    logger.close()
    assert sum(r.get("event") == "amp_step_skipped" for r in _events(tmp_path)) == len(results) - 1


def test_fp16_amp_still_stops_on_consecutive_non_finite_losses():
    model, x = nn.Linear(4, 2), torch.randn(8, 4)
    w0 = _weights(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = OptimizerStep(opt, model.parameters(), scaler=torch.amp.GradScaler("cpu"), max_bad_steps=3)
    with pytest.raises(NonFiniteLossError, match="iteration 12: 3 consecutive"):
        for it in range(10, 20):
            with autocast(torch.device("cpu"), "fp16"):
                loss = model(x).float().mean() * NAN
            step(loss, it, lambda: {"loss": NAN})
    assert _same(_weights(model), w0)


def _payload(model, it):
    return {"model": model.state_dict(), "iteration": it, "optimizer": {}}


def test_a_model_with_nan_is_never_written_over_the_last_good_checkpoint(tmp_path, caplog):
    model = _Net()
    save_run_checkpoint(_payload(model, 10), tmp_path)
    save_run_checkpoint(_payload(model, 20), tmp_path)
    model.bn.running_mean[0] = NAN  # what a non-finite forward pass leaves in BatchNorm statistics
    with caplog.at_level(logging.WARNING):
        assert save_run_checkpoint(_payload(model, 30), tmp_path) is None
    assert "bn.running_mean" in caplog.text and "last good checkpoint is kept" in caplog.text
    assert ck.load_checkpoint(tmp_path / "checkpoint_last.pt")["iteration"] == 20
    assert ck.load_checkpoint(tmp_path / "checkpoint_prev.pt")["iteration"] == 10


@pytest.mark.parametrize("damage", ["truncate", "random", "flip"])
def test_damaged_files_are_refused_whole_and_resume_falls_back(tmp_path, damage, caplog):
    model = _Net()
    save_run_checkpoint(_payload(model, 1), tmp_path)
    save_run_checkpoint(dict(_payload(model, 5), metrics={"AP": 0.5}), tmp_path, "checkpoint_best.pt")
    save_run_checkpoint(_payload(model, 2), tmp_path)
    save_run_checkpoint(_payload(model, 7), tmp_path)  # last 7, prev 2, best 5
    last = tmp_path / "checkpoint_last.pt"
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "random":
        data = bytearray(os.urandom(len(data)))
    else:  # one bit inside fc.weight's bytes: torch.load alone would return the altered weight
        pos = data.find(model.fc.weight.detach().numpy().tobytes())
        assert pos > 0
        data[pos + 5] ^= 0x01
    last.write_bytes(bytes(data))
    with pytest.raises(ck.CorruptCheckpointError, match="checkpoint_last.pt"):
        ck.load_checkpoint(last)
    with caplog.at_level(logging.WARNING):
        found = ck.find_resume_checkpoint(tmp_path)
    assert "checkpoint_last.pt" in caplog.text
    assert found.name == "checkpoint_best.pt"  # iteration 5: the newest valid one, newer than prev (2)
    (tmp_path / "checkpoint_best.pt").write_bytes(b"")
    assert ck.find_resume_checkpoint(tmp_path).name == "checkpoint_prev.pt"


def test_checksum_covers_every_entry():
    model = _Net()
    a = ck.with_checksum(_payload(model, 3))
    assert ck.payload_digest(a) == a["checksum"]["sha256"]
    b = dict(a, iteration=4)
    assert ck.payload_digest(b) != a["checksum"]["sha256"]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["fc.bias"][0] += 1e-6
    assert ck.payload_digest(dict(a, model=sd)) != a["checksum"]["sha256"]


def test_fault_hook_is_inert_unless_set_and_validates_its_value(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.fault_point("step", 3)  # nothing happens
    assert faults.parse("eval:4") == ("eval", 4, 4, "TERM")
    assert faults.parse("batch:2-5:int") == ("batch", 2, 5, "INT")
    for bad in ("nowhere:3", "step", "step:x", "step:5-2", "step:1:HUP", "step:1:TERM:x"):
        with pytest.raises(ValueError, match=faults.ENV):
            faults.parse(bad)
    got = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: got.append((pid, sig)))
    monkeypatch.setenv(faults.ENV, "save:2-3:KILL")
    for it in range(5):
        faults.fault_point("save", it)
        faults.fault_point("step", it)
    assert got == [(os.getpid(), faults.ACTIONS["KILL"])] * 2
