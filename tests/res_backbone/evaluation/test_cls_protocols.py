"""The paper's classification testing protocols, each against a direct computation."""
import copy

import pytest
import torch

from res_backbone import create_model
from res_backbone.evaluation.classification import (
    center_crop, collect_protocol_probs, default_protocol_sizes, dense_logits, ensemble_scores, errors_from_probs,
    evaluate_protocols, fully_conv_scores, make_source, markdown_table, pad_to, resize_shorter, ten_crop_scores,
    ten_crop_views, topk_errors,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("resnet20", in_chans=1, num_classes=10).eval()
    with torch.no_grad():  # spread the logits so softmax is far from uniform
        m.fc.weight.mul_(20)
    m.pretrained_cfg = dict(m.pretrained_cfg, input_size=(1, 8, 8))  # small defaults keep tests fast
    return m


def test_topk_errors_on_hand_made_scores():
    scores = torch.tensor([
        [0.9, 0.05, 0.03, 0.02],   # label 0: top-1 hit
        [0.1, 0.2, 0.6, 0.1],      # label 1: rank 2
        [0.4, 0.3, 0.2, 0.1],      # label 3: rank 4
        [0.2, 0.05, 0.1, 0.65],    # label 2: rank 3
    ])
    labels = torch.tensor([0, 1, 3, 2])
    errs = topk_errors(scores, labels, ks=(1, 2, 3))
    assert errs == pytest.approx({"top1_err": 75.0, "top2_err": 50.0, "top3_err": 25.0})
    # k above the class count is capped at K: every label is among all 4 classes
    assert topk_errors(scores, labels)["top5_err"] == 0.0
    with pytest.raises(ValueError, match="0..3"):
        topk_errors(scores, torch.tensor([0, 1, 4, 2]))


def test_default_sizes_scale_the_paper():
    assert default_protocol_sizes(224) == {"crop": 224, "resize": 256, "scales": [224, 256, 384, 480, 640]}
    assert default_protocol_sizes(28) == {"crop": 28, "resize": 32, "scales": [28, 32, 48, 60, 80]}


def test_ten_crop_views_are_the_corners_centre_and_mirrors():
    img = torch.arange(2 * 1 * 6 * 7, dtype=torch.float32).view(2, 1, 6, 7)
    views = ten_crop_views(img, 4)
    assert views.shape == (20, 1, 4, 4)
    expected = [img[..., 0:4, 0:4], img[..., 0:4, 3:7], img[..., 2:6, 0:4], img[..., 2:6, 3:7], img[..., 1:5, 1:5]]
    expected += [v.flip(-1) for v in expected]
    for v, e in enumerate(expected):
        torch.testing.assert_close(views[2 * v: 2 * v + 2], e)
    # the mirror of the top-left crop is the top-right crop of the mirrored image
    torch.testing.assert_close(views[10:12], ten_crop_views(img.flip(-1), 4)[2:4])


def test_crop_larger_than_image_resizes_first():
    img = torch.rand(1, 1, 10, 20)
    views = ten_crop_views(img, 16)
    assert views.shape == (10, 1, 16, 16)
    up = resize_shorter(img, 16)
    assert up.shape == (1, 1, 16, 32)
    torch.testing.assert_close(views[4:5], up[..., :, 8:24])
    assert center_crop(img, 16).shape == (1, 1, 16, 16)


def test_sources_pad_with_fill_or_resize_keeping_aspect():
    img = torch.ones(1, 2, 4, 6)
    padded = pad_to(img, 8, fill=[-1.0, -2.0])
    assert padded.shape == (1, 2, 8, 8)
    torch.testing.assert_close(padded[:, :, 2:6, 1:7], img)
    assert padded[0, 0, 0, 0] == -1 and padded[0, 1, 7, 7] == -2 and padded[0, 0, 2, 0] == -1
    assert make_source(img, 8, "resize").shape == (1, 2, 8, 12)
    with pytest.raises(ValueError, match="'resize' or 'pad'"):
        make_source(img, 8, "crop")
    # a padded 28 image's centre 28-crop is the image itself
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(center_crop(make_source(x, 32, "pad"), 28), x)


def test_ten_crop_scores_average_the_views_softmax(model):
    x = torch.randn(3, 1, 14, 14)
    got = ten_crop_scores(model, x, 12)
    with torch.no_grad():
        direct = torch.stack([model(v).softmax(1) for v in ten_crop_views(x, 12).split(3)]).mean(0)
    torch.testing.assert_close(got, direct)
    torch.testing.assert_close(got.sum(1), torch.ones(3))


def test_fully_conv_single_scale_against_direct_computations(model):
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        pooled = model(x).softmax(1)
        feats = model.forward_features(x)
        h, w = feats.shape[-2:]
        per_pos = torch.stack([model.fc(feats[:, :, i, j]) for i in range(h) for j in range(w)], dim=-1)  # (N,K,HW)
    probs = fully_conv_scores(model, x, [16])
    logits_avg = fully_conv_scores(model, x, [16], average="logits")
    # logits averaged over positions: exactly the global-average-pooled forward (fc is linear)
    torch.testing.assert_close(logits_avg, pooled, atol=1e-5, rtol=1e-4)
    # the protocol's default: softmax at every position, then the mean over positions
    torch.testing.assert_close(probs, per_pos.softmax(1).mean(-1), atol=1e-5, rtol=1e-4)
    # ... which is not the softmax of the mean logits
    assert (probs - pooled).abs().max() > 1e-3
    torch.testing.assert_close(dense_logits(model, x).flatten(2), per_pos, atol=1e-4, rtol=1e-4)
    # the model is not changed by fully-convolutional testing
    assert model.global_pool == "avg"
    torch.testing.assert_close(model(x).softmax(1), pooled)


def test_fully_conv_multi_scale_is_the_mean_over_scales_shorter_side(model):
    x = torch.randn(2, 1, 12, 18)
    multi = fully_conv_scores(model, x, [12, 16])
    singles = [fully_conv_scores(model, x, [s]) for s in (12, 16)]
    torch.testing.assert_close(multi, (singles[0] + singles[1]) / 2)
    # shorter side 16 keeps the 2:3 aspect: the feature map (stride 4) is (4, 6)
    assert dense_logits(model, resize_shorter(x, 16)).shape == (2, 10, 4, 6)


def test_ensemble_scores_mean_and_shape_check():
    a, b = torch.tensor([[0.2, 0.8]]), torch.tensor([[0.6, 0.4]])
    torch.testing.assert_close(ensemble_scores([a, b]), torch.tensor([[0.4, 0.6]]))
    with pytest.raises(ValueError, match="shape"):
        ensemble_scores([a, torch.zeros(1, 3)])


def _loader(n=6, size=8, batch=4):
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(n, 1, size, size, generator=g), torch.arange(n) % 10)
    return torch.utils.data.DataLoader(data, batch_size=batch)


