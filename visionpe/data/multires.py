"""Multi-resolution training batches (ResFormer, Tian et al. CVPR 2023; NaViT / FlexiViT-style size mixing)
on timm's scheduled batching (``timm.data.ScheduledBatchSampler`` / ``ScheduledTransformDataset``).

Every training batch has one image size ``s`` from a set; its batch size is
``b(s) = batch_size * (img_size / s)^2`` rounded to a multiple of ``batch_multiple`` (so the number of
patch tokens per batch stays about that of the nominal ``img_size x batch_size``). Schedules:

``uniform``      timm's sample-budget mode: one composition of ``(size, batch size)`` pairs that uses each
                 rank's share of the epoch once, each size equally likely per batch, shuffled per epoch.
``progressive``  timm's fixed-batch curriculum: a probability window moves from the smallest size to the
                 largest over ``schedule_epochs`` epochs (spread and uniform exploration as timm's defaults).

The schedule is a function of ``(seed, epoch)`` and of the number of samples per rank, so every DDP rank
draws the same sizes in the same order (their batches have equal shapes). Each rank's samples come from
:class:`~visionpe.data.sampling.ResumableBatchSampler` (the same order and per-sample seeds as fixed-size
training); :class:`ScheduledResumableSampler` adds the resume offset that
:class:`~visionpe.data.sampling.ResumableLoader` sets, so a run resumed mid-epoch reads exactly the batches
(and sizes) an uninterrupted one would. Validation and test stay at the nominal ``img_size``.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from timm.data import ScheduledBatchSampler, ScheduledTransformDataset
from torch.utils.data import Sampler

from .sampling import ResumableBatchSampler

__all__ = ['MultiResolution', 'RankSamples', 'ScheduledResumableSampler', 'ScheduledBatches',
           'ScheduledTransformSkipBad', 'SCHEDULES']

SCHEDULES = ('uniform', 'progressive')


@dataclass(frozen=True)
class MultiResolution:
    """The size set and schedule; ``batch_sizes`` keeps ``tokens per batch ~ img_size^2 * batch_size``."""
    sizes: Tuple[int, ...]
    img_size: int
    batch_size: int
    schedule: str = 'uniform'
    schedule_epochs: Optional[int] = None
    spread: float = 0.65
    random_mix: float = 0.1
    batch_multiple: int = 2

    @classmethod
    def from_options(cls, sizes: Optional[Sequence[int]], size_range: Optional[Sequence[int]], step: int,
                     **kw: Any) -> Optional['MultiResolution']:
        """``sizes`` (a list) or ``size_range`` ``(lo, hi)`` in steps of ``step``; neither: None (fixed size)."""
        if sizes and size_range:
            raise ValueError('give either data.multires_sizes or data.multires_range, not both')
        if size_range:
            if len(size_range) != 2 or not 0 < size_range[0] <= size_range[1] or step <= 0:
                raise ValueError(f'data.multires_range must be (lo, hi) with 0 < lo <= hi and a positive '
                                 f'data.multires_step; got {size_range} step {step}')
            sizes = list(range(int(size_range[0]), int(size_range[1]) + 1, int(step)))
        if not sizes:
            return None
        return cls(tuple(sorted({int(s) for s in sizes})), **kw)

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.sizes):
            raise ValueError(f'multi-resolution sizes must be positive, got {self.sizes}')
        if self.schedule not in SCHEDULES:
            raise ValueError(f'data.multires_schedule must be one of {SCHEDULES}, got {self.schedule!r}')
        if self.schedule == 'progressive' and (len(self.sizes) < 2 or not self.schedule_epochs):
            raise ValueError('a progressive multi-resolution schedule needs at least two sizes and '
                             'data.multires_schedule_epochs (epochs from the smallest size to the largest)')
        if self.batch_multiple <= 0:
            raise ValueError(f'data.multires_batch_multiple must be positive, got {self.batch_multiple}')

    @property
    def batch_sizes(self) -> Tuple[int, ...]:
        m = self.batch_multiple
        return tuple(max(m, m * round(self.batch_size * (self.img_size / s) ** 2 / m)) for s in self.sizes)

    def batch_sampler(self, num_samples: int, seed: int, rank: int, world_size: int) -> 'ScheduledResumableSampler':
        """Batches of ``((index, sample_seed), size choice)`` for one rank (see the module docstring)."""
        samples = RankSamples(ResumableBatchSampler(num_samples, 1, shuffle=True, drop_last=True, seed=seed,
                                                    rank=rank, world_size=world_size))
        kw = dict(choice_schedule='constant')
        if self.schedule == 'progressive':
            kw = dict(choice_schedule='progressive', schedule_epochs=self.schedule_epochs,
                      schedule_spread=self.spread, schedule_random_mix=self.random_mix)
        return ScheduledResumableSampler(samples, batch_sizes=self.batch_sizes, seed=seed, drop_last=True,
                                         nominal_batch_size=self.batch_size, world_size=world_size, **kw)


class RankSamples(Sampler[Tuple[int, int]]):
    """One rank's ``(index, sample_seed)`` items, one at a time, from a batch-size-1 ResumableBatchSampler."""

    def __init__(self, per_sample: ResumableBatchSampler) -> None:
        self.per_sample = per_sample

    def __len__(self) -> int:
        return len(self.per_sample)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return (batch[0] for batch in iter(self.per_sample))

    def set_epoch(self, epoch: int) -> None:
        self.per_sample.set_epoch(epoch)


