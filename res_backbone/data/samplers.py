"""The data samplers, all reproducible from a seed and the epoch: aspect-ratio grouped batching (less
padding per batch, DDP-safe), shuffled classification batches, resumable ``(epoch, index)`` batches, and
repeat-factor sampling for rare classes (LVIS)."""
from __future__ import annotations

import bisect
import math
import random
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

__all__ = ["EpochBatchSampler", "EpochSeeded", "GroupedBatchSampler", "RepeatFactorSampler", "ResumableBatchSampler",
           "build_grouped_batch_sampler", "group_by_aspect_ratio", "repeat_factors"]


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
    """Batches of ``(epoch, index)`` keys for :class:`EpochSeeded` (``(epoch, index, k)`` for the ``k``-th repeat
    of an index within the epoch), reproducible per epoch, with ``skip(k)`` to drop the first ``k`` batches of
    the next pass (resuming mid-epoch)."""

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
        seen: Dict[int, int] = defaultdict(int)  # counted over skipped batches too: a resumed pass keys alike
        for i, batch in enumerate(self.batch_sampler):
            keys = []
            for idx in batch:
                # a sample drawn again in the same epoch (RepeatFactorSampler, DistributedSampler's padding)
                # gets its own key, so its own augmentation
                keys.append((self.epoch, idx) if not seen[idx] else (self.epoch, idx, seen[idx]))
                seen[idx] += 1
            if i >= skip:
                yield keys


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
        epoch, index, *again = key  # (epoch, index, k): the k-th repeat of index in this epoch
        s = (self.seed * 1_000_003 + epoch * 10_007 + index + (again[0] * 1_000_033 if again else 0)) % 2**31
        random.seed(s)
        np.random.seed(s)
        transforms = getattr(self.dataset, "transforms", None)
        if hasattr(transforms, "set_random_seed"):
            transforms.set_random_seed(s)
        return self.dataset[index]


def repeat_factors(image_labels: Sequence[Sequence[int]], thresh: float) -> np.ndarray:
    """Per-image repeat factors of repeat-factor sampling (LVIS, Gupta et al. 2019, section 4).

    With ``f_c`` the share of images holding class ``c``: ``r_c = max(1, sqrt(thresh / f_c))`` and an image
    repeats ``r_i = max(r_c for the classes c in it)`` times per epoch (1 for an image without boxes).

    Args:
        image_labels: the labels of each image's boxes (any hashable class ids; repeats allowed).
        thresh: ``t``; classes in fewer than a ``t`` share of the images are oversampled.

    Returns:
        ``(num_images,)`` float64 factors >= 1.
    """
    if not thresh > 0:
        raise ValueError(f"the repeat threshold must be > 0, got {thresh}")
    sets = [set(np.asarray(lab).reshape(-1).tolist()) for lab in image_labels]
    n = max(len(sets), 1)
    counts: Dict = defaultdict(int)
    for s in sets:
        for c in s:
            counts[c] += 1
    r_class = {c: max(1.0, math.sqrt(thresh / (k / n))) for c, k in counts.items()}
    return np.asarray([max((r_class[c] for c in s), default=1.0) for s in sets], np.float64)


class RepeatFactorSampler(Sampler[int]):
    """Dataset indices with image ``i`` repeated ``r_i`` times per epoch (:func:`repeat_factors`), shuffled and
    sharded over DDP ranks: a drop-in for the ``DistributedSampler`` under a :class:`GroupedBatchSampler`.

    Fractional factors are rounded stochastically each epoch (``floor(r) + 1`` with probability ``r - floor(r)``,
    as detectron2's ``RepeatFactorTrainingSampler``), from a generator seeded by ``(seed, epoch)`` alone: every
    rank draws the same list and takes its own shard, and a resumed run sees the same epochs. Unlike detectron2's
    endless stream the epoch has a fixed length, ``round(sum r_i)`` (what the runner's iteration counting and
    mid-epoch resume need): the shuffled draw is cut to it or continued cyclically, then padded cyclically to a
    multiple of ``num_replicas``.

    Args:
        factors: ``r_i`` per dataset index.
        num_replicas, rank: the DDP world size and this rank.
        seed: with the epoch, fixes the draw.
    """

    def __init__(self, factors: Sequence[float], *, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.factors = np.asarray(factors, np.float64)
        if self.factors.ndim != 1 or not len(self.factors) or (self.factors < 1).any():
            raise ValueError("repeat factors must be a non-empty list of numbers >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.epoch_size = max(1, int(round(float(self.factors.sum()))))  # images per epoch over all ranks
        self.num_samples = -(-self.epoch_size // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def epoch_indices(self) -> List[int]:
        """Every rank's indices of the current epoch, before sharding (``num_samples * num_replicas`` of them)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        base = np.floor(self.factors)
        extra = torch.rand(len(self.factors), generator=g, dtype=torch.float64).numpy() < self.factors - base
        reps = np.repeat(np.arange(len(self.factors)), (base + extra).astype(np.int64))
        order = reps[torch.randperm(len(reps), generator=g).numpy()].tolist()
        total = self.num_samples * self.num_replicas
        return [order[i % len(order)] for i in range(total)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.rank::self.num_replicas])
