"""timm 1.0's feature API on every registered model: forward_intermediates, prune_intermediate_layers,
and timm's features_only getter (timm's own suite runs the same through tools/run_timm_suite.py)."""
import copy

import pytest
import timm
import torch

import res_backbone as rb

NAMES = rb.list_models()


def _input(model, batch=2):
    side = 32 if model.stem_type == "cifar" else 64
    return torch.randn(batch, model.in_chans, side, side, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {n: rb.create_model(n, num_classes=3, drop_rate=0.5).eval() for n in ("resnet18", "resnet50", "resnet20")}


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_matches_feature_info_and_forward_features(name):
    torch.manual_seed(0)
    model = rb.create_model(name, num_classes=3).eval()
    x = _input(model)
    levels = len(model.feature_info)
    assert levels == (4 if model.stem_type == "cifar" else 5)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        named = model.forward_stages(x)
    assert [f.shape[1] for f in feats] == [f["num_chs"] for f in model.feature_info]
    assert [x.shape[-1] // f.shape[-1] for f in feats] == [f["reduction"] for f in model.feature_info]
    assert list(named) == [f["name"] for f in model.feature_info]
    assert all(torch.equal(a, b) for a, b in zip(feats, named.values()))


def test_indices_forms_stop_early_and_errors(models):
    model = models["resnet18"]
    x = _input(model)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[-1, 1], intermediates_only=True)
        early, taken = model.forward_intermediates(x, indices=[2], stop_early=True)
    assert [t.shape for t in last2] == [f.shape for f in feats[3:]]
    assert torch.equal(picked[0], feats[4]) and torch.equal(picked[1], feats[1])  # the order asked for
    assert torch.equal(early, feats[2]) and torch.equal(taken[0], feats[2])  # stopped after res3
    assert torch.equal(final, feats[-1])
    for bad in (0, 6, [5], [-6], []):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20"])
def test_prune_keeps_features_and_leaves_no_unused_parameter(models, name):
    """As timm's FeatureGetterNet prunes: the kept taps are unchanged, nothing after them holds
    parameters (DDP), the head is gone and ``num_features`` is the last tap's width."""
    model = models[name]
    x = _input(model)
    with torch.no_grad():
        _, ref = model.forward_intermediates(x)
    for indices in ([0], [1, 2], [-1]):
        pruned = copy.deepcopy(model).train()
        take = pruned.prune_intermediate_layers(indices)
        deepest = max(take)
        feats = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
        sum(f.sum() for f in feats).backward()
        assert not [n for n, p in pruned.named_parameters() if p.grad is None]
        assert pruned.num_classes == 0 and pruned.num_features == model.feature_info[deepest]["num_chs"]
        pruned = copy.deepcopy(model)  # eval, BatchNorm statistics untouched by the training pass above
        assert pruned.prune_intermediate_layers(indices) == take
        with torch.no_grad():
            again = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
            assert all(torch.equal(a, ref[i]) for a, i in zip(again, take))
            assert torch.equal(pruned(x), ref[deepest]) and torch.equal(pruned(x), pruned(x))
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    head = copy.deepcopy(model)
    head.prune_intermediate_layers(len(model.feature_info), prune_head=False)  # all taps, keep the head
    assert head.num_classes == 3


def test_grad_checkpointing_gives_the_same_intermediates(models):
    model = copy.deepcopy(models["resnet20"]).train()
    x = _input(model)
    torch.manual_seed(1)
    plain_final, plain = model.forward_intermediates(x)
    model.set_grad_checkpointing()
    ckpt_final, ckpt = model.forward_intermediates(x)
    assert torch.allclose(plain_final, ckpt_final) and all(torch.allclose(a, b) for a, b in zip(plain, ckpt))


def test_backbone_intermediates_and_no_pruning():
    backbone = rb.create_backbone("resnet18", out_features=("res3",)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, feats = backbone.forward_intermediates(x)
        assert torch.equal(final, backbone(x)["res3"]) and len(feats) == 3  # stem, res2, res3: all it builds
    with pytest.raises(NotImplementedError, match="out_features"):
        backbone.prune_intermediate_layers([1])


@pytest.mark.parametrize("name, out_indices", [("resnet50", (1, 3, 4)), ("resnet20", (0, 1, 2, 3)),
                                               ("plain18", (2,))])
def test_timm_feature_getter_equals_create_backbone(name, out_indices):
    torch.manual_seed(0)
    getter = timm.create_model(f"rb_{name}", features_only=True, feature_cls="getter", out_indices=out_indices).eval()
    assert type(getter).__name__ == "FeatureGetterNet"
    names = [rb.resnet.LEVEL_NAMES[i] for i in out_indices]
    backbone = rb.create_backbone(name, out_features=names).eval()
    backbone.load_state_dict({k: v for k, v in getter.model.state_dict().items() if k in backbone.state_dict()})
    # pruning removed the unused stages and the head, as the backbone never built them
    assert sorted(getter.model.state_dict()) == sorted(backbone.state_dict())
    assert getter.feature_info.channels() == [f["num_chs"] for f in backbone.feature_info]
    assert getter.feature_info.reduction() == [f["reduction"] for f in backbone.feature_info]
    x = _input(backbone, batch=1)
    with torch.no_grad():
        got, want = getter(x), backbone(x)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want.values()))
