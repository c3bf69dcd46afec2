"""build_detector: FPN and C4 on resnet18 train and infer on tiny inputs; pretrained loading; fast path."""
import pytest
import torch

import res_backbone as rb
from heads import build_detector
from heads.detection import LOSS_KEYS
from res_backbone.inference import prepare_for_inference

SMALL = dict(  # shrink the torchvision-sized defaults for tiny CPU tests
    fpn_channels=32, representation_size=64, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
    box_batch_size_per_image=32, box_detections_per_img=20,
)
SIZES = [(96, 128), (80, 100)]


def _batch():
    images = torch.randn(2, 3, 96, 128)
    images[1, :, 80:, :] = 0
    images[1, :, :, 100:] = 0
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 30.0, 90.0, 75.0], [5.0, 5.0, 40.0, 40.0]]), "labels": torch.tensor([2, 3])},
    ]
    return images, targets


def _kw(arch):
    kw = dict(SMALL)
    if arch == "c4":
        kw.pop("fpn_channels")
    return kw


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_train_step_and_eval(arch):
    model = build_detector("resnet18", num_classes=3, arch=arch, **_kw(arch))
    images, targets = _batch()
    losses = model(images, SIZES, targets)
    assert set(losses) == set(LOSS_KEYS)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    for name in ("conv1", "layer1.0.conv1", "layer3.0.conv1"):
        grad = model.backbone.get_submodule(name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.rpn.head.conv.weight.grad.abs().sum() > 0
    assert model.roi_heads.predictor.bbox_pred.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        dets = model(images, SIZES)
    assert len(dets) == 2
    for det, (h, w) in zip(dets, SIZES):
        assert set(det) == {"boxes", "scores", "labels"}
        m = det["boxes"].shape[0]
        assert det["boxes"].shape == (m, 4) and det["scores"].shape == (m,) and det["labels"].shape == (m,)
        assert 0 < m <= SMALL["box_detections_per_img"]
        assert det["labels"].dtype == torch.long and det["labels"].min() >= 1 and det["labels"].max() <= 3
        b = det["boxes"]
        assert (b >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_no_proposals_gives_empty_detections(arch, monkeypatch):
    # A diverged or untrained RPN can keep no box at all (every score non-finite); evaluation must go on.
    model = build_detector("resnet18", num_classes=3, arch=arch, **_kw(arch)).eval()
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    monkeypatch.setattr(model.rpn, "forward", lambda features, sizes, targets=None: (empty, {}))
    with torch.no_grad():
        dets = model(_batch()[0], SIZES)
    assert len(dets) == 2
    for det in dets:
        assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,) and det["labels"].shape == (0,)


def test_empty_targets_and_giou():
    model = build_detector("resnet18", num_classes=2, box_loss="giou", **SMALL)
    images, targets = _batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model(images, SIZES, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_train_mode_needs_targets():
    model = build_detector("resnet18", num_classes=2, **SMALL)
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 3, 64, 64), [(64, 64)])


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_pretrained_path_loads_backbone_and_res5(tmp_path, arch):
    src = rb.create_model("resnet18")
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    model = build_detector("resnet18", num_classes=2, arch=arch, pretrained=str(path), **_kw(arch))
    assert torch.equal(model.backbone.conv1.weight, src.conv1.weight)
    assert torch.equal(model.backbone.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
    # pretrained policy: frozen BN, stem + res2 frozen
    assert isinstance(model.backbone.bn1, rb.FrozenBatchNorm2d)
    assert not model.backbone.conv1.weight.requires_grad and not model.backbone.layer1[0].conv1.weight.requires_grad
    assert model.backbone.layer2[0].conv1.weight.requires_grad
    if arch == "c4":
        assert not hasattr(model.backbone, "layer4")
        res5 = model.roi_heads.box_head.res5
        assert torch.equal(res5[0].conv1.weight, src.layer4[0].conv1.weight)
        assert torch.equal(res5[1].bn2.running_var, src.layer4[1].bn2.running_var)
        assert res5[0].conv1.weight.requires_grad


def test_from_scratch_defaults_to_trainable_bn():
    model = build_detector("resnet18", num_classes=2, **SMALL)
    assert isinstance(model.backbone.bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_prepare_for_inference_same_detections(arch):
    model = build_detector("resnet18", num_classes=3, arch=arch, **_kw(arch)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        model.rpn.head.objectness.weight.normal_(0, 0.1)
        model.roi_heads.predictor.cls_score.weight.normal_(0, 0.2)
    images, _ = _batch()
    fast = prepare_for_inference(model)
    with torch.inference_mode():
        ref, out = model(images, SIZES), fast(images, SIZES)
    for r, o in zip(ref, out):
        assert torch.equal(r["labels"], o["labels"])
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=0, atol=1e-2)
        torch.testing.assert_close(o["scores"], r["scores"], rtol=0, atol=1e-4)


def test_size_tensor_and_selection_constants_cached_across_modes():
    """The per-size tensors a call needs are built once (a host-to-device copy is a GPU sync) and
    work whether the first call ran in inference mode or not."""
    torch.manual_seed(0)
    model = build_detector("resnet18", num_classes=2, **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        first = model(x, [(64, 60)])
    sizes = model._sizes_tensor([(64, 60)], x.device)
    assert not sizes.is_inference() and sizes.tolist() == [[64, 60]]
    assert model._sizes_tensor([(64, 60)], x.device) is sizes
    assert model._sizes_tensor([(60, 64)], x.device).tolist() == [[60, 64]]
    assert len(model.rpn._constants) == 1
    with torch.no_grad():
        again = model(x, [(64, 60)])
    assert torch.equal(first[0]["boxes"], again[0]["boxes"])
    model.train()
    losses = model(torch.randn(1, 3, 64, 64), [(64, 60)], [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1])}])
    sum(losses.values()).backward()  # training after an inference-mode call, on the same caches
    assert all(torch.isfinite(v) for v in losses.values())
