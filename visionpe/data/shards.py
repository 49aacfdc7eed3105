"""ImageNet as webdataset tar shards (``webdataset`` package), deterministic and resumable.

A shard is a tar of samples ``<key>.jpg|jpeg|png|webp`` + ``<key>.cls`` (class index as text), as
written by ``webdataset.ShardWriter``. An epoch is a fixed number of batches: the run is split into
``S = world_size * max(num_workers, 1)`` streams; stream ``k`` reads shards ``k, k + S, ...`` of the
epoch's shard permutation (drawn from ``(seed, epoch)``), cycling through them, shuffles samples in a
buffer seeded by ``(seed, epoch, k)`` and yields exactly ``num_samples // (S * batch_size)`` batches.
``DataLoader`` takes batches from its workers in turn, so the ``j``-th batch of a rank is fully
determined and a resumed run skips the consumed batches by reading (not decoding) their samples.
Unreadable images are skipped and counted like in :mod:`visionpe.data.imagefolder`.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .imagefolder import READ_ERRORS, collate_skip_bad
from .sampling import mix_seed, seed_everything_from

__all__ = ['ShardStream', 'ShardEvalStream', 'expand_shards', 'IMAGE_KEYS']

log = logging.getLogger(__name__)
IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard list from a brace pattern (``/data/in1k/train-{000000..001023}.tar``), a folder (all ``*.tar``
    in it, sorted) or a list; local paths must exist."""
    import braceexpand
    if isinstance(spec, (list, tuple)):
        urls = [str(u) for u in spec]
    elif Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob('*.tar'))
    else:
        urls = list(braceexpand.braceexpand(str(spec)))
    if not urls:
        raise FileNotFoundError(f'no webdataset shards found for {spec!r}: give a folder of .tar shards or a brace '
                                f'pattern such as /data/imagenet-wds/train-{{000000..001023}}.tar')
    missing = [u for u in urls if '://' not in u and not u.startswith('pipe:') and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f'{len(missing)} of {len(urls)} webdataset shards do not exist, e.g. {missing[0]}')
    return urls


def _samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    from webdataset.tariterators import tarfile_samples
    return tarfile_samples([dict(url=u) for u in urls])


class ShardStream(IterableDataset):
    """Batches ``{'image', 'label', 'n_bad', 'n'}`` from tar shards; see the module docstring.

    Acts as its own resumable "sampler" for :class:`visionpe.data.sampling.ResumableLoader`
    (``set_epoch``, ``start_batch``, ``len``).
    """

    def __init__(self, shards: str | Sequence[str], num_samples: int, batch_size: int,
                 transform: Callable | None = None, *, shuffle: bool = True, shuffle_buffer: int = 1000,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 drop_last: bool = True) -> None:
        self.urls = expand_shards(shards)
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.transform, self.shuffle, self.shuffle_buffer = transform, shuffle, shuffle_buffer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = max(num_workers, 1)
        self.drop_last = drop_last
        self.epoch, self.start_batch = 0, 0
        streams = world_size * self.workers
        if len(self.urls) < streams:
            raise ValueError(f'{len(self.urls)} shard(s) cannot feed {world_size} rank(s) x {self.workers} '
                             f'worker(s) = {streams} streams; use fewer data workers or more shards')
        if self.per_stream() == 0:
            raise ValueError(f'{num_samples} samples make less than one batch of {batch_size} per stream '
                             f'({streams} streams); lower the batch size or the number of workers')

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def per_stream(self) -> int:
        """Batches each stream yields per epoch."""
        n = self.num_samples // (self.world_size * self.workers)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return self.per_stream() * self.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f'ShardStream was built for {self.workers} workers, the DataLoader has '
                               f'{info.num_workers}')
        # batches of this rank are dealt to workers in turn: worker w already gave those b < start, b % W == w
        skip = max(0, (self.start_batch - wid + self.workers - 1) // self.workers)
        return self._stream(self.epoch, self.rank * self.workers + wid, skip)

    def _stream(self, epoch: int, k: int, skip: int) -> Iterator[dict[str, Any]]:
        streams = self.world_size * self.workers
        order = np.arange(len(self.urls))
        if self.shuffle:
            order = np.random.default_rng(int(mix_seed(self.seed, epoch))).permutation(len(self.urls))
        mine = [self.urls[i] for i in order[k::streams]]
        rng = np.random.default_rng(int(mix_seed(self.seed, epoch, k, 1)))
        batch: list[Any | None] = []
        for b, raw in enumerate(self._raw(mine, rng)):
            if b >= self.per_stream() * self.batch_size:
                break
            if b < skip * self.batch_size:
                continue
            batch.append(decode_sample(raw, self.transform, int(mix_seed(self.seed, epoch, k, b))))
            if len(batch) == self.batch_size:
                yield collate_skip_bad(batch)
                batch = []
        if batch and not self.drop_last:
            yield collate_skip_bad(batch)

    def _raw(self, urls: list[str], rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        """Samples of ``urls`` cycled forever, through a seeded shuffle buffer."""
        buf: list[dict[str, Any]] = []
        while True:
            got = False
            for s in _samples(urls):
                got = True
                if not self.shuffle:
                    yield s
                    continue
                if len(buf) < self.shuffle_buffer:
                    buf.append(s)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], s = s, buf[j]
                yield s
            if not got:
                raise RuntimeError(f'the shards {urls[:3]}... hold no samples')



def decode_sample(raw: dict[str, Any], transform: Callable | None, seed: int | None) -> Any | None:
    """``(transform(image), label)`` of a raw shard sample, or None (logged) if it cannot be read."""
    from PIL import Image
    key = next((k for k in IMAGE_KEYS if k in raw), None)
    where = f"{raw.get('__url__')}:{raw.get('__key__')}"
    try:
        if key is None:
            raise ValueError(f'no image entry (looked for {IMAGE_KEYS}), entries {sorted(raw)}')
        if 'cls' not in raw:
            raise ValueError('no .cls entry')
        label = int(raw['cls'].decode() if isinstance(raw['cls'], bytes) else raw['cls'])
        with Image.open(io.BytesIO(raw[key])) as im:
            img = im.convert('RGB')
        if seed is not None:
            seed_everything_from(seed)
        if transform is not None:
            img = transform(img)
    except READ_ERRORS as e:
        log.warning('skipping unreadable sample %s: %s: %s', where, type(e).__name__, e)
        return None
    return img, label


class ShardEvalStream(IterableDataset):
    """Every sample of the shards once, in order, split over ranks and workers by shard (evaluation)."""

    def __init__(self, shards: str | Sequence[str], batch_size: int, transform: Callable | None = None,
                 *, rank: int = 0, world_size: int = 1) -> None:
        self.urls = expand_shards(shards)
        self.batch_size, self.transform = batch_size, transform
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        streams = self.world_size * nw
        mine = self.urls[self.rank * nw + wid::streams]
        batch: list[Any | None] = []
        for raw in (_samples(mine) if mine else ()):
            batch.append(decode_sample(raw, self.transform, None))
            if len(batch) == self.batch_size:
                yield collate_skip_bad(batch)
                batch = []
        if batch:
            yield collate_skip_bad(batch)
