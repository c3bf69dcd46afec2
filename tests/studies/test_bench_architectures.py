"""tools/bench.py architectures: the paper's multiply-adds within 3%, the bottleneck's saving, a training smoke run."""
import json

import pytest
import torch

from studies import bench_architectures as ba


@pytest.fixture(scope="module")
def table():
    return ba.architecture_table(224, timed=False)


def test_macs_match_the_paper_within_3_percent(table):
    rows = {r["name"]: r for r in table["networks"]}
    assert set(rows) == {"vgg19", "plain34", "resnet34"}
    for name, r in rows.items():
        assert abs(r["macs"] / 1e9 / ba.PAPER_GMACS[name] - 1) <= 0.03, (name, r["macs"])
    assert rows["vgg19"]["depth"] == 19 and rows["plain34"]["depth"] == 34 and rows["resnet34"]["depth"] == 34
    # the same layers: the residual net only adds three projection shortcuts
    assert 0 < rows["resnet34"]["params"] - rows["plain34"]["params"] < 0.01 * rows["plain34"]["params"]
    blocks = {b["name"].split(" (")[0]: b for b in table["blocks"]}
    # Fig. 5: the 256-d bottleneck costs what a 64-d basic block costs, 17x less than a 256-d basic block
    assert blocks["basic block, 64-d"]["params"] == 2 * 64 * 64 * 9
    assert blocks["bottleneck, 256-d"]["params"] == 256 * 64 * 2 + 64 * 64 * 9
    assert blocks["basic block, 256-d"]["macs"] > 16 * blocks["bottleneck, 256-d"]["macs"]


def test_train_comparison_smoke(tmp_path, table):
    """Two of the networks (each first step builds oneDNN kernels: seconds); VGG-19's 32 px build is checked below."""
    from res_backbone.data.fashion_mnist import load_fashion_mnist, write_fake_fashion_mnist

    root = write_fake_fashion_mnist(tmp_path / "fm", n_train=64, n_test=20)
    train, test = load_fashion_mnist("train", root), load_fashion_mnist("test", root)
    points = []
    nets = ("plain34", "resnet34")
    result = ba.train_comparison(train, test, minutes=0.002, batch_size=4, evals=2, networks=nets,
                                 on_eval=lambda name, p: points.append(name))
    assert sorted(points) == sorted(2 * list(nets))
    for name, curve in result["curves"].items():
        assert len(curve) == 2 and curve[0]["steps"] >= 1 and curve[1]["minutes"] >= curve[0]["minutes"]
        assert all(0 <= p["test_error"] <= 1 and 0 <= p["train_error"] <= 1 for p in curve)
    ba.plot_comparison(result, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0
    text = ba.markdown(table, result)
    assert "| resnet34 |" in text and "test error" in text
    json.dumps(result)


def test_vgg19_for_32px_input():
    """Five poolings leave 1x1 at 32 px; the small-input head gives the class logits."""
    model = ba.build_network("vgg19", num_classes=10, in_chans=1, vgg_bn=True, small_input=True).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert ba.depth_of(model) == 19


def test_unknown_network_is_named():
    with pytest.raises(ValueError, match="unknown network 'vgg16'"):
        ba.build_network("vgg16")
