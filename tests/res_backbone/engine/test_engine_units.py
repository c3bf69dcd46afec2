"""Engine pieces: atomic checkpoints, resume lookup, RNG round trip, config files, LR schedule."""
import argparse
import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

from res_backbone.engine import checkpoint as ck
from res_backbone.engine.config import ConfigError, dump_yaml, parse_with_config, resolved_config
from res_backbone.engine.logger import RunLogger
from res_backbone.engine.optim import build_optimizer, can_fuse, lr_factor, param_groups, set_lr


def test_atomic_save_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "c.pt"
    ck.atomic_save({"model": {"w": torch.ones(2)}}, path)
    ck.atomic_save({"model": {"w": torch.zeros(2)}}, path)
    assert torch.equal(ck.load_checkpoint(path)["model"]["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_atomic_save_failure_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ck.atomic_save({"model": {"w": torch.ones(2)}}, path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ck.atomic_save({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(ck.load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_truncated_checkpoint_is_detected_and_previous_used(tmp_path):
    ck.rotate_and_save({"model": {"w": torch.ones(3)}, "iteration": 1}, tmp_path)
    ck.rotate_and_save({"model": {"w": torch.ones(3) * 2}, "iteration": 2}, tmp_path)
    last = tmp_path / "checkpoint_last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CorruptCheckpointError, match="checkpoint_last.pt"):
        ck.load_checkpoint(last)
    found = ck.find_resume_checkpoint(tmp_path)
    assert found.name == "checkpoint_prev.pt"
    assert ck.load_checkpoint(found)["iteration"] == 1


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        ck.load_checkpoint(tmp_path / "nothing.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "f.pt")
    with pytest.raises(ck.CorruptCheckpointError, match="no 'model' entry"):
        ck.load_checkpoint(tmp_path / "f.pt")
    assert ck.find_resume_checkpoint(tmp_path / "empty") is None


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = ck.rng_state()
    ck.atomic_save({"model": {}, "rng": state}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--milestones", type=float, nargs="+", default=[0.5])
    p.add_argument("--channels-last", action="store_true")
    return p


def test_config_file_sets_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 16\namp: bf16\nmilestones: [0.6, 0.9]\nchannels_last: true\n")
    args = parse_with_config(_parser(), ["--config", str(cfg), "--batch-size", "2"])
    assert (args.batch_size, args.amp, args.milestones, args.channels_last) == (2, "bf16", [0.6, 0.9], True)
    assert args.config_sources["amp"] == str(cfg)


def test_a_runs_config_yaml_is_a_valid_config(tmp_path):
    """config.yaml written by a run (resolved_config) goes back in as --config and gives the same options."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 16\n")
    first = parse_with_config(_parser(), ["--config", str(cfg), "--amp", "bf16"])
    dump_yaml(resolved_config(first), tmp_path / "config.yaml")
    again = parse_with_config(_parser(), ["--config", str(tmp_path / "config.yaml")])
    assert resolved_config(again) == resolved_config(first) and "config" not in resolved_config(first)


@pytest.mark.parametrize("text,match", [
    ("batch_sise: 3\n", r"unknown key\(s\) \['batch_sise'\]"),
    ("amp: fp8\n", "amp='fp8'; choose one of"),
    ("batch_size: many\n", "batch_size='many' is not valid"),
    ("channels_last: 3\n", "channels_last must be true or false"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_config_errors_name_file_and_key(tmp_path, text, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        parse_with_config(_parser(), ["--config", str(cfg)])
    assert "bad.yaml" in str(err.value)


def test_lr_schedules():
    assert lr_factor(0, max_iters=100, warmup_iters=10, warmup_factor=0.1) == pytest.approx(0.1)
    assert lr_factor(5, max_iters=100, warmup_iters=10, warmup_factor=0.1) == pytest.approx(0.55)
    assert lr_factor(50, max_iters=100, milestones=(0.5, 0.8)) == pytest.approx(0.1)
    assert lr_factor(85, max_iters=100, milestones=(0.5, 0.8)) == pytest.approx(0.01)
    assert lr_factor(30, max_iters=100, milestones=(30, 60)) == pytest.approx(0.1)  # absolute iterations
    assert lr_factor(50, max_iters=100, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(100, max_iters=100, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="schedule 'poly'"):
        lr_factor(1, max_iters=10, schedule="poly")


class _Det(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)


def test_param_groups_decay_and_backbone_multiplier():
    m = _Det()
    opt = build_optimizer(m, lr=0.1, weight_decay=1e-4, backbone_lr_mult=0.1)
    by = {(g["weight_decay"], g["lr_mult"]): sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert by[(1e-4, 0.1)] == 4 * 3 * 3 * 3          # backbone conv weight
    assert by[(0.0, 0.1)] == 4 + 4 + 4                # conv bias + BN weight/bias
    assert by[(1e-4, 1.0)] == 8 and by[(0.0, 1.0)] == 2
    set_lr(opt, 0.1, 0.5)
    assert {round(g["lr"], 6) for g in opt.param_groups} == {0.05, 0.005}


def test_frozen_params_join_the_optimizer_for_later_unfreezing():
    m = _Det()
    m.backbone.requires_grad_(False)
    opt = build_optimizer(m, lr=0.1)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in m.parameters())
    assert len(param_groups(m, weight_decay=1e-4)) == 2


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_by_default_on_cpu_and_same_steps_as_foreach(name):
    torch.manual_seed(0)
    m1 = _Det()
    m1.backbone[0].bias = None  # a bias before BN gets a zero gradient up to rounding, which Adam would amplify
    m1.backbone.requires_grad_(False)  # frozen parameters (no grad) are skipped by the fused kernel too
    m2, start = copy.deepcopy(m1), copy.deepcopy(m1)
    o1 = build_optimizer(m1, name=name, lr=0.05, weight_decay=1e-2)
    o2 = build_optimizer(m2, name=name, lr=0.05, weight_decay=1e-2, fused=False)
    assert all(g["fused"] for g in o1.param_groups) and not any(g["fused"] for g in o2.param_groups)
    x = torch.randn(3, 3, 6, 6)
    for step in range(4):
        if step == 2:
            m1.backbone.requires_grad_(True)
            m2.backbone.requires_grad_(True)
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m.head(m.backbone(x).mean((2, 3))).square().sum().backward()
            o.step()
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), n
    for a, b in zip(m1.parameters(), start.parameters()):
        assert not torch.equal(a, b)  # every parameter moved, the frozen-then-unfrozen ones included


def test_can_fuse_needs_one_cpu_or_cuda_device_and_floats():
    assert can_fuse([torch.zeros(2), torch.zeros(3)])
    assert not can_fuse([torch.zeros(2, device="meta")])
    assert not can_fuse([torch.zeros(2, dtype=torch.int64)])
    assert not can_fuse([])


def test_run_logger_writes_jsonl_and_tensorboard(tmp_path):
    import json

    lg = RunLogger(tmp_path)
    lg.log({"loss": torch.tensor(1.5), "bad": float("nan")}, step=3, prefix="train/")
    lg.close()
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert rec["iteration"] == 3 and rec["loss"] == 1.5 and rec["bad"] == "nan"
    assert any((tmp_path / "tb").iterdir())
    RunLogger(tmp_path / "other", enabled=False).log({"x": 1})
    assert not (tmp_path / "other").exists()
