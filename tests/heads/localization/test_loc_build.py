"""build_localizer / load_localizer: frozen-classifier builds, the automatic grid, checkpoint round trips."""
import pytest
import torch

from heads import build_localizer, load_localizer
from heads.classification import NumClassesMismatchError
from res_backbone import create_model

K = 5


def _fake_cls_checkpoint(path, num_classes=K, in_chans=1):
    model = create_model("resnet20", num_classes=num_classes, in_chans=in_chans)
    torch.save({"model": model.state_dict(), "model_name": "resnet20",
                "model_kwargs": {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": 0.0},
                "pretrained_cfg": {"mean": [0.286], "std": [0.353], "input_size": [in_chans, 28, 28],
                                   "num_classes": num_classes, "tag": None, "source": "res_backbone"},
                "classes": [f"c{i}" for i in range(num_classes)], "task": "classification"}, path)
    return model


def test_on_top_of_a_frozen_grey_level_classifier(tmp_path):
    ck = tmp_path / "cls.pt"
    cls_model = _fake_cls_checkpoint(ck).eval()
    model = build_localizer(None, K, "pcr", cls_checkpoint=ck)
    assert model.frozen_classifier and model.build_kwargs["backbone_name"] == "resnet20"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("head.box_reduce", "head.box_fc")) for n in trainable)
    model.train()
    assert not model.backbone.training and not model.head.cls.training and model.head.box_fc.training
    # grey image repeated on 3 channels -> the RGB-adapted classifier gives the original logits
    grey = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(grey.expand(-1, 3, -1, -1))["logits"], cls_model(grey), atol=1e-4)
    assert model.pretrained_cfg["mean"] == [0.286]
    with pytest.raises(NumClassesMismatchError):
        build_localizer(None, K + 1, "scr", cls_checkpoint=ck)
    with pytest.raises(ValueError, match="resnet20"):
        build_localizer("resnet18", K, "scr", cls_checkpoint=ck)


def test_load_localizer_round_trip(tmp_path):
    model = build_localizer("resnet20", K, "pcr", grid=2).eval()
    path = tmp_path / "loc.pt"
    torch.save({"model": model.state_dict(), "localizer_kwargs": model.build_kwargs,
                "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.2] * 3}}, path)
    loaded, ck = load_localizer(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)["boxes"], model(x)["boxes"])
    assert loaded.pretrained_cfg["mean"] == [0.5] * 3 and not loaded.training
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(Exception, match="localizer_kwargs"):
        load_localizer(path)


def test_automatic_grid_follows_the_last_map():
    assert build_localizer("resnet18", K, input_size=64).head.grid == 2  # 64 / 32
    assert build_localizer("resnet18", K, input_size=96).head.grid == 3
    assert build_localizer("resnet18", K, input_size=224).head.grid == 4  # 7, capped
    assert build_localizer("resnet18", K).head.grid == 3
    assert build_localizer("resnet18", K, grid=5, input_size=64).head.grid == 5


def test_crop_pass_starts_from_the_pretrained_classifier_and_round_trips(tmp_path):
    clf = create_model("resnet20", num_classes=K)
    path = tmp_path / "cls.pt"
    torch.save({"model": clf.state_dict(), "arch": "resnet20", "model_name": "resnet20"}, path)
    model = build_localizer("resnet20", K, "scr", pretrained=str(path), crop_size=16)
    for branch in (model.head.cls, model.head.crop_cls):
        assert torch.equal(branch.fc.weight, clf.fc.weight)
    with pytest.raises(ValueError, match="crop pass"):
        build_localizer(None, K, "scr", cls_checkpoint=str(path), crop_size=16)
    ck = tmp_path / "loc.pt"
    torch.save({"model": model.state_dict(), "localizer_kwargs": model.build_kwargs}, ck)
    again, _ = load_localizer(ck)
    assert again.crop_size == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x)["crop_logits"], model.eval()(x)["crop_logits"], atol=1e-6)
