"""heads.classification: pooling head, Classifier, load_classifier round trip and its errors."""
import pytest
import torch

from heads import ClassificationHead, Classifier, NumClassesMismatchError, build_classifier, load_classifier
from res_backbone import CheckpointMismatchError, create_backbone, create_model
from res_backbone.evaluation.classification import fully_conv_scores
from res_backbone.weights.testing import write_tiny_cls_checkpoint


def test_head_pools_and_classifies():
    head = ClassificationHead(8, 3).eval()
    x = torch.randn(2, 8, 5, 4)
    expected = x.mean(dim=(2, 3)) @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(head(x), expected)


def test_unpooled_head_is_the_linear_layer_at_every_position():
    head = ClassificationHead(8, 3, pool="").eval()
    x = torch.randn(2, 8, 5, 4)
    maps = head(x)
    assert maps.shape == (2, 3, 5, 4)
    torch.testing.assert_close(maps[1, :, 3, 2], head.fc(x[1, :, 3, 2]))
    pooled = ClassificationHead(8, 3).eval()
    pooled.load_state_dict(head.state_dict())
    torch.testing.assert_close(maps.mean(dim=(2, 3)), pooled(x))


def test_head_reads_the_named_or_last_level_of_a_dict():
    x3, x4 = torch.randn(1, 4, 6, 6), torch.randn(1, 8, 3, 3)
    feats = {"res3": x3, "res4": x4}
    head = ClassificationHead(8, 2).eval()
    torch.testing.assert_close(head(feats), head(x4))
    named = ClassificationHead(4, 2, in_features="res3").eval()
    torch.testing.assert_close(named(feats), named(x3))
    with pytest.raises(KeyError, match="res5"):
        ClassificationHead(8, 2, in_features="res5")(feats)
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        ClassificationHead(4, 2)(x4)


def test_dropout_only_in_training():
    head = ClassificationHead(16, 4, drop_rate=0.5)
    x = torch.randn(8, 16, 2, 2)
    head.eval()
    torch.testing.assert_close(head(x), head(x))
    head.train()
    assert not torch.allclose(head(x), head(x))


def test_classifier_on_a_cifar_backbone_reads_res4():
    backbone = create_backbone("resnet20", in_chans=1, out_features=("res3", "res4"))
    model = build_classifier("resnet20", 10, in_chans=1, out_features=("res3", "res4"))
    assert model.head.in_features == backbone.feature_info[-1]["name"] == "res4"
    assert model.head.in_channels == 64
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    assert model(x).shape == (2, 10)
    assert model.forward_features(x).shape == (2, 64, 7, 7)
    assert model.get_classifier() is model.head.fc
    with pytest.raises(ValueError, match="channels"):
        Classifier(backbone, ClassificationHead(32, 10))


def test_classifier_supports_fully_convolutional_testing():
    model = build_classifier("resnet20", 4, in_chans=1).eval()
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        direct = model(x).softmax(1)
    torch.testing.assert_close(fully_conv_scores(model, x, [12], average="logits"), direct, atol=1e-5, rtol=1e-4)


def test_load_classifier_round_trip(tmp_path):
    path = write_tiny_cls_checkpoint(tmp_path / "ck.pt", num_classes=5, classes=[f"c{i}" for i in range(5)])
    ck = torch.load(path, weights_only=True)
    ref = create_model("resnet20", in_chans=1, num_classes=5)
    ref.load_state_dict(ck["model"])
    ref.eval()
    model, meta = load_classifier(path)
    assert not model.training
    assert model.pretrained_cfg["input_size"] == [1, 28, 28] and model.pretrained_cfg["mean"] == [0.286]
    assert model.pretrained_cfg["file"] == str(path)
    assert meta["classes"] == ["c0", "c1", "c2", "c3", "c4"] and meta["task"] == "classification"
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(model(x), ref(x))
    same, _ = load_classifier(path, num_classes=5)
    torch.testing.assert_close(same(x), ref(x))


def test_load_classifier_num_classes_mismatch_explains(tmp_path):
    path = write_tiny_cls_checkpoint(tmp_path / "ck.pt", num_classes=5)
    with pytest.raises(NumClassesMismatchError, match=r"has 5 classes.*num_classes=10.*pass num_classes=5") as e:
        load_classifier(path, num_classes=10)
    assert isinstance(e.value, ValueError)


def test_load_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_classifier(tmp_path / "missing.pt")
    bad = tmp_path / "noname.pt"
    torch.save({"model": create_model("resnet20", num_classes=3).state_dict()}, bad)
    with pytest.raises(CheckpointMismatchError, match="model_name"):
        load_classifier(bad)
    lying = write_tiny_cls_checkpoint(tmp_path / "lying.pt", num_classes=4)
    ck = torch.load(lying, weights_only=True)
    ck["model_kwargs"]["num_classes"] = 7
    torch.save(ck, lying)
    with pytest.raises(CheckpointMismatchError, match="num_classes'\\]=7.*4 rows"):
        load_classifier(lying)
