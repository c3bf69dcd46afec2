"""The data samplers, all reproducible from a seed and the epoch: aspect-ratio grouped batching (less
padding per batch, DDP-safe), shuffled classification batches, and resumable ``(epoch, index)`` batches."""
from __future__ import annotations

import bisect
import random
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

__all__ = ["EpochBatchSampler", "EpochSeeded", "GroupedBatchSampler", "ResumableBatchSampler", "build_grouped_batch_sampler",
           "group_by_aspect_ratio"]


def group_by_aspect_ratio(aspect_ratios: Sequence[float], bins: Union[int, Sequence[float], None] = None) -> List[int]:
    """Group id per image from its width / height.

    Args:
        aspect_ratios: ``w / h`` per image (``CocoDetection.aspect_ratios()``).
        bins: ``None``: two groups, portrait (< 1) and landscape/square (>= 1). An int ``k``: ``k``
            groups of about equal size (edges at the data's quantiles). A sequence: explicit
            ascending edges (``len(edges) + 1`` groups).

    Returns:
        ``group_ids[i]`` in ``0..num_groups-1``.
    """
    ratios = np.asarray(aspect_ratios, dtype=np.float64)
    if bins is None:
        edges: List[float] = [1.0]
    elif isinstance(bins, int):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        edges = sorted(set(np.quantile(ratios, np.linspace(0, 1, bins + 1)[1:-1]).tolist())) if len(ratios) else []
    else:
        edges = [float(e) for e in bins]
        if edges != sorted(edges):
            raise ValueError(f"bin edges must be ascending, got {edges}")
    return [bisect.bisect_right(edges, r) for r in ratios.tolist()]


class GroupedBatchSampler(Sampler[List[int]]):
    """Batches whose images share an aspect-ratio group, in the order of an underlying sampler.

    Indices are drawn from ``sampler`` (e.g. a ``DistributedSampler``, which shards and shuffles
    deterministically from its seed and epoch) and buffered per group; a batch is emitted as soon
    as its group buffer is full. At the end of the pass the partial buffers, largest group first,
    are concatenated and cut into batches, so the number of batches is always
    ``ceil(len(sampler) / batch_size)`` (``floor`` with ``drop_last``) and identical on every DDP
    rank -- a rank with an extra batch would hang in the gradient all-reduce. Only those few tail
    batches may mix groups; no index is repeated or (without ``drop_last``) lost.

    Args:
        sampler: yields dataset indices; its ``set_epoch`` is forwarded by ``set_epoch``.
        aspect_ratios: ``w / h`` of every dataset index (``CocoDetection.aspect_ratios()``).
        batch_size: images per batch.
        bins: grouping of the ratios, see ``group_by_aspect_ratio`` (default: < 1 and >= 1).
        drop_last: drop the final incomplete batch.
        group_ids: precomputed group of every index; replaces ``aspect_ratios``/``bins`` (pass
            ``aspect_ratios=None``).
    """

    def __init__(self, sampler: Sampler[int], aspect_ratios: Optional[Sequence[float]], batch_size: int, *,
                 bins: Union[int, Sequence[float], None] = None, drop_last: bool = False,
                 group_ids: Optional[Sequence[int]] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (aspect_ratios is None) == (group_ids is None):
            raise ValueError("give exactly one of aspect_ratios and group_ids")
        self.sampler = sampler
        self.group_ids = ([int(g) for g in group_ids] if group_ids is not None
                          else group_by_aspect_ratio(aspect_ratios, bins))  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the underlying sampler (reshuffles a ``DistributedSampler``)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        buffers: Dict[int, List[int]] = defaultdict(list)
        first_seen: Dict[int, int] = {}
        for idx in self.sampler:
            g = self.group_ids[idx]
            first_seen.setdefault(g, len(first_seen))
            buf = buffers[g]
            buf.append(idx)
            if len(buf) == self.batch_size:
                yield list(buf)
                buf.clear()
        # Deterministic tail: largest leftover first, ties by first appearance.
        order = sorted((g for g in buffers if buffers[g]), key=lambda g: (-len(buffers[g]), first_seen[g]))
        tail = [i for g in order for i in buffers[g]]
        for start in range(0, len(tail), self.batch_size):
            chunk = tail[start:start + self.batch_size]
            if len(chunk) < self.batch_size and self.drop_last:
                break
            yield chunk


def build_grouped_batch_sampler(
    aspect_ratios: Sequence[float],
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    bins: Union[int, Sequence[float], None] = None,
    drop_last: bool = False,
    num_replicas: Optional[int] = None,
    rank: Optional[int] = None,
) -> GroupedBatchSampler:
    """A ``GroupedBatchSampler`` over a ``DistributedSampler`` (one replica when not distributed).

    Deterministic given ``seed`` and the epoch passed to ``set_epoch``; call ``set_epoch(epoch)``
    before every epoch. ``num_replicas``/``rank`` default to the initialised process group (or 1/0).
    """
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    n = len(aspect_ratios)
    sampler = DistributedSampler(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=False)
    return GroupedBatchSampler(sampler, aspect_ratios, batch_size, bins=bins, drop_last=drop_last)


class EpochBatchSampler(Sampler):
    """Shuffled training batches (the last incomplete one dropped), reproducible per epoch.

    Epoch ``e``'s order is a permutation seeded by ``(seed, e)``, independent of any global RNG, and
    ``skip(k)`` drops the first ``k`` batches of the next pass: a run resumed mid-epoch sees exactly
    the batches the interrupted run would have seen.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0):
        if batch_size < 1 or num_samples < batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one batch of {batch_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, k: int) -> None:
        self._skip = k

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def __iter__(self):
        skip, self._skip = self._skip, 0
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        b = self.batch_size
        for i in range(skip, len(self)):
            yield order[i * b:(i + 1) * b]


class ResumableBatchSampler(Sampler):
    """Batches of ``(epoch, index)`` keys for :class:`EpochSeeded`, reproducible per epoch, with
    ``skip(k)`` to drop the first ``k`` batches of the next pass (resuming mid-epoch)."""

    def __init__(self, batch_sampler, base_sampler):
        self.batch_sampler, self.base_sampler = batch_sampler, base_sampler
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base_sampler.set_epoch(epoch)
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def skip(self, k: int) -> None:
        self._skip = k

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        for i, batch in enumerate(self.batch_sampler):
            if i >= skip:
                yield [(self.epoch, idx) for idx in batch]


class EpochSeeded(torch.utils.data.Dataset):
    """Wraps a dataset so item ``(epoch, index)`` is produced with its augmentation RNG seeded from
    ``(seed, epoch, index)``: the same sample gets the same augmentation whichever worker loads it,
    whether the run was resumed or not (what makes a resumed run's losses equal an uninterrupted one's).
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        s = (self.seed * 1_000_003 + epoch * 10_007 + index) % 2**31
        random.seed(s)
        np.random.seed(s)
        transforms = getattr(self.dataset, "transforms", None)
        if hasattr(transforms, "set_random_seed"):
            transforms.set_random_seed(s)
        return self.dataset[index]
