"""count_dispatch: kernel-launching operators and host syncs of a call, counted on any device."""
import pytest
import torch

from studies.timing import count_dispatch


def test_views_and_allocations_are_not_counted():
    x = torch.randn(4, 6)
    out, c = count_dispatch(lambda: (x + 1).view(-1)[:6].relu().reshape(2, 3).t().sum())
    assert c.by_op == {"add": 1, "relu": 1, "sum": 1} and c.ops == 3 and c.syncs == 0
    assert out.shape == ()
    _, c = count_dispatch(lambda: torch.empty(5).new_empty(3))
    assert c.ops == 0


def test_syncs():
    x = torch.tensor([0.5, -1.0, 2.0])
    cases = {
        "nonzero": lambda: torch.nonzero(x > 0),
        "bool mask": lambda: x[x > 0],
        "item": lambda: float(x.max()),
        "tolist": lambda: x.tolist(),
        "mask assignment": lambda: x.clone().__setitem__(x < 0, 0.0),
        "repeat_interleave by tensor": lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0])),
    }
    for name, fn in cases.items():
        _, c = count_dispatch(fn)
        assert c.syncs == 1, (name, c)
    _, c = count_dispatch(lambda: (torch.where(x > 0, x, 0.0), x.topk(2), x.sort(), torch.arange(3).repeat_interleave(2)))
    assert c.syncs == 0 and c.ops >= 5


def test_tolist_restored_after_an_error():
    original = torch.Tensor.tolist

    def boom():
        torch.ones(2).tolist()
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        count_dispatch(boom)
    assert torch.Tensor.tolist is original
    assert torch.ones(2).tolist() == [1.0, 1.0]
