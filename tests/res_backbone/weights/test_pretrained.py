"""Offline pretrained loading: cache lookup, formats, adaptations, and the errors users see."""
import os
import time

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import res_backbone as rb
from res_backbone.weights.cache import PretrainedNotFoundError
from res_backbone.weights.catalogue import CATALOGUE
from res_backbone.weights.files import CheckpointMismatchError, read_checkpoint


def _tv_file(home, name="resnet18", filename="resnet18-f37072fd.pth"):
    tv = getattr(torchvision.models, name)(weights=None)
    path = home / "hub" / "checkpoints" / filename
    torch.save(tv.state_dict(), path)
    return tv.eval(), path


def test_pretrained_true_finds_torchvision_cache(tmp_torch_home):
    tv, _ = _tv_file(tmp_torch_home)
    m = rb.create_model("resnet18", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), tv(x))
    assert m.pretrained_cfg["tag"] == "tv_in1k"
    assert m.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert m.pretrained_cfg["input_size"] == (3, 224, 224)


def test_pretrained_true_finds_timm_hf_cache(tmp_path, tmp_torch_home, monkeypatch):
    import timm

    src = timm.create_model("resnet50", pretrained=False).eval()
    repo = tmp_path / "hf_cache" / "models--timm--resnet50.a1_in1k"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file(src.state_dict(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    backbone = rb.create_backbone("resnet50", pretrained=True).eval()
    assert backbone.pretrained_cfg["tag"] == "a1_in1k" and backbone.pretrained_cfg["interpolation"] == "bicubic"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone(x)["res5"], src.forward_features(x))


def test_missing_weights_fail_at_once_naming_dirs_and_files(tmp_torch_home):
    start = time.perf_counter()
    with pytest.raises(PretrainedNotFoundError) as err:
        rb.create_backbone("resnet101", pretrained=True)
    assert time.perf_counter() - start < 2.0
    msg = str(err.value)
    assert str(tmp_torch_home / "hub" / "checkpoints") in msg
    assert "resnet101-cd907fc2.pth" in msg and "resnet101-63fe2227.pth" in msg
    assert "models--timm--resnet101.a1_in1k" in msg


def test_plain_twins_have_no_catalogued_weights(tmp_torch_home):
    with pytest.raises(PretrainedNotFoundError, match="no ImageNet weights are catalogued for 'plain34'"):
        rb.create_model("plain34", pretrained=True)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(PretrainedNotFoundError, match="nope.pth.*no such checkpoint file"):
        rb.create_model("resnet18", pretrained=str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("wrapper", ["plain", "model", "state_dict", "module_prefix", "safetensors"])
def test_formats_and_wrappers(tmp_path, wrapper):
    src = rb.create_model("resnet18", num_classes=10).eval()
    sd = src.state_dict()
    path = tmp_path / ("w.safetensors" if wrapper == "safetensors" else "w.pth")
    if wrapper == "safetensors":
        save_file(sd, str(path))
    else:
        obj = {"plain": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd},
               "module_prefix": {"module." + k: v for k, v in sd.items()}}[wrapper]
        torch.save(obj, path)
    m = rb.create_model("resnet18", num_classes=10, pretrained=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))


def test_own_checkpoint_round_trip_keeps_pretrained_cfg(tmp_path):
    src = rb.create_model("resnet50", num_classes=4, in_chans=1).eval()
    cfg = {"mean": (0.286,), "std": (0.353,), "input_size": (1, 28, 28)}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": src.state_dict(), "arch": "resnet50", "pretrained_cfg": cfg, "epoch": 1}, path)
    clf = rb.create_model("resnet50", num_classes=4, in_chans=1, pretrained=path).eval()
    backbone = rb.create_backbone("resnet50", in_chans=1, pretrained=path, fpn=True).eval()
    assert clf.pretrained_cfg["mean"] == (0.286,) and backbone.pretrained_cfg["input_size"] == (1, 28, 28)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(clf(x), src(x))
        assert torch.equal(backbone.forward_stages(x, ("res5",))["res5"], src.forward_features(x))


def test_classifier_dropped_when_num_classes_differs(tmp_torch_home):
    tv, _ = _tv_file(tmp_torch_home)
    m = rb.create_model("resnet18", pretrained=True, num_classes=5)
    assert m.fc.out_features == 5
    assert torch.equal(m.conv1.weight, tv.conv1.weight)


def test_grayscale_input_sums_first_conv(tmp_torch_home):
    tv, _ = _tv_file(tmp_torch_home)
    m = rb.create_model("resnet18", pretrained=True, in_chans=1).eval()
    assert torch.allclose(m.conv1.weight, tv.conv1.weight.sum(1, keepdim=True))
    grey = torch.rand(1, 1, 64, 64)
    with torch.no_grad():  # a grey image as R=G=B gives the same response
        torch.testing.assert_close(m(grey), tv(grey.expand(1, 3, 64, 64)), rtol=1e-4, atol=1e-4)


def test_wrong_depth_names_missing_unexpected_and_shapes(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as err:
        rb.create_model("resnet50", pretrained=path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys" in msg and "layer1.0.conv3.weight" in msg
    assert "shape mismatches" in msg and "layer1.0.conv1.weight" in msg


def test_unexpected_keys_are_named(tmp_path):
    sd = rb.create_model("resnet18").state_dict()
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): extra.weight"):
        rb.create_model("resnet18", pretrained=path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_callable_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": rb.create_model("resnet18").state_dict(), "hook": _Evil()}, path)
    with pytest.raises(CheckpointMismatchError, match="weights-only"):
        read_checkpoint(path)


def test_not_a_state_dict_is_explained(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointMismatchError, match="no state dict found"):
        rb.create_model("resnet18", pretrained=path)


def test_catalogue_matches_torchvision_weights_enums():
    """File names (with torchvision's hash prefix) and accuracies equal torchvision's own tables."""
    from torchvision.models import resnet as tvr

    for e in (e for e in CATALOGUE if e.source == "torchvision"):
        enum = getattr(tvr, f"ResNet{e.arch[6:]}_Weights")
        w = enum.IMAGENET1K_V1 if e.tag == "tv_in1k" else enum.IMAGENET1K_V2
        assert w.url.endswith("/" + e.filename)
        assert w.meta["_metrics"]["ImageNet-1K"]["acc@1"] == e.top1
        assert round(224 / w.transforms().resize_size[0], 4) == round(e.crop_pct, 4)
