"""prepare_for_inference: same outputs as the eval-mode model, no BatchNorm left, torch.compile-able."""
import copy

import pytest
import torch
from torch import nn

import res_backbone as rb
from res_backbone.inference import FusedBlock, FusedConv2d, fold_batchnorm, prepare_for_inference

RTOL = 1e-4


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (fresh ones are 0/1 and would hide folding bugs)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model.eval()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def _assert_close(out, ref):
    if isinstance(ref, dict):
        assert list(out) == list(ref)
        for k in ref:
            assert out[k].shape == ref[k].shape
            assert _rel(out[k], ref[k]) < RTOL, k
    else:
        assert out.shape == ref.shape
        assert _rel(out, ref) < RTOL


BUILDS = {
    "resnet18": lambda: rb.create_model("resnet18"),
    "resnet50": lambda: rb.create_model("resnet50"),
    "resnet50_paper_stride_C": lambda: rb.create_model("resnet50", stride_in_1x1=True, shortcut="C", num_classes=10),
    "resnet18_shortcut_A": lambda: rb.create_model("resnet18", shortcut="A", num_classes=10),
    "plain18": lambda: rb.create_model("plain18", num_classes=10),
    "resnet18_fpn": lambda: rb.create_backbone("resnet18", fpn=True),
    "resnet50_fpn": lambda: rb.create_backbone("resnet50", fpn=True),
    "resnet50_os16_stem": lambda: rb.create_backbone("resnet50", output_stride=16, out_features=("stem", "res4", "res5")),
}


@pytest.mark.parametrize("build", BUILDS.values(), ids=list(BUILDS))
@pytest.mark.parametrize("fuse", [False, True], ids=["default", "fused"])
def test_outputs_equal_unfused(build, fuse):
    torch.manual_seed(0)
    model = _randomise_bn(build())
    fast = prepare_for_inference(model, fuse=fuse)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        out = fast(x.contiguous(memory_format=torch.channels_last))
    _assert_close(out, ref)


def test_nchw_input_works():
    model = _randomise_bn(rb.create_backbone("resnet18", fpn=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        _assert_close(prepare_for_inference(model, fuse=True)(x), model(x))


@pytest.mark.parametrize("kwargs", [dict(), dict(fuse=True), dict(channels_last=False), dict(fold_bn=False)])
def test_options_keep_outputs(kwargs):
    model = _randomise_bn(rb.create_model("resnet18", num_classes=10))
    x = torch.randn(1, 3, 48, 48)
    with torch.inference_mode():
        _assert_close(prepare_for_inference(model, **kwargs)(x), model(x))


def test_no_batchnorm_left_and_fused():
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepare_for_inference(rb.create_model("resnet18")).modules())
    fast = prepare_for_inference(rb.create_backbone("resnet50", fpn=True), fuse=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast.modules())
    assert sum(isinstance(m, FusedBlock) for m in fast.modules()) == 16
    assert isinstance(fast.conv1, FusedConv2d) and fast.conv1.relu
    assert not any(p.requires_grad for p in fast.parameters())


@pytest.mark.filterwarnings("ignore:norm='frozen_bn' without pretrained")
def test_frozen_bn_is_folded():
    fast = prepare_for_inference(rb.create_model("resnet18", norm="frozen_bn"))
    assert not any(isinstance(m, rb.FrozenBatchNorm2d) for m in fast.modules())


def test_groupnorm_left_alone():
    model = rb.create_model("resnet18", norm="gn", num_classes=10).eval()
    fast = prepare_for_inference(model, fuse=True)
    assert not any(isinstance(m, (FusedBlock, FusedConv2d)) for m in fast.modules())
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        _assert_close(fast(x), model(x))


def test_eval_mode_and_input_untouched():
    model = rb.create_model("resnet18", num_classes=10).train()
    before = copy.deepcopy(model.state_dict())
    fast = prepare_for_inference(model)
    assert not fast.training and all(not m.training for m in fast.modules())
    assert model.training
    assert isinstance(model.bn1, nn.BatchNorm2d) and not isinstance(model.conv1, FusedConv2d)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model.conv1.weight.is_contiguous()  # not switched to channels-last


def test_fold_batchnorm_in_place():
    model = _randomise_bn(rb.create_model("resnet18", num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert fold_batchnorm(model) is model
        _assert_close(model(x), ref)
    assert isinstance(model.layer2[0].downsample[1], nn.Identity)


def test_fused_conv_falls_back_with_autograd():
    """Outside inference (gradients needed) the fused conv uses plain, differentiable ops."""
    conv = FusedConv2d(4, 4, 3, padding=1, relu=True)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    res = torch.randn(1, 4, 8, 8)
    out = conv(x, res)
    out.sum().backward()
    assert x.grad is not None
    expected = torch.relu(nn.functional.conv2d(x, conv.weight, conv.bias, padding=1) + res)
    assert torch.allclose(out, expected, atol=1e-6)
    with torch.inference_mode():
        assert _rel(conv(x.detach(), res), expected.detach()) < RTOL


@pytest.mark.parametrize("prepared", [False, True], ids=["model", "prepared"])
def test_torch_compile_traces_without_graph_breaks(prepared):
    """fullgraph=True fails on any graph break; aot_eager keeps it fast (no C++ compilation)."""
    torch._dynamo.reset()
    model = _randomise_bn(rb.create_backbone("resnet18", fpn=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        run = prepare_for_inference(model, fuse=True) if prepared else model
        out = torch.compile(run, backend="aot_eager", fullgraph=True)(x)
    _assert_close(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("prepared", [False, True], ids=["model", "prepared"])
def test_torch_compile_inductor(prepared):
    """The default (Inductor) backend, resnet18 at 64x64; slow on a cold compile cache (~1 min)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _randomise_bn(rb.create_model("resnet18", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        run = prepare_for_inference(model) if prepared else model
        out = torch.compile(run)(x.contiguous(memory_format=torch.channels_last) if prepared else x)
    _assert_close(out, ref)


@pytest.mark.parametrize("fuse", [False, True])
def test_prepare_does_not_draw_from_the_global_rng(fuse):
    """An evaluation mid-training prepares a copy; that must not change the random stream the training
    continues with (resumed runs re-evaluate and must still match uninterrupted ones)."""
    model = rb.create_model("resnet18").eval()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    rb.prepare_for_inference(model, fuse=fuse)
    assert torch.equal(torch.rand(3), expected)
