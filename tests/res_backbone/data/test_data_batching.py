from collections import Counter
from functools import partial

import pytest
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from res_backbone.data import (GroupedBatchSampler, build_grouped_batch_sampler, collate_detection,
                               group_by_aspect_ratio)


def _item(h, w, n=1):
    return torch.ones(3, h, w), {"boxes": torch.zeros(n, 4), "labels": torch.ones(n, dtype=torch.int64), "image_id": h}


def test_collate_pads_to_multiple_of_32():
    images, sizes, targets = collate_detection([_item(50, 70), _item(64, 33, 0)])
    assert images.shape == (2, 3, 64, 96)
    assert sizes == [(50, 70), (64, 33)]
    assert [t["image_id"] for t in targets] == [50, 64]
    assert images[0, :, :50, :70].eq(1).all() and images[0, :, 50:].eq(0).all() and images[0, :, :, 70:].eq(0).all()
    assert images[1, :, :, 33:].eq(0).all()


def test_collate_configurable_divisor():
    images, _, _ = partial(collate_detection, size_divisible=64)([_item(65, 10)])
    assert images.shape == (1, 3, 128, 64)
    images, _, _ = collate_detection([_item(64, 32)])
    assert images.shape == (1, 3, 64, 32)  # already a multiple: no extra padding
    with pytest.raises(ValueError):
        collate_detection([])


def test_group_by_aspect_ratio():
    assert group_by_aspect_ratio([0.5, 1.0, 1.5, 0.99]) == [0, 1, 1, 0]
    ids = group_by_aspect_ratio([0.5, 0.6, 0.7, 1.0, 1.2, 1.5], bins=3)
    assert ids == [0, 0, 1, 1, 2, 2]
    assert group_by_aspect_ratio([0.5, 1.0, 2.0], bins=[0.8, 1.5]) == [0, 1, 2]


def test_grouped_batches_are_pure_and_complete():
    groups = [0, 1] * 10 + [0] * 3  # 13 of group 0, 10 of group 1
    bs = GroupedBatchSampler(SequentialSampler(range(len(groups))), None, batch_size=4, group_ids=groups)
    batches = list(bs)
    assert len(batches) == len(bs) == 6
    assert sorted(i for b in batches for i in b) == list(range(len(groups)))  # nothing lost or repeated
    full_pure = [b for b in batches[:-2] if len(b) == 4]
    assert all(len({groups[i] for i in b}) == 1 for b in full_pure)
    mixed = [b for b in batches if len({groups[i] for i in b}) > 1]
    assert len(mixed) <= 1  # only the tail may mix
    dropped = list(GroupedBatchSampler(SequentialSampler(range(len(groups))), None, 4, drop_last=True, group_ids=groups))
    assert len(dropped) == 5 and all(len(b) == 4 for b in dropped)


def test_grouped_sampler_ddp_equal_length_and_deterministic():
    ratios = [0.5 if i % 3 else 1.5 for i in range(37)]
    per_rank = []
    for rank in range(2):
        bs = build_grouped_batch_sampler(ratios, 4, seed=7, num_replicas=2, rank=rank)
        bs.set_epoch(3)
        per_rank.append(list(bs))
        bs2 = build_grouped_batch_sampler(ratios, 4, seed=7, num_replicas=2, rank=rank)
        bs2.set_epoch(3)
        assert list(bs2) == per_rank[-1]  # same seed and epoch -> same batches
        bs2.set_epoch(4)
        assert list(bs2) != per_rank[-1]
    assert len(per_rank[0]) == len(per_rank[1]) == 5  # ceil(19 / 4) on both ranks: no DDP hang
    seen = Counter(i for r in per_rank for b in r for i in b)
    assert set(seen) == set(range(37))  # the two shards cover the data set (one index padded twice)


def test_grouped_sampler_with_distributed_sampler_directly():
    ratios = [0.75 if i % 2 else 1.33 for i in range(20)]
    s = DistributedSampler(range(20), num_replicas=1, rank=0, shuffle=True, seed=0)
    bs = GroupedBatchSampler(s, ratios, 5)
    batches = list(bs)
    assert len(batches) == 4 and all(len({ratios[i] < 1 for i in b}) == 1 for b in batches)
    with pytest.raises(ValueError, match="exactly one"):
        GroupedBatchSampler(s, ratios, 5, group_ids=[0] * 20)


def test_dataloader_end_to_end(tmp_path):
    from torch.utils.data import DataLoader

    from res_backbone.data import CocoDetection, build_train_transforms, make_synthetic_coco

    p = make_synthetic_coco(tmp_path, num_train=10, num_val=0, image_size=64, num_classes=3)
    ds = CocoDetection(p["train_json"], p["train_images"],
                       build_train_transforms(96, (0.5,) * 3, (0.25,) * 3, seed=0))
    sampler = build_grouped_batch_sampler(ds.aspect_ratios(), 4, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_detection)
    n = 0
    for images, sizes, targets in loader:
        assert images.shape[-2] % 32 == 0 and images.shape[-1] % 32 == 0
        for (h, w), t in zip(sizes, targets):
            assert t["size"] == (h, w) and t["labels"].dtype == torch.int64
            assert all(1 <= v <= 3 for v in t["labels"].tolist())
            if len(t["boxes"]):
                assert (t["boxes"][:, 2] <= w + 1e-3).all() and (t["boxes"][:, 3] <= h + 1e-3).all()
        n += len(targets)
    assert n == 10


def test_workers_get_different_augmentation(tmp_path):
    import numpy as np
    from torch.utils.data import DataLoader, Dataset

    from res_backbone.data import build_train_transforms, worker_init_fn

    class Flips(Dataset):
        transforms = build_train_transforms(8, (0.5,) * 3, (0.25,) * 3, scale_jitter=None, photometric=False, seed=0)

        def __len__(self):
            return 64

        def __getitem__(self, i):
            img = np.zeros((8, 8, 3), np.uint8)
            out = self.transforms(image=img, bboxes=np.array([[0.0, 0, 2, 2]]), labels=[1])
            return float(out["bboxes"][0][0])  # 0 = kept, 6 = flipped

    torch.manual_seed(0)
    flips = [x.tolist() for x in DataLoader(Flips(), batch_size=16, num_workers=2, worker_init_fn=worker_init_fn)]
    assert flips[0] != flips[1]  # worker 0's and worker 1's first batches differ
