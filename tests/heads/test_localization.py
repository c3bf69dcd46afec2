"""LocalizationHead / LocalizationModel: shapes of both modes, predict, the loss, frozen-classifier builds."""
import pytest
import torch

from heads import LocalizationHead, LocalizationModel, build_localizer, load_localizer, localization_loss
from heads.classification import NumClassesMismatchError
from res_backbone import create_backbone, create_model

K = 5


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core machine, two threads per op wait on each other (3-10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_loss_terms_and_pcr_trains_only_the_true_class_box():
    out = {"logits": torch.zeros(2, K, requires_grad=True), "boxes": torch.rand(2, K, 4).sort(-1).values.requires_grad_()}
    labels, boxes = torch.tensor([1, 3]), torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8]])
    losses = localization_loss(out, labels, boxes, cls_weight=1.0, l1_weight=5.0, giou_weight=2.0)
    assert set(losses) == {"loss_cls", "loss_l1", "loss_giou"}
    assert losses["loss_cls"].item() == pytest.approx(torch.log(torch.tensor(float(K))).item(), rel=1e-5)
    sum(losses.values()).backward()
    grad = out["boxes"].grad.abs().sum(-1)
    assert grad[0, 1] > 0 and grad[1, 3] > 0
    assert grad[0].sum() == grad[0, 1] and grad[1].sum() == grad[1, 3]
    perfect = {"logits": torch.tensor([[0.0, 50, 0, 0, 0]]), "boxes": boxes[:1]}
    zero = localization_loss(perfect, labels[:1], boxes[:1])
    assert all(v.item() == pytest.approx(0.0, abs=1e-5) for v in zero.values())
    with pytest.raises(ValueError, match="targets"):
        localization_loss({"logits": out["logits"], "boxes": torch.rand(2, 4)}, labels, boxes[:, :2])


