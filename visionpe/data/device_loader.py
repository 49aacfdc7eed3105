"""Device-resident batches for small in-memory datasets (Fashion-MNIST): the fast path for short studies.

On a GPU a tiny model trains faster than a ``DataLoader`` can gather a batch on the host, copy it
and hand it over. With ``--data.device_resident true`` the whole uint8 dataset (Fashion-MNIST's
70k images: 55 MB) is copied to the training device once, and every batch is an index lookup there,
in the training process (:class:`DeviceBatchLoader`): no host gather, no host-to-device copy, no
loader machinery. The order and each batch's augmentation seed still come from the same batch
sampler (:class:`~visionpe.data.ResumableBatchSampler`, resumable mid-epoch), and the transforms
(canvas, crop, flip, resize; normalisation) run batched on the device in the data module's
``on_after_batch_transfer`` exactly as for the host path, so both paths give the same images.

Multi-resolution hook: a batch-lookup wrapper that tags each batch with its size (the scheduled
sampler's dataset) works unchanged: wrap the resident dataset, ``batch_loader(Wrapper(resident(ds,
device)), sampler, device)``; the size is read on the device side like any other batch key.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader

__all__ = ['DeviceBatchLoader', 'resident', 'batch_loader']


def resident(ds: Any, device: torch.device) -> Any:
    """Move a batch-lookup dataset's ``images`` and ``labels`` tensors to ``device`` (in place, once)."""
    for name in ('images', 'labels'):
        t = getattr(ds, name, None)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'{type(ds).__name__} keeps no tensor {name!r}; only in-memory batch datasets '
                            f'(e.g. FashionMNISTBatches) can live on the device')
        if t.device != device:
            setattr(ds, name, t.to(device))
    return ds


class DeviceBatchLoader:
    """A ``DataLoader`` stand-in for ``DataLoader(ds, sampler=batch_sampler, batch_size=None)`` with
    ``num_workers=0``: yields ``ds[items]`` for each list of items the sampler gives, in this process.

    The sampler is iterated when ``iter()`` is called (as a DataLoader does), so
    :class:`~visionpe.data.ResumableLoader` can set the epoch and resume offset before that."""

    def __init__(self, dataset: Any, sampler: Iterable[Any]) -> None:
        self.dataset, self.sampler = dataset, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.sampler)  # the sampler reads its epoch and offset now
        return (self.dataset[items] for items in batches)


def batch_loader(ds: Any, sampler: Iterable[Any], device: torch.device | None) -> DataLoader | DeviceBatchLoader:
    """The loader of a batch-lookup dataset (``ds[items]`` is a whole batch) over ``sampler``: on
    ``device`` when given (the dataset must already be :func:`resident` there), else a host
    ``DataLoader`` whose batches Lightning copies to the device."""
    if device is None:
        return DataLoader(ds, sampler=sampler, batch_size=None, num_workers=0)
    return DeviceBatchLoader(ds, sampler)
