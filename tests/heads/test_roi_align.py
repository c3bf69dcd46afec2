"""The embedding-bag RoIAlign equals torchvision's kernel, forward and backward; the pooler and the
channels-last box head built on it change no number; the autocast-dtype inference copy neither."""
import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from heads.detection import MultiLevelRoIAlign, TwoFCHead
from heads.detection.roi_align import MAX_ADAPTIVE_GRID, roi_align, roi_align_bag


def _rois(n, extent, batch=2, seed=0):
    """Boxes of many sizes, some reaching outside the image, some degenerate (zero width)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * extent * 1.2 - 0.1 * extent
    wh = torch.rand(n, 2, generator=g) * extent * 0.6
    wh[: n // 10, 0] = 0.0
    b = torch.randint(0, batch, (n, 1), generator=g).float()
    return torch.cat([b, xy, xy + wh], dim=1)


@pytest.mark.parametrize("sampling_ratio", [2, 1, 0])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("scale,size", [(0.25, (24, 30)), (1 / 16, (7, 9))])
def test_bag_equals_torchvision_forward_and_backward(sampling_ratio, aligned, scale, size):
    torch.manual_seed(0)
    feat = torch.randn(2, 8, *size, dtype=torch.float64)
    rois = _rois(60, size[1] / scale).double()
    a = feat.clone().requires_grad_()
    b = feat.clone().requires_grad_()
    ref = tv_roi_align(a, rois, (5, 4), scale, sampling_ratio, aligned)
    out = roi_align_bag(b, rois, (5, 4), scale, sampling_ratio, aligned)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-10)


def test_bag_float32_channels_last_and_empty():
    feat = torch.randn(1, 16, 20, 20)
    rois = _rois(30, 80, batch=1)
    ref = tv_roi_align(feat, rois, (7, 7), 0.25, 2, False)
    out = roi_align_bag(feat.contiguous(memory_format=torch.channels_last), rois, (7, 7), 0.25, 2, False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert roi_align_bag(feat, rois[:0], (7, 7), 0.25, 2).shape == (0, 16, 7, 7)


def test_auto_falls_back_for_large_adaptive_grids():
    feat = torch.randn(1, 4, 64, 64)
    huge = torch.tensor([[0.0, 0.0, 0.0, 63.0, 63.0]])  # 63 / 7 -> 9 samples per bin side
    assert (MAX_ADAPTIVE_GRID + 1) * 7 <= 63
    ref = tv_roi_align(feat, huge, (7, 7), 1.0, 0, False)
    torch.testing.assert_close(roi_align(feat, huge, (7, 7), 1.0, 0), ref)
    torch.testing.assert_close(roi_align(feat, huge, (7, 7), 1.0, 0, impl="bag"), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl"):
        roi_align(feat, huge, (7, 7), impl="cuda")


def _levels():
    torch.manual_seed(1)
    shapes = {"p2": (8, 4), "p3": (8, 8), "p4": (8, 16), "p5": (8, 32)}
    feats = {k: torch.randn(2, 8, 256 // s, 320 // s, dtype=torch.float64) for k, (_, s) in shapes.items()}
    return shapes, feats


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_multilevel_pooler_bag_equals_per_level_torchvision(sampling_ratio):
    shapes, feats = _levels()
    rois = _rois(120, 900, seed=3).double()
    boxes, index = rois[:, 1:], rois[:, 0].long()
    tv_pool = MultiLevelRoIAlign(shapes, 7, sampling_ratio, impl="torchvision")
    bag_pool = MultiLevelRoIAlign(shapes, 7, sampling_ratio, impl="bag")
    assert len(set(tv_pool.level_of(boxes).tolist())) >= 3  # the RoIs really spread over levels
    fa = {k: v.clone().requires_grad_() for k, v in feats.items()}
    fb = {k: v.clone().requires_grad_() for k, v in feats.items()}
    ref, out = tv_pool(fa, boxes, index), bag_pool(fb, boxes, index)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    for k in feats:
        torch.testing.assert_close(fb[k].grad, fa[k].grad, rtol=1e-10, atol=1e-10)
    assert bag_pool(feats, boxes[:0], index[:0]).shape == (0, 8, 7, 7)
    with pytest.raises(ValueError, match="impl"):
        MultiLevelRoIAlign(shapes, impl="fast")


def test_two_fc_head_hwc_input_same_output():
    torch.manual_seed(0)
    head = TwoFCHead(8, 7, 32).double()
    x = torch.randn(10, 7, 7, 8, dtype=torch.float64).permute(0, 3, 1, 2)  # channels-last, as pooled
    ref = head(x)
    head.use_hwc_input()
    head.use_hwc_input()  # idempotent
    torch.testing.assert_close(head(x), ref)
    torch.testing.assert_close(head(x.contiguous()), ref)


def test_inference_copy_for_autocast_gives_bitwise_the_same_detections():
    from heads import build_detector
    from res_backbone.inference import prepare_for_inference

    torch.manual_seed(0)
    model = build_detector("resnet18", num_classes=3, fpn_channels=32, representation_size=64,
                           rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50).eval()
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.weight.normal_(0, 0.5)  # spread the scores: detections to compare
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = prepare_for_inference(model)(x, [(96, 128)])
        cast = model.inference_copy(torch.bfloat16)
        out = cast(x, [(96, 128)])
    assert cast.roi_heads.box_head.fc1.weight.dtype == torch.bfloat16
    assert cast.backbone.conv1.weight.dtype == torch.bfloat16
    assert len(ref[0]["boxes"]) > 0
    for k in ref[0]:
        assert torch.equal(out[0][k], ref[0][k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_level_of_equals_torchvision_level_mapper_under_autocast(dtype):
    """Same level for every RoI as torchvision's LevelMapper, also for bf16 boxes (autocast), whose
    area torchvision computes in float32: in bf16 the first box below has sqrt(area) 112 = 224 / 2
    (level p3) instead of 111.65 (p2)."""
    from torchvision.ops.poolers import initLevelMapper

    shapes, _ = _levels()
    pool = MultiLevelRoIAlign(shapes, 7, 2, impl="torchvision")
    g = torch.Generator().manual_seed(4)
    xy = torch.rand(2000, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + 1 + torch.rand(2000, 2, generator=g) * 500], 1)
    boxes = torch.cat([torch.tensor([[0.0, 114.5, 92.0, 250.0]]), boxes]).to(dtype)
    mapper = initLevelMapper(2, 5, canonical_scale=224, canonical_level=4, eps=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours, ref = pool.level_of(boxes), mapper([boxes])
    assert torch.equal(ours, ref.to(torch.long))
    assert len(set(ours.tolist())) == 4
