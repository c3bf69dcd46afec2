"""res_backbone.transfer: grey -> RGB weights, normalisation, BN policies, the backbone freeze window, lr multiplier."""
import warnings

import pytest
import torch
from torch import nn

import res_backbone as rb
from res_backbone import transfer
from res_backbone.engine.optim import build_optimizer
from res_backbone.layers import FrozenBatchNorm2d

pytestmark = pytest.mark.usefixtures("one_thread")

GREY_MEAN, GREY_STD = 0.286, 0.353


@pytest.fixture(scope="module")
def grey_ckpt(tmp_path_factory):
    """A train_cls.py-style checkpoint of a grey resnet18 with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = rb.create_model("resnet18", num_classes=10, in_chans=1)
    model.train()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        for _ in range(3):  # move the running statistics away from 0/1
            model(torch.rand(8, 1, 32, 32) * 2 - 0.5)
    torch.set_num_threads(n)
    path = tmp_path_factory.mktemp("cls") / "checkpoint_best.pt"
    torch.save({"model": model.state_dict(), "model_name": "resnet18",
                "model_kwargs": {"num_classes": 10, "in_chans": 1, "drop_rate": 0.0},
                "pretrained_cfg": {"mean": [GREY_MEAN], "std": [GREY_STD], "input_size": [1, 28, 28]},
                "task": "classification"}, path)
    return path, model.eval()


def _bns(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_grey_weights_fed_rgb_give_the_grey_response(grey_ckpt):
    path, grey = grey_ckpt
    rgb = rb.create_backbone("resnet18", pretrained=path, in_chans=3).eval()
    info = transfer.configure_backbone(rgb, bn_policy="trainable")
    # first conv: w / 3 on each colour channel
    w = grey.conv1.weight
    assert torch.allclose(rgb.conv1.weight, w.repeat(1, 3, 1, 1) / 3)
    assert info["mean"] == [GREY_MEAN] * 3 and info["std"] == [GREY_STD] * 3
    assert info["channels"].startswith("1 -> 3") and info["weights"] == str(path)
    assert rgb.pretrained_cfg["mean"] == [GREY_MEAN] * 3
    # a grey picture, r = g = b, normalised with the repeated statistics: the grey net's features
    g = torch.rand(2, 1, 40, 40)
    mean, std = torch.tensor(info["mean"]).view(1, 3, 1, 1), torch.tensor(info["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = rgb((g.repeat(1, 3, 1, 1) - mean) / std)["res5"]
        ref = grey.forward_stages((g - GREY_MEAN) / GREY_STD, ("res5",))["res5"]
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_input_stats():
    assert transfer.input_stats({"mean": [0.5], "std": [0.2]}, 3) == ((0.5,) * 3, (0.2,) * 3)
    (m,), (s,) = transfer.input_stats({"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.3, 0.6]}, 1)
    assert (m, s) == pytest.approx((0.2, 0.4))
    assert transfer.input_stats(None, 3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="different lengths"):
        transfer.input_stats({"mean": [0.5, 0.5], "std": [0.2]}, 3)
    with pytest.raises(ValueError, match="cannot map 2-channel"):
        transfer.input_stats({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, 3)


@pytest.mark.parametrize("policy,norm,pretrained,batch,expected", [
    (None, None, False, 4, ("trainable", "bn", False)),
    (None, None, True, 4, ("frozen", "frozen_bn", False)),      # small batches: stored statistics
    (None, None, True, 64, ("trainable", "bn", False)),
    ("norm_eval", None, True, 4, ("norm_eval", "bn", True)),
    ("frozen", "frozen_bn", False, 4, ("frozen", "frozen_bn", False)),
    ("trainable", "sync_bn", True, 4, ("trainable", "sync_bn", False)),
    (None, "frozen_bn", False, 64, ("frozen", "frozen_bn", False)),  # --norm alone keeps its meaning
    (None, "gn", True, 4, ("gn", "gn", False)),
])
def test_resolve_bn_policy(policy, norm, pretrained, batch, expected):
    assert transfer.resolve_bn_policy(policy, norm, pretrained=pretrained, batch_size=batch) == expected


def test_resolve_bn_policy_rejects_contradictions():
    with pytest.raises(ValueError, match="--bn-policy frozen needs --norm frozen_bn"):
        transfer.resolve_bn_policy("frozen", "bn", pretrained=True, batch_size=4)
    with pytest.raises(ValueError, match="GroupNorm"):
        transfer.resolve_bn_policy("norm_eval", "gn", pretrained=True, batch_size=4)
    with pytest.raises(ValueError, match="bn_policy must be one of frozen, norm_eval, trainable"):
        transfer.resolve_bn_policy("fixed", None, pretrained=True, batch_size=4)


def _step(backbone, head=None, lr=0.1):
    """One SGD step on a training forward; returns the optimiser."""
    params = [p for p in backbone.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    opt = torch.optim.SGD(params, lr=lr)
    out = backbone(torch.randn(4, 3, 32, 32))
    loss = sum(v.float().pow(2).mean() for v in out.values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return opt


@pytest.mark.parametrize("policy", transfer.BN_POLICIES)
def test_bn_policies_do_what_they_say(policy, grey_ckpt):
    path, _ = grey_ckpt
    kw = transfer.bn_policy_kwargs(policy)
    bb = rb.create_backbone("resnet18", pretrained=path, norm=kw["norm"])
    transfer.configure_backbone(bb, bn_policy=policy, norm_eval=kw["norm_eval"])
    bb.train()
    before = transfer_snapshot(bb)
    _step(bb)
    after = transfer_snapshot(bb)
    stats_moved = not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])
    affine_moved = not torch.equal(before["layer2.0.bn1.weight"], after["layer2.0.bn1.weight"])
    conv_moved = not torch.equal(before["layer2.0.conv1.weight"], after["layer2.0.conv1.weight"])
    assert conv_moved
    if policy == "frozen":
        assert isinstance(bb.layer2[0].bn1, FrozenBatchNorm2d) and not _bns(bb)
        assert not stats_moved and not affine_moved
    elif policy == "norm_eval":
        assert bb.norm_eval and all(not m.training for m in _bns(bb))
        assert not stats_moved and affine_moved
    else:
        assert stats_moved and affine_moved


def transfer_snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Detector(nn.Module):
    """A backbone with an FPN (new layers inside ``backbone``) and a head, as the detectors are."""

    def __init__(self, pretrained):
        super().__init__()
        self.backbone = rb.create_backbone("resnet18", pretrained=pretrained, fpn=True, fpn_channels=16)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return sum(self.head(f).float().pow(2).mean() for f in self.backbone(x).values())


def test_backbone_freeze_window_then_release(grey_ckpt):
    path, _ = grey_ckpt
    model = _Detector(path).train()
    opt = build_optimizer(model, name="sgd", lr=0.05, weight_decay=1e-3)
    freeze = transfer.BackboneFreeze(model.backbone, iters=2)
    assert freeze.update(0) and freeze.frozen and not freeze.update(1)

    def step():
        model.train()  # what every epoch start does: must not unfreeze the BN statistics
        loss = model(torch.randn(4, 3, 32, 32))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    start = transfer_snapshot(model)
    for done in (1, 2):
        step()
        assert freeze.update(done) == (done == 2)
    frozen_phase = transfer_snapshot(model)
    body = [k for k in start if k.startswith("backbone.") and not k.startswith("backbone.fpn.")]
    assert body and all(torch.equal(start[k], frozen_phase[k]) for k in body)  # weights AND running stats
    fpn = [k for k in start if k.startswith("backbone.fpn.") and k.endswith("weight")]
    assert any(not torch.equal(start[k], frozen_phase[k]) for k in fpn)  # the new FPN trains from the start
    assert not freeze.frozen and all(bn.training for bn in _bns(model.backbone))
    step()
    released = transfer_snapshot(model)
    assert not torch.equal(frozen_phase["backbone.layer3.0.conv1.weight"], released["backbone.layer3.0.conv1.weight"])
    assert not torch.equal(frozen_phase["backbone.layer3.0.bn1.running_mean"],
                           released["backbone.layer3.0.bn1.running_mean"])


def test_freeze_respects_frozen_stages_and_resumes_past_the_window(grey_ckpt):
    path, _ = grey_ckpt
    bb = rb.create_backbone("resnet18", pretrained=path, frozen_stages=2)
    freeze = transfer.BackboneFreeze(bb, iters=5)
    assert not freeze.update(7) and not freeze.frozen  # a run resumed after the window never freezes
    freeze.update(0)
    freeze.update(5)
    assert not any(p.requires_grad for p in bb.layer1.parameters())  # frozen_stages stays frozen
    assert all(p.requires_grad for p in bb.layer2.parameters())
    assert not bb.layer1[0].bn1.training and bb.layer2[0].bn1.training
    with pytest.raises(ValueError, match=">= 0"):
        transfer.BackboneFreeze(bb, -1)


def test_backbone_lr_mult_spares_the_new_fpn(grey_ckpt):
    path, _ = grey_ckpt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _Detector(path)
    opt = build_optimizer(model, name="sgd", lr=0.02, backbone_lr_mult=0.1)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = 0.002 if name.startswith("backbone.") and not name.startswith("backbone.fpn.") else 0.02
        assert lr_of[id(p)] == pytest.approx(expected), name
