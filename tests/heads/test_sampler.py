"""Balanced sampler: per-image quotas, fraction cap, negatives fill, ignored never drawn."""
import torch

from heads.detection.sampler import BalancedSampler


def _labels():
    # image 0: 10 positives, 100 negatives, 5 ignored; image 1: 2 positives, 3 negatives
    l0 = torch.cat([torch.ones(10), torch.zeros(100), -torch.ones(5)]).long()
    l1 = torch.tensor([2, 0, 0, 3, 0])
    return torch.cat([l0, l1]), torch.cat([torch.zeros(115), torch.ones(5)]).long()


def test_quotas_golden():
    labels, img = _labels()
    pos, neg = BalancedSampler(16, 0.25)(labels, img, 2)
    assert (img[pos] == 0).sum() == 4 and (img[neg] == 0).sum() == 12  # 16 * 0.25 positives
    assert (img[pos] == 1).sum() == 2 and (img[neg] == 1).sum() == 3   # all it has
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()
    assert len(set(torch.cat([pos, neg]).tolist())) == pos.numel() + neg.numel()


def test_negatives_fill_missing_positives():
    labels, img = _labels()
    pos, neg = BalancedSampler(64, 0.5)(labels, img, 2)
    assert (img[pos] == 0).sum() == 10 and (img[neg] == 0).sum() == 54


def test_random_and_uniform():
    labels, img = _labels()
    counts = torch.zeros(10)
    for _ in range(300):
        pos, _ = BalancedSampler(4, 0.5)(labels, img, 2)
        counts += torch.bincount(pos[img[pos] == 0], minlength=10).float()
    assert counts.min() > 30  # each of the 10 positives drawn ~60 times in 300 x 2 draws


def test_empty():
    pos, neg = BalancedSampler(8, 0.5)(torch.full((5,), -1), torch.zeros(5, dtype=torch.long), 1)
    assert pos.numel() == 0 and neg.numel() == 0
