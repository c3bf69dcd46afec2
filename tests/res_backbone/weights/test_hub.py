"""timm's hub layout both ways: save_for_timm_hub -> timm.create_model('local-dir:...') with bitwise-equal
logits, and a timm hub folder (ours or timm.models.save_for_hf's) as pretrained= (HF_HUB_OFFLINE=1)."""
import json
import os

import pytest
import timm
import torch
from timm.data import resolve_data_config

import res_backbone as rb
from res_backbone.weights.cache import hf_snapshot_paths
from res_backbone.weights.files import CheckpointMismatchError
from res_backbone.weights.hub import read_hub_folder, save_for_timm_hub
from res_backbone.weights.testing import write_tiny_cls_checkpoint

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _trained_like_resnet20(num_classes=7):
    """Random weights and BatchNorm statistics far from 0/1, as after training (a skipped buffer shows)."""
    torch.manual_seed(0)
    model = rb.create_model("resnet20", num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=MEAN, std=STD)
    return model.eval()


def _logits(model, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(x)


def test_hf_hub_offline_is_set():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: nothing may reach the network


def test_trained_resnet20_round_trip_bitwise(tmp_path):
    model = _trained_like_resnet20()
    names = [f"c{i}" for i in range(7)]
    res = save_for_timm_hub(model, tmp_path / "r20", label_names=names)
    assert sorted(p.name for p in (tmp_path / "r20").iterdir()) == ["config.json", "model.safetensors"]
    assert any("bitwise equal" in line for line in res.checks)
    config = json.loads((tmp_path / "r20" / "config.json").read_text())
    assert config["architecture"] == "rb_resnet20" and config["num_classes"] == 7 and config["label_names"] == names
    loaded = timm.create_model(f"local-dir:{tmp_path / 'r20'}", pretrained=True)
    data = resolve_data_config({}, model=loaded)
    got = (loaded.num_classes, tuple(data["input_size"]), tuple(data["mean"]), tuple(data["std"]))
    assert got == (7, (3, 32, 32), MEAN, STD)
    assert torch.equal(_logits(loaded, (3, 3, 32, 32)), _logits(model, (3, 3, 32, 32)))
    # and back: the folder as our pretrained= (what --pretrained FOLDER passes)
    again = rb.create_model("resnet20", num_classes=7, pretrained=str(tmp_path / "r20"))
    assert again.pretrained_cfg["mean"] == list(MEAN) and again.pretrained_cfg["input_size"] == [3, 32, 32]
    assert torch.equal(_logits(again, (3, 3, 32, 32)), _logits(model, (3, 3, 32, 32)))


def test_resnet50_random_weights_and_arch_options_round_trip(tmp_path):
    torch.manual_seed(1)
    model = rb.create_model("resnet50", num_classes=5, stride_in_1x1=True)
    res = save_for_timm_hub(model, tmp_path / "r50")
    assert res.model_args["stride_in_1x1"] is True and res.pretrained_cfg["input_size"] == [3, 224, 224]
    loaded = timm.create_model(f"local-dir:{tmp_path / 'r50'}", pretrained=True)
    assert loaded.layer1[0].conv1.stride == (1, 1) and loaded.layer2[0].conv1.stride == (2, 2)  # the paper's 1x1
    assert torch.equal(_logits(loaded, (2, 3, 64, 64)), _logits(model, (2, 3, 64, 64)))


def test_train_cls_checkpoint_and_backbone_export(tmp_path):
    ckpt = write_tiny_cls_checkpoint(tmp_path / "best.pth", classes=[f"k{i}" for i in range(10)])
    res = save_for_timm_hub(ckpt, tmp_path / "cls")
    config = json.loads((tmp_path / "cls" / "config.json").read_text())
    assert config["label_names"][0] == "k0" and config["model_args"]["in_chans"] == 1
    assert res.pretrained_cfg["input_size"] == [1, 28, 28] and res.pretrained_cfg["mean"] == [0.2860]
    # a full backbone travels as a num_classes=0 model; timm's forward_features gives its res5
    backbone = rb.create_backbone("resnet18").eval()
    save_for_timm_hub(backbone, tmp_path / "bb")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'bb'}", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert loaded.num_classes == 0 and torch.equal(loaded.forward_features(x), backbone(x)["res5"])


def test_timm_save_for_hf_folder_as_pretrained(tmp_path):
    """The reverse: a folder timm itself wrote for an rb_* model loads through our pretrained lookup."""
    torch.manual_seed(2)
    model = timm.create_model("rb_resnet18", num_classes=4).eval()
    timm.models.save_for_hf(model, tmp_path / "timm_rb18", safe_serialization=True)
    ours = rb.create_model("resnet18", num_classes=4, pretrained=str(tmp_path / "timm_rb18"))
    assert torch.equal(_logits(ours, (1, 3, 64, 64)), _logits(model, (1, 3, 64, 64)))
    back = timm.create_model(f"local-dir:{tmp_path / 'timm_rb18'}", pretrained=True)  # was PretrainedNotFoundError
    assert torch.equal(_logits(back, (1, 3, 64, 64)), _logits(model, (1, 3, 64, 64)))


def test_hf_hub_name_reads_the_local_cache_only(tmp_path, monkeypatch):
    model = _trained_like_resnet20(num_classes=3)
    snap = tmp_path / "hub" / "models--me--r20" / "snapshots" / "abc"
    save_for_timm_hub(model, snap, verify=False)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path, cfg, _ = read_hub_folder("hf-hub:me/r20", hf_snapshot_paths)
    assert path == snap / "model.safetensors" and cfg["architecture"] == "rb_resnet20"
    ours = rb.create_model("resnet20", num_classes=3, pretrained="hf-hub:me/r20")
    assert torch.equal(_logits(ours, (1, 3, 32, 32)), _logits(model, (1, 3, 32, 32)))
    # timm's own hf-hub: source (as once the folder is uploaded), served from that cache offline
    theirs = timm.create_model("hf-hub:me/r20", pretrained=True, cache_dir=str(tmp_path / "hub"))
    assert torch.equal(_logits(theirs, (1, 3, 32, 32)), _logits(model, (1, 3, 32, 32)))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        read_hub_folder("hf-hub:me/absent", hf_snapshot_paths)


def test_refusals_name_the_cause(tmp_path):
    model = _trained_like_resnet20()
    save_for_timm_hub(model, tmp_path / "x", verify=False)
    with pytest.raises(FileExistsError, match="not empty"):
        save_for_timm_hub(model, tmp_path / "x")
    save_for_timm_hub(rb.create_model("resnet20", num_classes=2), tmp_path / "x", overwrite=True, verify=False)
    assert json.loads((tmp_path / "x" / "config.json").read_text())["num_classes"] == 2
    with pytest.raises(ValueError, match="FPN"):
        save_for_timm_hub(rb.create_backbone("resnet18", fpn=True), tmp_path / "fpn")
    with pytest.raises(ValueError, match="label names"):
        save_for_timm_hub(model, tmp_path / "labels", label_names=["a"])
    torch.save({"model": model.state_dict()}, tmp_path / "anon.pth")
    with pytest.raises(CheckpointMismatchError, match="model_name"):
        save_for_timm_hub(tmp_path / "anon.pth", tmp_path / "anon")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_hub_folder(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