def test_ensemble_of_identical_models_equals_the_model(model):
    twin = copy.deepcopy(model)
    results = evaluate_protocols({"a": model, "b": twin}, _loader(), scales=[8, 12], progress=False)
    assert set(results) == {"a", "b", "ensemble"}
    assert set(results["ensemble"]) == {"center", "10crop", "multiscale"}
    assert results["ensemble"] == results["a"] == results["b"]
    probs, labels, sizes = collect_protocol_probs([model, twin], _loader(), scales=[8, 12], progress=False)
    assert sizes == {"crop": 8, "resize": 9, "scales": [8, 12], "source_mode": "resize",
                     "average": "probs"}
    for p in ("center", "10crop", "multiscale"):
        torch.testing.assert_close(ensemble_scores([probs["model0"][p], probs["model1"][p]]), probs["model0"][p])


def test_driver_matches_the_functions_and_uses_cfg_defaults(model):
    loader = _loader()
    probs, labels, sizes = collect_protocol_probs([model], loader, source_mode="pad", fill=-0.8, progress=False)
    assert {k: sizes[k] for k in ("crop", "resize", "scales")} == default_protocol_sizes(8)
    assert sizes["scales"] == [8, 9, 14, 17, 23] and sizes["resize"] == 9 and sizes["crop"] == 8
    x = torch.cat([b for b, _ in loader])
    torch.testing.assert_close(labels, torch.arange(6) % 10)
    with torch.no_grad():
        torch.testing.assert_close(probs["model0"]["center"], model(x).softmax(1))  # padded centre = the image
    torch.testing.assert_close(probs["model0"]["10crop"], ten_crop_scores(model, pad_to(x, 9, -0.8), 8))
    torch.testing.assert_close(probs["model0"]["multiscale"], fully_conv_scores(model, x, sizes["scales"]))
    results = errors_from_probs(probs, labels)
    assert "ensemble" not in results
    table = markdown_table(results)
    assert table.count("\n") == 4 and "| model0 | 10crop |" in table
    with pytest.raises(ValueError, match="unknown protocol"):
        collect_protocol_probs([model], loader, protocols=("5crop",), progress=False)
