"""Classification loops: evaluate on hand-made scores, train_one_epoch's schedule/callbacks/learning,
the non-finite guard, and the resume compatibility check."""
import pytest
import torch
from torch import nn

from res_backbone.data.classification import ClsDatasets
from heads.classification.loop import evaluate, train_one_epoch
from heads.classification.train import ClsTrainConfig, check_resume_compatible
from res_backbone.engine.optim_step import NonFiniteLossError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids waiting on a second one that a busy machine has descheduled."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ScoresAsImages(nn.Module):
    """The 'image' (N, K, 1, 1) is the score vector itself: evaluate sees exactly the given scores."""

    def forward(self, x):
        return x.flatten(1)


def _loader(scores, labels, batch_size=2):
    return torch.utils.data.DataLoader(list(zip(scores[:, :, None, None], labels)), batch_size=batch_size)


def test_evaluate_on_hand_made_scores():
    scores = torch.tensor([
        [9., 8, 7, 6, 5, 4],   # label 0: top-1 right
        [9., 8, 7, 6, 5, 4],   # label 4: top-5 right, top-1 wrong
        [9., 8, 7, 6, 5, 4],   # label 5: both wrong
        [0., 0, 0, 0, 0, 1],   # label 5: top-1 right
    ])
    labels = torch.tensor([0, 4, 5, 5])
    m = evaluate(ScoresAsImages(), _loader(scores, labels), torch.device("cpu"))
    assert m["n"] == 4 and m["top1_err"] == pytest.approx(50.0) and m["top5_err"] == pytest.approx(25.0)
    expected_loss = nn.functional.cross_entropy(scores, labels).item()
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert m["per_class_acc"] == [100.0, None, None, None, 0.0, 50.0]


def test_evaluate_without_top5_for_few_classes():
    scores = torch.tensor([[1., 0, 0], [0., 1, 0], [0., 1, 0]])
    m = evaluate(ScoresAsImages(), _loader(scores, torch.tensor([0, 1, 2])), torch.device("cpu"), num_classes=3)
    assert m["top5_err"] is None and m["top1_err"] == pytest.approx(100 / 3)
    assert m["per_class_acc"] == [100.0, 100.0, 0.0]


def _separable(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.3
    x[:, 0, :2] += (labels * 2 - 1).float().view(-1, 1, 1)  # class 1 bright top half, class 0 dark
    return list(zip(x, labels))


def _tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))


def test_train_one_epoch_schedule_callbacks_and_learning():
    model = _tiny()
    loader = torch.utils.data.DataLoader(_separable(), batch_size=8, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    asked, ended = [], []

    def lr_at(i):
        asked.append(i)
        return 0.1

    before = evaluate(model, torch.utils.data.DataLoader(_separable(seed=1), batch_size=16), torch.device("cpu"))
    it = 10
    for _ in range(6):
        it, stats = train_one_epoch(model, loader, opt, device=torch.device("cpu"), start_iter=it, max_iters=60,
                                    lr_at=lr_at, on_iteration_end=ended.append, log_every=4, label_smoothing=0.1)
    assert it == 58 and stats["n"] == 64 and 0 <= stats["top1_err"] <= 100
    assert asked == list(range(10, 58)) and ended == list(range(11, 59))
    it, _ = train_one_epoch(model, loader, opt, device=torch.device("cpu"), start_iter=it, max_iters=60, lr_at=lr_at)
    assert it == 60  # stops at max_iters mid-epoch
    after = evaluate(model, torch.utils.data.DataLoader(_separable(seed=1), batch_size=16), torch.device("cpu"))
    assert after["top1_err"] <= 5.0 and after["loss"] < before["loss"]


class NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


def test_non_finite_losses_are_skipped_then_stop():
    model = NaNModel()
    w0 = model.fc.weight.detach().clone()
    loader = torch.utils.data.DataLoader(_separable(), batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite"):
        train_one_epoch(model, loader, opt, device=torch.device("cpu"), start_iter=0, max_iters=8,
                        lr_at=lambda i: 0.1, max_bad_steps=3)
    assert torch.equal(model.fc.weight, w0)  # no update was applied


def _data(classes, in_chans=1):
    return ClsDatasets(None, None, list(classes), in_chans, (0.5,), (0.5,), (in_chans, 28, 28), 1.0, "fashion_mnist")


def test_resume_compatibility_names_num_classes():
    state = {"task": "classification", "model_name": "resnet20", "classes": list("abcdefghij"),
             "model_kwargs": {"num_classes": 10, "in_chans": 1}}
    cfg = ClsTrainConfig(backbone="resnet20")
    check_resume_compatible(state, "ck.pt", cfg, _data("abcdefghij"))
    with pytest.raises(ValueError, match=r"num_classes=10 .*num_classes=2 .*--pretrained ck.pt"):
        check_resume_compatible(state, "ck.pt", cfg, _data("ab"))
    with pytest.raises(ValueError, match="backbone is resnet32"):
        check_resume_compatible(state, "ck.pt", ClsTrainConfig(backbone="resnet32"), _data("abcdefghij"))
    with pytest.raises(ValueError, match="in_chans=1"):
        check_resume_compatible(state, "ck.pt", cfg, _data("abcdefghij", in_chans=3))
