"""The CIFAR nets of the paper's section 4.2 (depth 6n+2, 16/32/64 filters, option-A shortcuts)."""
import pytest
import timm
import torch

import res_backbone as rb
from res_backbone.layers import ZeroPadShortcut

# Table 6 prints 0.27M / 0.46M / 0.66M / 0.85M / 1.7M (3-channel input, 10 classes).
TABLE6 = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6, "resnet110": 1.7e6}
EXACT_RGB = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018, "resnet110": 1_727_962}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list(TABLE6))
def test_parameter_counts_match_table6(name):
    model = rb.create_model(name, num_classes=10)
    assert n_params(model) == EXACT_RGB[name]
    assert round(n_params(model) / 1e6, 2 if name != "resnet110" else 1) == pytest.approx(TABLE6[name] / 1e6)
    # option-A shortcuts hold no parameters, so the plain twin has exactly as many
    assert n_params(rb.create_model(name.replace("resnet", "plain"), num_classes=10)) == EXACT_RGB[name]


def test_resnet20_grayscale_ten_classes():
    assert n_params(rb.create_model("resnet20", in_chans=1, num_classes=10)) == 269_434


def test_layout_depth_and_shortcuts():
    model = rb.create_model("resnet56", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == 56  # 6n+1 convs + the classifier = 6n+2 weighted layers
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    pads = [m for m in model.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(pads) == 2  # the two stage transitions 16->32, 32->64
    plain = rb.create_model("plain56", num_classes=10)
    assert not any(isinstance(m, ZeroPadShortcut) for m in plain.modules())
    assert [b.residual for b in plain.layer1] == [False] * 9


def test_feature_contract_and_shapes():
    model = rb.create_model("resnet20", in_chans=1, num_classes=10)
    assert [(f["name"], f["num_chs"], f["reduction"]) for f in model.feature_info] == [
        ("stem", 16, 1), ("res2", 16, 1), ("res3", 32, 2), ("res4", 64, 4)
    ]
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    assert model.forward_features(x).shape == (2, 64, 7, 7)
    backbone = rb.create_backbone("resnet20", in_chans=1)
    feats = backbone(x)
    assert list(feats) == ["res2", "res3", "res4"]
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "res2": (16, 28, 28), "res3": (32, 14, 14), "res4": (64, 7, 7)
    }
    with pytest.raises(ValueError, match="res5"):
        rb.create_backbone("resnet20", out_features=("res5",))


def test_dense_scores_and_freezing():
    model = rb.create_model("resnet20", num_classes=10, global_pool="")
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 10, 10, 10)
    frozen = rb.create_model("resnet20", num_classes=10, frozen_stages=4, pretrained=False)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    with pytest.raises(ValueError, match=r"0\.\.4"):
        rb.create_model("resnet20", frozen_stages=5)


def test_checkpoint_round_trip_into_backbone(tmp_path):
    torch.manual_seed(0)
    model = rb.create_model("resnet32", in_chans=1, num_classes=10).eval()
    path = tmp_path / "r32.pt"
    torch.save({"model": model.state_dict()}, path)
    again = rb.create_model("resnet32", in_chans=1, num_classes=10, pretrained=path).eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    backbone = rb.create_backbone("resnet32", in_chans=1, pretrained=path).eval()
    torch.testing.assert_close(backbone(x)["res4"], model.forward_features(x), rtol=0, atol=0)


def test_timm_citizen():
    model = timm.create_model("rb_resnet20", num_classes=10)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    feats = timm.create_model("rb_plain20", features_only=True)(torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [16, 16, 32, 64]
    eager = rb.create_model("resnet20", num_classes=10).eval()
    scripted = torch.jit.script(eager)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(scripted(x), eager(x))
