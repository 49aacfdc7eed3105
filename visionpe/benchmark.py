"""Timing and peak-memory measurement shared by ``benchmarks/`` and the resolution evaluator.

``peak_memory()`` reports, for the code inside the ``with`` block:

* on CUDA, ``torch.cuda.max_memory_allocated`` above the allocation at entry;
* on CPU, the peak of *live tensor storage* created inside the block, tracked exactly per
  operator with a ``TorchDispatchMode`` (allocator independent, so not blurred by malloc caching
  the way process RSS is). Inputs and weights that already existed are not counted.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ['PeakMemory', 'peak_memory', 'time_call', 'time_interleaved', 'images_per_second', 'STATS']


class _LiveStorageTracker(TorchDispatchMode):
    """Counts bytes of every storage created by an operator until Python frees it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == 'cpu':
                st = t.untyped_storage()
                key = id(st)
                if key not in self._seen and st.nbytes() > 0:
                    self._seen[key] = st.nbytes()
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._release, key)
        return out


@dataclass
class PeakMemory:
    """Result holder: ``bytes`` is filled when the ``with`` block exits."""
    device: torch.device
    bytes: int = 0
    method: str = field(default='')

    @property
    def mib(self) -> float:
        return self.bytes / 2 ** 20


@contextlib.contextmanager
def peak_memory(device: torch.device | str = 'cpu') -> Iterator[PeakMemory]:
    device = torch.device(device)
    result = PeakMemory(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.bytes = torch.cuda.max_memory_allocated(device) - base
            result.method = 'cuda max_memory_allocated'
    else:
        tracker = _LiveStorageTracker()
        with tracker:
            yield result
        result.bytes = tracker.peak
        result.method = 'peak live tensor storage (dispatch tracking)'


STATS = ('median', 'min')


def _check_stat(stat: str) -> None:
    if stat not in STATS:
        raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")


def _pick(times: list[float], stat: str) -> float:
    """The ``'min'`` or the ``'median'`` (upper middle) of ``times``."""
    times = sorted(times)
    return times[0] if stat == 'min' else times[len(times) // 2]


def _timed(fn: Callable[[], object], device: torch.device | None) -> float:
    """Seconds of one call of ``fn``, CUDA-synchronised before and after when ``device`` is CUDA."""
    cuda = device is not None and torch.device(device).type == 'cuda'
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def time_call(fn: Callable[[], object], warmup: int = 1, repeats: int = 3, min_time: float = 0.0,
              device: torch.device | None = None, stat: str = 'median') -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls (CUDA-synchronised): the ``'median'`` or the
    ``'min'`` of the timed calls. On a machine whose CPU stalls (a shared VM) the minimum is the
    better estimate of the work itself: stalls only ever add time."""
    _check_stat(stat)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time:
        times.append(_timed(fn, device))
    return _pick(times, stat)


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 3,
                     device: torch.device | None = None, stat: str = 'median') -> dict[str, float]:
    """Seconds per call of each function, timed in rounds: each round calls every function once, in
    order, so that a slow spell of the machine falls on all of them alike instead of on whichever
    happened to be measured then. Per function: the ``'median'`` or ``'min'`` over the rounds."""
    _check_stat(stat)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return {name: _pick(t, stat) for name, t in times.items()}


def images_per_second(seconds_per_batch: float, batch_size: int) -> float:
    return batch_size / seconds_per_batch if seconds_per_batch > 0 else float('inf')
