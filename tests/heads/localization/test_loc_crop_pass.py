"""The crop pass: the region it reads, jittered training boxes, box_scale, the two classifiers' mix."""
import pytest
import torch

from heads import build_localizer, load_localizer, localization_loss

K = 5


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


def test_crop_pass_functions_keep_format_and_tie_only_the_convolutions():
    from heads.localization.crop_pass import crop_regions, jitter_boxes, tied_copy

    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.6], [0.2, 0.0, 1.0, 0.5]])
    crops = crop_regions(x, boxes, 4, 0.1)
    assert crops.shape == (2, 3, 4, 4) and crops.is_contiguous(memory_format=torch.channels_last)
    assert jitter_boxes(boxes, 0.0) is boxes
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    twin = tied_copy(net)
    assert twin[0].weight is net[0].weight and twin[1].weight is not net[1].weight
    assert twin[1].running_mean is not net[1].running_mean