@pytest.mark.parametrize("mode", ["scr", "pcr"])
def test_loss_decreases_on_a_tiny_overfit(mode):
    torch.manual_seed(0)
    model = build_localizer("resnet20", K, mode, hidden=64, box_channels=32)
    x = torch.randn(8, 3, 16, 16)
    labels = torch.arange(8) % K
    boxes = torch.rand(8, 2).mul(0.4)
    boxes = torch.cat([boxes, boxes + 0.3 + torch.rand(8, 2) * 0.3], 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(25):
        loss = sum(localization_loss(model(x), labels, boxes).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first


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


def test_head_checks_and_model_wiring():
    with pytest.raises(ValueError, match="mode"):
        LocalizationHead(64, K, "both")
    backbone = create_backbone("resnet20")
    with pytest.raises(ValueError, match="channels"):
        LocalizationModel(backbone, LocalizationHead(32, K))
    model = LocalizationModel(backbone, LocalizationHead(64, K, grid=2))
    assert model.head.in_features == "res4"


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


def test_automatic_grid_follows_the_last_map():
    assert build_localizer("resnet18", K, input_size=64).head.grid == 2  # 64 / 32
    assert build_localizer("resnet18", K, input_size=96).head.grid == 3
    assert build_localizer("resnet18", K, input_size=224).head.grid == 4  # 7, capped
    assert build_localizer("resnet18", K).head.grid == 3
    assert build_localizer("resnet18", K, grid=5, input_size=64).head.grid == 5


def test_crop_pass_reads_the_box_region():
    """The crop is the box's region resampled: a box over the left half of an image whose left half is
    constant gives a constant crop, and context enlarges the region."""
    model = build_localizer("resnet18", K, "scr", crop_size=8, crop_context=0.0).eval()
    x = torch.zeros(1, 3, 32, 32)
    x[..., :16] = 2.0
    crop = model.crop(x, torch.tensor([[0.0625, 0.0625, 0.4375, 0.9375]]))
    assert crop.shape == (1, 3, 8, 8)
    assert torch.allclose(crop, torch.full_like(crop, 2.0))
    model.crop_context = 0.5  # now the region reaches into the zero half on the right
    assert model.crop(x, torch.tensor([[0.0625, 0.0625, 0.4375, 0.9375]]))[..., -1].abs().max() < 1.0


def test_crop_pass_trains_on_jittered_true_boxes_and_predicts_from_its_own():
    torch.manual_seed(0)
    model = build_localizer("resnet20", K, "pcr", crop_size=16)
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    gt = torch.tensor([[0.1, 0.2, 0.6, 0.7]]).repeat(4, 1)
    out = model(x, gt)
    assert out["crop_logits"].shape == (4, K)
    losses = localization_loss(out, labels, gt)
    assert set(losses) == {"loss_cls", "loss_l1", "loss_giou", "loss_crop_cls"}
    sum(losses.values()).backward()
    assert model.head.crop_cls.fc.weight.grad.abs().sum() > 0
    # jitter moves and scales the crop box, but by at most crop_jitter of the box
    j = model._jitter(gt)
    wh = gt[:, 2:] - gt[:, :2]
    assert not torch.allclose(j, gt) and ((j - gt).abs() <= 0.1 * wh.repeat(1, 2) * 1.5 + 1e-6).all()
    # in eval the crop comes from the predicted box; the class scores are the two classifiers' mean
    model.eval()
    with torch.no_grad():
        out = model(x)
        pred = model.predict(x, k=K)
    mean = (out["logits"].softmax(-1) + out["crop_logits"].softmax(-1)) / 2
    assert torch.allclose(pred["scores"], mean.sort(-1, descending=True).values, atol=1e-5)


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


def test_box_scale_runs_the_first_pass_on_a_smaller_image():
    """box_scale=0.5: the backbone's first pass sees a half-size image, the crop pass the full one."""
    model = build_localizer("resnet18", K, "scr", crop_size=16, box_scale=0.5, input_size=64).eval()
    assert model.head.grid == 1  # the automatic grid follows the 32 px first pass (stride 32)
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    crops = []
    model.crop_backbone.register_forward_pre_hook(lambda m, a: crops.append(tuple(a[0].shape[-2:])))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert seen == [(32, 32)] and crops == [(16, 16)] and out["boxes"].shape == (2, 4)
    with pytest.raises(ValueError, match="crop pass"):
        build_localizer("resnet18", K, "scr", box_scale=0.5)
    with pytest.raises(ValueError, match="box_scale"):
        build_localizer("resnet18", K, "scr", crop_size=16, box_scale=1.5)


def test_first_cls_weight_mixes_the_two_classifiers_and_round_trips(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    model = build_localizer("resnet20", K, "scr", crop_size=16, first_cls_weight=0.0).eval()
    with torch.no_grad():
        out, pred = model(x), model.predict(x, k=K)
    crop = out["crop_logits"].softmax(-1).sort(-1, descending=True).values
    assert torch.allclose(pred["scores"], crop, atol=1e-5)  # w = 0: the crop classifier alone
    model.first_cls_weight = 0.25
    mixed = 0.25 * out["logits"].softmax(-1) + 0.75 * out["crop_logits"].softmax(-1)
    assert torch.allclose(model.class_log_probs(out).exp(), mixed, atol=1e-5)
    model.first_cls_weight = 0.0
    path = tmp_path / "loc.pt"
    torch.save({"model": model.state_dict(), "localizer_kwargs": model.build_kwargs}, path)
    assert load_localizer(path)[0].first_cls_weight == 0.0
    with pytest.raises(ValueError, match="first_cls_weight"):
        build_localizer("resnet20", K, "scr", crop_size=16, first_cls_weight=1.5)


def test_label_smoothing_softens_both_cross_entropies():
    logits = torch.tensor([[8.0, 0.0, 0.0, 0.0]])
    out = {"logits": logits, "crop_logits": logits.clone(), "boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]])}
    labels, boxes = torch.tensor([0]), torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    hard = localization_loss(out, labels, boxes)
    soft = localization_loss(out, labels, boxes, label_smoothing=0.1)
    for k in ("loss_cls", "loss_crop_cls"):  # a confident right answer costs more once the targets are smoothed
        expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
        assert soft[k] > hard[k] and torch.isclose(soft[k], expected)
    assert soft["loss_l1"] == hard["loss_l1"] and soft["loss_giou"] == hard["loss_giou"]
