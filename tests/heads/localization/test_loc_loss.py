"""localization_loss: its terms, pcr training only the true class's box, label smoothing, a tiny overfit."""
import pytest
import torch

from heads import build_localizer, localization_loss

K = 5


def test_loss_terms_and_pcr_trains_only_the_true_class_box():
    out = {"logits": torch.zeros(2, K, requires_grad=True), "boxes": torch.rand(2, K, 4).sort(-1).values.requires_grad_()}
    labels, boxes = torch.tensor([1, 3]), torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8]])
    losses = localization_loss(out, labels, boxes, cls_weight=1.0, l1_weight=5.0, giou_weight=2.0)
    assert set(losses) == {"loss_cls", "loss_l1", "loss_giou"}
    assert losses["loss_cls"].item() == pytest.approx(torch.log(torch.tensor(float(K))).item(), rel=1e-5)
    sum(losses.values()).backward()
    grad = out["boxes"].grad.abs().sum(-1)
    assert grad[0, 1] > 0 and grad[1, 3] > 0
    assert grad[0].sum() == grad[0, 1] and grad[1].sum() == grad[1, 3]
    perfect = {"logits": torch.tensor([[0.0, 50, 0, 0, 0]]), "boxes": boxes[:1]}
    zero = localization_loss(perfect, labels[:1], boxes[:1])
    assert all(v.item() == pytest.approx(0.0, abs=1e-5) for v in zero.values())
    with pytest.raises(ValueError, match="targets"):
        localization_loss({"logits": out["logits"], "boxes": torch.rand(2, 4)}, labels, boxes[:, :2])


@pytest.mark.parametrize("mode", ["scr", "pcr"])
def test_loss_decreases_on_a_tiny_overfit(mode):
    torch.manual_seed(0)
    model = build_localizer("resnet20", K, mode, hidden=64, box_channels=32)
    x = torch.randn(8, 3, 16, 16)
    labels = torch.arange(8) % K
    boxes = torch.rand(8, 2).mul(0.4)
    boxes = torch.cat([boxes, boxes + 0.3 + torch.rand(8, 2) * 0.3], 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(25):
        loss = sum(localization_loss(model(x), labels, boxes).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first


def test_label_smoothing_softens_both_cross_entropies():
    logits = torch.tensor([[8.0, 0.0, 0.0, 0.0]])
    out = {"logits": logits, "crop_logits": logits.clone(), "boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]])}
    labels, boxes = torch.tensor([0]), torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    hard = localization_loss(out, labels, boxes)
    soft = localization_loss(out, labels, boxes, label_smoothing=0.1)
    for k in ("loss_cls", "loss_crop_cls"):  # a confident right answer costs more once the targets are smoothed
        expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
        assert soft[k] > hard[k] and torch.isclose(soft[k], expected)
    assert soft["loss_l1"] == hard["loss_l1"] and soft["loss_giou"] == hard["loss_giou"]
