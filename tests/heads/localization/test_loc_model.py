"""LocalizationHead / LocalizationModel: shapes of both modes, predict, the head's checks, flip TTA."""
import pytest
import torch

from heads import LocalizationHead, LocalizationModel, build_localizer
from res_backbone import create_backbone

K = 5


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
@pytest.mark.parametrize("mode", ["scr", "pcr"])
def test_output_shapes_and_box_format(name, mode):
    model = build_localizer(name, K, mode).eval()
    out = model(torch.randn(2, 3, 64, 48))
    assert out["logits"].shape == (2, K)
    assert out["boxes"].shape == ((2, 4) if mode == "scr" else (2, K, 4))
    b = out["boxes"]
    assert torch.all(b[..., 2] >= b[..., 0]) and torch.all(b[..., 3] >= b[..., 1])  # never inverted
    # the zero-initialised last layer starts every box centred at half size
    assert torch.allclose(b, torch.tensor([0.25, 0.25, 0.75, 0.75]).expand_as(b))
    # the head reads the backbone's last level, whatever it is called (res4 for the CIFAR nets)
    assert model.head.in_features == model.backbone.feature_info[-1]["name"]


def test_predict_returns_the_box_of_each_predicted_class():
    model = build_localizer("resnet20", K, "pcr").eval()
    with torch.no_grad():
        model.head.box_fc[-1].bias.copy_(torch.randn(4 * K))  # a different box per class
    x = torch.randn(3, 3, 32, 32)
    pred = model.predict(x, k=3)
    assert pred["classes"].shape == (3, 3) and pred["scores"].shape == (3, 3) and pred["boxes"].shape == (3, 3, 4)
    assert pred["class_boxes"].shape == (3, K, 4)
    assert torch.all(pred["scores"][:, :-1] >= pred["scores"][:, 1:])  # best first
    raw = model(x)
    for i in range(3):
        for j in range(3):
            c = int(pred["classes"][i, j])
            assert torch.allclose(pred["boxes"][i, j], raw["boxes"][i, c].clamp(0, 1))
    assert model.predict(x, k=50)["classes"].shape == (3, K)  # k capped at K


def test_scr_predict_repeats_its_one_box():
    model = build_localizer("resnet20", K, "scr").eval()
    pred = model.predict(torch.randn(2, 3, 32, 32), k=K)
    assert torch.equal(pred["boxes"], pred["boxes"][:, :1].expand(-1, K, -1))


def test_head_checks_and_model_wiring():
    with pytest.raises(ValueError, match="mode"):
        LocalizationHead(64, K, "both")
    backbone = create_backbone("resnet20")
    with pytest.raises(ValueError, match="channels"):
        LocalizationModel(backbone, LocalizationHead(32, K))
    model = LocalizationModel(backbone, LocalizationHead(64, K, grid=2))
    assert model.head.in_features == "res4"


def test_flip_tta_is_mirror_equivariant():
    model = build_localizer("resnet20", K, "pcr").eval()
    with torch.no_grad():
        model.head.box_fc[-1].bias.copy_(torch.randn(4 * K))
    x = torch.randn(2, 3, 32, 32)
    a, b = model.predict(x, k=K, flip=True), model.predict(x.flip(-1), k=K, flip=True)
    assert torch.equal(a["classes"], b["classes"]) and torch.allclose(a["scores"], b["scores"], atol=1e-5)
    mirrored = torch.stack([1 - b["boxes"][..., 2], b["boxes"][..., 1], 1 - b["boxes"][..., 0], b["boxes"][..., 3]], -1)
    assert torch.allclose(a["boxes"], mirrored, atol=1e-5)
    assert not torch.allclose(model.predict(x, k=K)["scores"], a["scores"])  # it does change the prediction
