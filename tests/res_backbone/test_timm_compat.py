"""res_backbone as a timm citizen: registry names, features_only, configs, equivalence with timm's
own ResNet on identical weights, offline pretrained loading from (fake) caches (timm's own suite:
tests/tools/test_run_timm_suite.py)."""
import time
from pathlib import Path

import pytest
import torch
import timm
from safetensors.torch import load_file

import res_backbone
from res_backbone import PretrainedNotFoundError
from res_backbone.weights.catalogue import IMAGENET_MEAN, IMAGENET_STD
from res_backbone.weights.testing import FAKE_REVISION, write_fake_timm_cache, write_fake_torchvision_cache

RB_NAMES = [f"rb_{kind}{depth}" for kind in ("resnet", "plain") for depth in (18, 34, 50, 101, 152, 20, 32, 44, 56, 110)]


@pytest.fixture(scope="module")
def fake_caches(tmp_path_factory):
    """resnet18's torchvision and timm checkpoints, random, where the real caches keep them."""
    root = tmp_path_factory.mktemp("fake-caches")
    tv = write_fake_torchvision_cache(root / "torch", ["resnet18"])
    hf = write_fake_timm_cache(root / "hub", ["resnet18"])
    return {"torch_home": root / "torch", "hf_hub_cache": root / "hub", **tv, **hf}


@pytest.fixture
def use_caches(monkeypatch, fake_caches):
    monkeypatch.setenv("TORCH_HOME", str(fake_caches["torch_home"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_caches["hf_hub_cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return fake_caches


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_registry_lists_every_variant():
    assert sorted(timm.list_models("rb_*")) == sorted(RB_NAMES)
    assert "rb_resnet50.a1_in1k" in timm.list_models("rb_*", pretrained=True)
    assert not timm.list_models("rb_plain*", pretrained=True)  # plain twins have no ImageNet weights


def test_features_only_info_matches_tensors():
    model = timm.create_model("rb_resnet101", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    assert model.feature_info.channels() == [256, 512, 1024, 2048]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [o.shape[1] for o in outs] == model.feature_info.channels()
    assert [tuple(o.shape[-2:]) for o in outs] == [(64 // r, 96 // r) for r in model.feature_info.reduction()]


def test_pretrained_cfg_carries_data_config():
    model = timm.create_model("rb_resnet50")
    cfg = model.pretrained_cfg
    assert cfg["tag"] == "tv2_in1k"
    assert tuple(cfg["mean"]) == IMAGENET_MEAN and tuple(cfg["std"]) == IMAGENET_STD
    assert tuple(cfg["input_size"]) == (3, 224, 224)
    a1 = timm.create_model("rb_resnet50.a1_in1k").pretrained_cfg
    assert tuple(a1["test_input_size"]) == (3, 288, 288) and a1["interpolation"] == "bicubic"
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == (3, 224, 224) and data["mean"] == IMAGENET_MEAN


@pytest.fixture(scope="module")
def timm_resnet50():
    torch.manual_seed(0)
    model = timm.create_model("resnet50").eval()
    with torch.no_grad():  # non-trivial BN statistics so eval-mode BN is actually exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model


def test_classifier_equals_timm_resnet50(timm_resnet50):
    ours = res_backbone.create_model("resnet50").eval()
    ours.load_state_dict(timm_resnet50.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), timm_resnet50.forward_features(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x), timm_resnet50(x), rtol=0, atol=1e-5)


def test_backbone_equals_timm_features_only(timm_resnet50):
    sd = {k: v for k, v in timm_resnet50.state_dict().items() if not k.startswith("fc.")}
    ours = res_backbone.create_backbone("resnet50").eval()
    ours.load_state_dict(sd, strict=True)
    theirs = timm.create_model("resnet50", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    theirs.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feats, ref = ours(x), theirs(x)
    assert list(feats) == ["res2", "res3", "res4", "res5"]
    for name, a, b in zip(feats, feats.values(), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    assert [f["num_chs"] for f in ours.feature_info] == theirs.feature_info.channels()


def test_fake_hf_cache_is_what_huggingface_hub_reads(fake_caches):
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache("timm/resnet18.a1_in1k", "model.safetensors", cache_dir=fake_caches["hf_hub_cache"])
    assert found is not None and Path(found) == fake_caches["resnet18.a1_in1k"]
    assert FAKE_REVISION in str(found)


def test_pretrained_from_torchvision_cache(use_caches):
    model = timm.create_model("rb_resnet18", pretrained=True)
    src = torch.load(use_caches["resnet18.tv_in1k"], map_location="cpu", weights_only=True)
    own = model.state_dict()
    assert set(src) == set(own)
    for k, v in src.items():
        assert torch.equal(own[k], v), k
    assert model.pretrained_cfg["tag"] == "tv_in1k"


def test_pretrained_from_timm_cache_adapts_head_and_input(use_caches):
    model = timm.create_model("rb_resnet18.a1_in1k", pretrained=True, num_classes=5, in_chans=1)
    src = load_file(str(use_caches["resnet18.a1_in1k"]))
    own = model.state_dict()
    assert own["fc.weight"].shape == (5, 512) and own["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(own["conv1.weight"], src["conv1.weight"].sum(dim=1, keepdim=True))
    for k, v in src.items():
        if k.split(".")[0] not in ("fc", "conv1"):
            assert torch.equal(own[k], v), k
    assert model.pretrained_cfg["interpolation"] == "bicubic"


def test_pretrained_features_only_from_cache(use_caches):
    model = timm.create_model("rb_resnet18", pretrained=True, features_only=True)
    src = torch.load(use_caches["resnet18.tv_in1k"], map_location="cpu", weights_only=True)
    own = model.state_dict()
    assert "fc.weight" not in own
    for k, v in own.items():
        assert torch.equal(v, src[k]), k


@pytest.mark.parametrize("name, directory, filename", [
    ("rb_resnet50", "torch/hub/checkpoints", "resnet50-11ad3fa6.pth"),
    ("rb_resnet50.a1_in1k", "hub/models--timm--resnet50.a1_in1k", "model.safetensors"),
])
def test_missing_file_fails_at_once(empty_caches, name, directory, filename):
    t0 = time.perf_counter()
    with pytest.raises(PretrainedNotFoundError) as err:
        timm.create_model(name, pretrained=True)
    assert time.perf_counter() - t0 < 1.0
    msg = str(err.value)
    assert str(empty_caches / directory) in msg and filename in msg


def test_plain_twin_has_no_pretrained_weights(empty_caches):
    with pytest.raises(PretrainedNotFoundError, match="plain"):
        timm.create_model("rb_plain18", pretrained=True)