class ScheduledResumableSampler(ScheduledBatchSampler):
    """timm's :class:`ScheduledBatchSampler` with the interface :class:`ResumableLoader` drives: ``epoch``,
    ``start_batch`` (batches of the epoch to skip, read when iteration starts), ``seed``, ``batch_size``
    (the nominal one) and ``world_size`` for the checkpointed loader state."""

    def __init__(self, sampler: RankSamples, *, nominal_batch_size: int, world_size: int, **kw: Any) -> None:
        super().__init__(sampler, **kw)
        self.batch_size, self.world_size = nominal_batch_size, world_size
        self.start_batch = 0

    def __iter__(self) -> Iterator[List[Tuple[Any, int]]]:
        # read the offset now: ResumableLoader resets it once the DataLoader has called iter()
        return islice(super().__iter__(), self.start_batch, None)

    def sizes_of_epoch(self, epoch: int) -> List[int]:
        """The choice index of every batch of ``epoch``, in order (what every rank will draw)."""
        saved, self.epoch = self.epoch, epoch
        try:
            return [items[0][1] for items in ScheduledBatchSampler.__iter__(self)]
        finally:
            self.epoch = saved


class ScheduledBatches(torch.utils.data.Dataset):
    """Batched in-memory data (e.g. :class:`~visionpe.data.FashionMNISTBatches`) read with scheduled items:
    ``ds[[((index, seed), choice), ...]]`` is the base batch plus ``'size'``: the batch's image size."""

    def __init__(self, base: Any, sizes: Sequence[int]) -> None:
        self.base, self.sizes = base, tuple(sizes)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, items: List[Tuple[Tuple[int, int], int]]):
        choices = {c for _, c in items}
        if len(choices) != 1:
            raise ValueError(f'a scheduled batch must have one size choice, got {sorted(choices)}')
        out = self.base[[pair for pair, _ in items]]
        out['size'] = torch.tensor(self.sizes[choices.pop()], dtype=torch.long)
        return out


class ScheduledTransformSkipBad(ScheduledTransformDataset):
    """timm's :class:`ScheduledTransformDataset` over a dataset that returns ``None`` for an unreadable image
    (:class:`~visionpe.data.SafeImageFolder` without a transform): such items stay ``None`` for
    :func:`~visionpe.data.collate_skip_bad` instead of failing."""

    def __getitem__(self, scheduled_index: Tuple[Any, int]):
        sample_index, choice = scheduled_index
        if not 0 <= choice < len(self.transforms):
            raise IndexError(f'transform index {choice} is out of range')
        sample = self.dataset[sample_index]
        if sample is None:
            return None
        image, *rest = sample
        return (self.transforms[choice](image), *rest)
