"""studies.analysis: gradient norms per conv, the Fig. 6 training loop, the two plots."""
import math

import pytest
import torch
from PIL import Image
from torch import nn

from res_backbone import BasicBlock, ResNet, create_model
from studies.analysis import (
    TrainCurves, build_twin, classification_error, conv_layers, first_last_ratio, layer_grad_norms,
    load_fashion_mnist_normalized, normalize_images, plot_degradation, plot_grad_flow, train_recording_errors,
    twin_name,
)
from res_backbone.data.fashion_mnist import FashionMNISTNotFoundError, write_fake_fashion_mnist


# tiny models gain nothing from threads; on a shared 2-core machine one thread is faster
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    folder = write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=96, n_test=40)
    return load_fashion_mnist_normalized("train", folder), load_fashion_mnist_normalized("test", folder)


def resnet8() -> ResNet:
    """A 6n+2 net with n=1 and narrow stages (not registered): fast enough for training-loop tests."""
    return ResNet(BasicBlock, (1, 1, 1), widths=(4, 8, 8), stem_type="cifar", shortcut="A", in_chans=1, num_classes=10)


class Reordered(nn.Module):
    """Registers ``b`` before ``a`` but runs ``a`` first: forward order is not registration order."""

    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


def test_conv_layers_follow_the_forward_pass_not_registration():
    model = Reordered()
    assert [n for n, _ in conv_layers(model, torch.randn(2, 1, 8, 8))] == ["a", "b"]
    norms = layer_grad_norms(model, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert [n for n, _ in norms] == ["a", "b"]
    assert all(v > 0 for _, v in norms)


def test_layer_grad_norms_cover_every_conv_in_order_and_leave_the_model_alone(fake):
    (x, y), _ = fake
    model = create_model("resnet20", in_chans=1, num_classes=10).eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    norms = layer_grad_norms(model, x[:16], y[:16])
    assert [n for n, _ in norms] == convs and len(convs) == 19  # 6n+1 convs of a 6n+2 net
    assert norms[0][0] == "conv1" and norms[-1][0] == "layer3.2.conv2"
    assert all(math.isfinite(v) and v > 0 for _, v in norms)
    # one backward pass by hand gives the same numbers
    model.train()
    torch.nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
    assert norms[5][1] == pytest.approx(float(dict(model.named_modules())[norms[5][0]].weight.grad.norm()), rel=1e-4)
    model.zero_grad(set_to_none=True)
    # the measurement itself touches nothing: no .grad, same running statistics, same mode
    model.eval()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    layer_grad_norms(model, x[:16], y[:16])
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def test_plain56_gradients_grow_towards_the_input_residual56_stay_level(fake):
    """At initialisation with BatchNorm, the plain net's gradient norms do not vanish towards the input:
    they grow by orders of magnitude from the last conv to the first, while the residual twin's stay
    within ~15x. The assertion leaves a wide margin."""
    (x, y), _ = fake
    ratios = {}
    for residual in (False, True):
        torch.manual_seed(0)
        # 16 images at half resolution keep it fast; the ratio is a property of depth (seeds 0-3 measured
        # 2,400-3,500x plain and 8-12x residual at this size, 2,300-6,500x and 7-15x at 28x28)
        ratios[residual] = first_last_ratio(layer_grad_norms(build_twin(56, residual), x[:16, :, ::2, ::2], y[:16]))
    assert ratios[False] > 300
    assert ratios[True] < 50
    assert ratios[False] > 30 * ratios[True]


def test_first_last_ratio():
    assert first_last_ratio([("a", 4.0), ("b", 1.0), ("c", 2.0)]) == 2.0
    with pytest.raises(ValueError, match="two layers"):
        first_last_ratio([("a", 1.0)])


def test_normalize_images():
    img = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    out = normalize_images(img, mean=(0.5,), std=(0.25,))
    assert out.shape == (2, 1, 28, 28) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, 2.0))
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(img.float())
    with pytest.raises(ValueError, match="per channel"):
        normalize_images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_missing_data_names_the_install(tmp_path):
    with pytest.raises(FashionMNISTNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist_normalized("train", tmp_path)


def test_build_twin():
    assert twin_name(56, True) == "resnet56" and twin_name(20, False) == "plain20"
    plain, res = build_twin(20, False), build_twin(20, True)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in res.parameters())
    assert not any(b.residual for b in plain.layer2) and all(b.residual for b in res.layer2)
    with pytest.raises(ValueError, match="resnet21.*20"):
        build_twin(21, True)


def test_classification_error_matches_a_count(fake):
    _, (x, y) = fake
    model = resnet8()
    with torch.no_grad():
        expected = 100.0 * float((model.eval()(x).argmax(1) != y).float().mean())
    model.train()
    assert classification_error(model, x, y, batch_size=7) == pytest.approx(expected)
    assert model.training


def test_train_recording_errors_records_fig6_curves(fake):
    (x, y), (xt, yt) = fake
    torch.manual_seed(0)
    model = resnet8()
    before = model.conv1.weight.detach().clone()
    curves = train_recording_errors(model, x, y, iters=7, batch_size=16, lr=0.1, milestones=(0.5,), log_every=3,
                                    eval_every=3, test_images=xt, test_labels=yt, seed=0)
    assert curves.iters == [3, 6, 7]
    assert curves.test_iters == [3, 6, 7]
    assert curves.lr == pytest.approx([0.1, 0.01, 0.01])  # x0.1 from iteration 3.5 on (0-based 4)
    assert all(0 <= e <= 100 for e in curves.train_error + curves.test_error)
    assert curves.final_train_error == curves.train_error[-1] and curves.final_test_error == curves.test_error[-1]
    assert curves.seconds > 0
    assert not torch.equal(before, model.conv1.weight)
    assert set(curves.to_dict()) == {"iters", "train_error", "train_loss", "test_iters", "test_error", "lr", "seconds"}
    # the mini-batch order is seeded: the same start gives the same curves
    torch.manual_seed(0)
    again = train_recording_errors(resnet8(), x, y, iters=7, batch_size=16,
                                   lr=0.1, milestones=(0.5,), log_every=3, eval_every=3, test_images=xt,
                                   test_labels=yt, seed=0)
    assert again.train_loss == pytest.approx(curves.train_loss, rel=1e-4)
    with pytest.raises(ValueError, match="iters"):
        train_recording_errors(model, x, y, iters=0)


def _is_png(path, min_size=(400, 200)):
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1]


def test_plots_write_pngs(tmp_path):
    curves = TrainCurves(iters=[10, 20], train_error=[50.0, 30.0], train_loss=[1.0, 0.5], test_iters=[10, 20],
                         test_error=[55.0, 35.0], lr=[0.1, 0.1])
    nets = [{"depth": d, "residual": r, "curves": curves if r else curves.to_dict()} for d in (20, 56) for r in (False, True)]
    assert _is_png(plot_degradation(nets, tmp_path / "sub" / "deg.png", title="t"))
    norms = [("conv1", 1.0), ("layer1.0.conv1", 0.5), ("layer2.0.conv1", 0.2)]
    grad = {"plain": {"init": norms, "after": norms}, "res": {"init": norms, "after": norms}}
    assert _is_png(plot_grad_flow(grad, tmp_path / "gf.png", phase_titles={"init": "at init"}))
