"""Freezing, BatchNorm policy and normalisation choices."""
import warnings

import pytest
import torch
from torch import nn

import res_backbone as rb
from res_backbone.layers import FrozenBatchNorm2d


def _bns(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("k,frozen_prefixes", [
    (1, ("conv1", "bn1")),
    (2, ("conv1", "bn1", "layer1")),
    (5, ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")),
])
def test_frozen_stages(k, frozen_prefixes, tmp_path):
    ckpt = tmp_path / "w.pth"
    torch.save(rb.create_model("resnet18").state_dict(), ckpt)
    m = rb.create_backbone("resnet18", frozen_stages=k, pretrained=ckpt)
    for name, p in m.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen_prefixes)), name
    m.train()
    frozen_mods = [m.bn1] + [getattr(m, f"layer{i}") for i in range(1, k)]
    for mod in frozen_mods:
        for bn in _bns(mod) if isinstance(mod, nn.Sequential) else [mod]:
            assert not bn.training
    if k < 5:
        assert all(bn.training for bn in _bns(m.layer4))
    # frozen BN statistics do not move during a training forward
    before = m.bn1.running_mean.clone()
    m(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, m.bn1.running_mean)


def test_unfreeze():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = rb.create_model("resnet18", frozen_stages=3)
    m.unfreeze().train()
    assert all(p.requires_grad for p in m.parameters())
    assert all(bn.training for bn in _bns(m))


def test_norm_eval_keeps_statistics():
    with pytest.warns(UserWarning, match="norm_eval=True without pretrained weights"):
        m = rb.create_backbone("resnet18", norm_eval=True)
    m.train()
    assert all(not bn.training for bn in _bns(m))
    assert all(p.requires_grad for p in m.parameters())
    stats = [bn.running_mean.clone() for bn in _bns(m)]
    m(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(stats, _bns(m)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="frozen_bn"), "norm='frozen_bn'"),
    (dict(frozen_stages=2), "frozen_stages=2"),
])
def test_warns_when_bn_frozen_on_random_weights(kwargs, match):
    with pytest.warns(UserWarning, match=match):
        rb.create_backbone("resnet18", **kwargs)


def test_no_warning_with_pretrained(tmp_path):
    ckpt = tmp_path / "w.pth"
    torch.save(rb.create_model("resnet18").state_dict(), ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rb.create_backbone("resnet18", norm="frozen_bn", frozen_stages=2, pretrained=ckpt)


def test_frozen_bn_loads_batchnorm_checkpoints_and_matches_eval(tmp_path):
    src = rb.create_model("resnet50").eval()
    for bn in _bns(src):  # non-trivial statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    ckpt = tmp_path / "w.pth"
    torch.save(src.state_dict(), ckpt)
    m = rb.create_model("resnet50", norm="frozen_bn", pretrained=ckpt)
    assert not _bns(m) and any(isinstance(x, FrozenBatchNorm2d) for x in m.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.train()(x), src(x), rtol=1e-3, atol=1e-4)


def test_group_norm_and_sync_bn_build():
    gn = rb.create_backbone("resnet50", norm="gn")
    assert any(isinstance(x, nn.GroupNorm) for x in gn.modules()) and not _bns(gn)
    out = gn(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out["res5"]).all()
    sbn = rb.create_backbone("resnet18", norm="sync_bn").eval()
    assert any(isinstance(x, nn.SyncBatchNorm) for x in sbn.modules())
    assert sbn(torch.randn(1, 3, 64, 64))["res5"].shape == (1, 512, 2, 2)


def _random_frozen_pair():
    from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBN

    ours, ref = FrozenBatchNorm2d(6), TVFrozenBN(6)
    for bn in (ours, ref):
        g = torch.Generator().manual_seed(1)
        bn.weight.uniform_(0.5, 2, generator=g)
        bn.bias.normal_(generator=g)
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2, generator=g)
    return ours, ref


def test_frozen_bn_equals_torchvision_bitwise_and_passes_gradients():
    ours, ref = _random_frozen_pair()
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    out = ours(x)
    assert torch.equal(out, ref(x))
    out.sum().backward()
    expected = (ours.weight * (ours.running_var + ours.eps).rsqrt()).reshape(1, -1, 1, 1).expand_as(x)
    assert torch.equal(x.grad, expected)


def test_frozen_bn_cached_affine_follows_its_buffers_and_modes():
    ours, ref = _random_frozen_pair()
    x = torch.randn(2, 6, 5, 5)
    with torch.inference_mode():
        assert torch.equal(ours(x), ref(x))  # the cache is filled with inference tensors here
    y = torch.randn(2, 6, 5, 5, requires_grad=True)
    ours(y).sum().backward()  # ... and not reused where autograd must save it
    for bn in (ours, ref):
        bn.running_var.fill_(4.0)  # in place: the version counter moves
    assert torch.equal(ours(x), ref(x))
    ours.load_state_dict({k: v * 2 for k, v in ref.state_dict().items()})
    ref.load_state_dict(ours.state_dict())
    assert torch.equal(ours(x), ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x.bfloat16()).dtype == torch.bfloat16  # keeps the input's dtype under autocast
    scripted = torch.jit.script(ours)
    assert torch.equal(scripted(x), ref(x))
