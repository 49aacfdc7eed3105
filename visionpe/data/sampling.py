"""Deterministic, rank-aware, resumable sampling: every random draw of the input pipeline is a pure
function of ``(seed, epoch, position)``.

* :class:`ResumableBatchSampler` yields batches of ``(index, sample_seed)`` for one rank: the epoch's
  permutation comes from ``(seed, epoch)``, rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of
  it (no padding: the tail that does not divide evenly is dropped in training, kept in evaluation),
  and ``sample_seed`` is a hash of ``(seed, epoch, global position)``. A transform seeded with it
  draws the same augmentation whatever the number of workers, ranks or restarts.
* :class:`ResumableLoader` wraps a ``DataLoader`` over such a sampler and exposes Lightning's
  ``state_dict``/``load_state_dict`` protocol (Lightning stores it in the checkpoint under
  ``loops.fit_loop.state_dict.combined_loader``): it records ``(epoch, batches yielded)`` and, on
  resume, starts the interrupted epoch at the next batch without reading the skipped ones.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ['ResumableBatchSampler', 'ResumableLoader', 'mix_seed', 'seed_everything_from']

log = logging.getLogger(__name__)
_MASK63 = (1 << 63) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014), vectorised over uint64."""
    with np.errstate(over='ignore'):
        x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)).astype(np.uint64)
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)).astype(np.uint64)
        return x ^ (x >> np.uint64(31))


def mix_seed(*parts: Any) -> np.ndarray:
    """Hash integers (scalars or arrays, broadcast) into 63-bit seeds: ``splitmix(... splitmix(a) ^ b ...)``."""
    out = np.zeros((), dtype=np.uint64)
    for p in parts:
        out = _splitmix64(out ^ np.asarray(p).astype(np.uint64))
    return out & np.uint64(_MASK63)


def seed_everything_from(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (all devices) from one 63-bit seed."""
    import random
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, sample_seed)`` for one rank; see the module docstring.

    ``set_epoch`` is called by Lightning at every epoch start; ``start_batch`` (set by
    :class:`ResumableLoader`) skips the batches already consumed before an interruption.
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_samples <= 0:
            raise ValueError('the dataset is empty (0 samples); nothing to iterate')
        if batch_size <= 0:
            raise ValueError(f'batch_size must be positive, got {batch_size}')
        if not 0 <= rank < world_size:
            raise ValueError(f'rank {rank} is not in [0, {world_size})')
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0
        if drop_last and len(self) == 0:
            raise ValueError(
                f'{num_samples} samples over {world_size} rank(s) make less than one batch of {batch_size}: '
                f'lower the batch size or use more data')

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _per_rank(self) -> int:
        if self.drop_last:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def positions(self) -> np.ndarray:
        """Global positions (in the epoch's order) that this rank reads, in order."""
        return np.arange(self.rank, self._per_rank() * self.world_size if self.drop_last else self.num_samples,
                         self.world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # read epoch and offset now (DataLoader iterators call iter() eagerly, then consume lazily)
        return self._batches(self.epoch, self.start_batch)

    def _batches(self, epoch: int, start: int) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(int(mix_seed(self.seed, epoch)))
            order = torch.randperm(self.num_samples, generator=g).numpy()
        else:
            order = np.arange(self.num_samples)
        pos = self.positions()
        seeds = mix_seed(self.seed, epoch, pos)
        idx = order[pos]
        for b in range(start, len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield list(zip(idx[sl].tolist(), seeds[sl].tolist()))


class ResumableLoader:
    """A ``DataLoader`` over a :class:`ResumableBatchSampler`, resumable mid-epoch (Lightning ``_Stateful``).

    ``loader`` must draw its batches from ``batch_sampler`` (as ``batch_sampler=`` or as ``sampler=`` with
    ``batch_size=None``). Iteration is lazy: the epoch and the resume offset are read at the first
    ``next()``, after Lightning has called ``set_epoch``.
    """

    def __init__(self, loader: DataLoader, batch_sampler: ResumableBatchSampler) -> None:
        self.loader = loader
        self.batch_sampler = batch_sampler
        self._resume: dict[str, int] | None = None
        self._epoch = 0
        self._done = 0

    @property
    def sampler(self) -> ResumableBatchSampler:  # Lightning calls sampler.set_epoch(epoch)
        return self.batch_sampler

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        bs = self.batch_sampler
        start = 0
        if self._resume is not None:
            if self._resume['epoch'] == bs.epoch:
                start = self._resume['batches']
            self._resume = None
        self._epoch, self._done = bs.epoch, start
        bs.start_batch = start
        try:
            it = iter(self.loader)  # the sampler reads epoch and offset here
        finally:
            bs.start_batch = 0
        for batch in it:
            self._done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {'epoch': self._epoch, 'batches': self._done, 'seed': self.batch_sampler.seed,
                'batch_size': self.batch_sampler.batch_size, 'world_size': self.batch_sampler.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        bs = self.batch_sampler
        if state.get('seed', bs.seed) != bs.seed:
            raise ValueError(
                f"cannot resume the data order: the checkpoint was written with data seed {state['seed']} and "
                f"this run uses {bs.seed}; pass --data.seed {state['seed']}")
        batches = int(state['batches'])
        old = (int(state.get('batch_size', bs.batch_size)), int(state.get('world_size', bs.world_size)))
        if old != (bs.batch_size, bs.world_size):
            # elastic restart: continue from the same global position, rounded down to a whole batch
            consumed = batches * old[0] * old[1]
            batches = consumed // (bs.batch_size * bs.world_size)
            log.warning('resuming with batch size x ranks %s instead of %s: the interrupted epoch continues at '
                        'global sample %d (not bit-exact)', (bs.batch_size, bs.world_size), old,
                        batches * bs.batch_size * bs.world_size)
        self._resume = {'epoch': int(state['epoch']), 'batches': batches}
