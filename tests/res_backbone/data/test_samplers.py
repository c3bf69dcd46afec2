"""The samplers of res_backbone.data.samplers: the same batches for the same seed and epoch (orders pinned),
resumable mid-epoch. Grouped batching's invariants are in test_data_batching.py."""
import numpy as np
import pytest
from torch.utils.data import BatchSampler, DistributedSampler

from res_backbone.data.samplers import EpochBatchSampler, ResumableBatchSampler, build_grouped_batch_sampler


def test_epoch_batch_sampler_is_reproducible_and_skips():
    s = EpochBatchSampler(10, 3, seed=1)
    first = list(s)
    assert len(first) == len(s) == 3 and all(len(b) == 3 for b in first)
    assert len(set(np.concatenate(first).tolist())) == 9
    assert list(s) == first
    s.set_epoch(1)
    second = list(s)
    assert second != first
    s.skip(2)
    assert list(s) == second[2:]
    assert list(s) == second  # skip applies to one pass only
    with pytest.raises(ValueError, match="cannot fill one batch"):
        EpochBatchSampler(2, 3)


def test_epoch_batch_sampler_order_is_pinned_for_a_seed():
    s = EpochBatchSampler(10, 3, seed=7)
    assert list(s) == [[3, 1, 8], [7, 6, 2], [0, 5, 9]]
    s.set_epoch(3)
    assert list(s) == [[2, 6, 9], [5, 4, 3], [1, 0, 8]]


def test_grouped_batch_sampler_order_is_pinned_for_a_seed():
    ratios = [0.5, 2.0, 1.5, 0.7, 1.0, 0.9, 3.0, 1.2, 0.6, 1.1]
    s = build_grouped_batch_sampler(ratios, 3, seed=7)
    assert list(s) == [[5, 0, 3], [4, 1, 7], [9, 6, 2], [8]]
    s.set_epoch(1)
    assert list(s) == [[3, 5, 0], [1, 2, 6], [4, 7, 9], [8]]


def test_resumable_batch_sampler_order_is_pinned_and_skips():
    base = DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=7)
    s = ResumableBatchSampler(BatchSampler(base, 4, drop_last=True), base)
    assert len(s) == 2
    assert list(s) == [[(0, 5), (0, 0), (0, 3), (0, 4)], [(0, 1), (0, 7), (0, 9), (0, 6)]]
    s.set_epoch(2)
    s.skip(1)
    assert list(s) == [[(2, 6), (2, 2), (2, 9), (2, 1)]]
    assert len(list(s)) == 2  # skip applies to one pass only
