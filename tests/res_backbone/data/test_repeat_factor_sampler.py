"""Repeat-factor sampling (LVIS): the factors, the per-epoch counts, determinism, DDP shards, repeat keys."""
import math
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import BatchSampler

from res_backbone.data.samplers import EpochSeeded, RepeatFactorSampler, ResumableBatchSampler, repeat_factors

# 10 images: class 1 in all of them, class 2 in two (f = 0.2), class 3 in one (f = 0.1), one image without boxes
LABELS = [[1], [1, 1], [1, 2], [1, 2, 3], [1], [1], [1], [1], [1], []]


def test_repeat_factors_follow_lvis():
    r = repeat_factors(LABELS, thresh=0.4)
    r2, r3 = math.sqrt(0.4 / 0.2), math.sqrt(0.4 / 0.1)  # sqrt(2), 2
    assert r == pytest.approx([1, 1, r2, r3, 1, 1, 1, 1, 1, 1])  # max over the image's classes; empty -> 1
    assert repeat_factors(LABELS, thresh=0.05).tolist() == [1.0] * 10  # nothing rarer than t
    with pytest.raises(ValueError):
        repeat_factors(LABELS, thresh=0)


def test_counts_rounding_and_fixed_epoch_size():
    r = repeat_factors(LABELS, thresh=0.4)
    s = RepeatFactorSampler(r, seed=3)
    assert len(s) == s.epoch_size == round(r.sum()) == 11  # 8 + sqrt(2) + 2
    totals = Counter()
    for epoch in range(400):
        s.set_epoch(epoch)
        idx = list(s)
        counts = Counter(idx)
        assert len(idx) == 11 and all(counts[i] <= math.ceil(r[i]) for i in range(10))  # floor(r) or floor(r) + 1
        totals.update(idx)
    # stochastic rounding: image 2 (r = 1.414) averages ~1.41 draws an epoch, image 0 (r = 1) ~1 (times the cut)
    assert totals[2] / 400 == pytest.approx(math.sqrt(2) * 11 / r.sum(), abs=0.08)
    assert totals[3] / 400 == pytest.approx(2 * 11 / r.sum(), abs=0.08)
    assert totals[0] / 400 == pytest.approx(11 / r.sum(), abs=0.08)


def test_deterministic_per_seed_and_epoch_and_sharded_for_ddp():
    r = repeat_factors(LABELS, thresh=0.4)
    a, b = RepeatFactorSampler(r, seed=1), RepeatFactorSampler(r, seed=1)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)
    b.set_epoch(6)
    assert list(a) != list(b)
    assert list(a) != list(RepeatFactorSampler(r, seed=2))
    ranks = [RepeatFactorSampler(r, num_replicas=3, rank=k, seed=1) for k in range(3)]
    for s in ranks:
        s.set_epoch(5)
    shards = [list(s) for s in ranks]
    assert len({len(x) for x in shards}) == 1 == len(set(map(len, shards)))  # equal length on every rank
    merged = [i for trio in zip(*shards) for i in trio]
    assert merged == ranks[0].epoch_indices() and len(merged) == 12  # 11 padded to 3 x 4


def test_repeated_indices_get_their_own_augmentation_key():
    s = RepeatFactorSampler([1.0, 3.0], seed=0)
    batches = ResumableBatchSampler(BatchSampler(s, 2, drop_last=False), s)
    keys = [k for batch in batches for k in batch]
    assert sorted(keys) == [(0, 0), (0, 1), (0, 1, 1), (0, 1, 2)]

    class Seeds:
        def __getitem__(self, index):
            return np.random.randint(1 << 30)

    seeded = EpochSeeded(Seeds(), 0)
    assert len({seeded[k] for k in keys}) == 4
    # resuming mid-epoch keys the remaining batches as the uninterrupted pass did
    batches.skip(1)
    assert [k for batch in batches for k in batch] == keys[2:]
