"""ImageNet-style image folders with corrupt-image handling.

Layout (torchvision ``ImageFolder``)::

    ROOT/train/<class_name>/<image>.JPEG
    ROOT/val/<class_name>/<image>.JPEG      (same class folder names)

An image that cannot be read or decoded is skipped: the dataset returns ``None``, the collate
function drops it and reports how many it dropped in the batch (``n_bad``), and
:class:`BadSampleMonitor` (in the main process) counts them and stops the run with a clear error
once the fraction of bad images exceeds a threshold. Every sample's augmentation is seeded from
its ``(index, seed)`` item (see :mod:`visionpe.data.sampling`), so it does not depend on workers.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import default_collate

from .sampling import seed_everything_from

__all__ = ['SafeImageFolder', 'Unreadable', 'collate_skip_bad', 'BadSampleMonitor', 'BadDataError', 'check_image_folder',
           'READ_ERRORS']

log = logging.getLogger(__name__)
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError)  # PIL's UnidentifiedImageError is an OSError


class BadDataError(RuntimeError):
    """Too many unreadable samples."""


def check_image_folder(root: Union[str, Path], split: str) -> Path:
    path = Path(root) / split
    if not path.is_dir():
        raise FileNotFoundError(
            f'image folder {path} does not exist. Expected the ImageFolder layout ROOT/train/<class>/<image> and '
            f'ROOT/val/<class>/<image> (e.g. ImageNet: ROOT/train/n01440764/n01440764_10026.JPEG); pass the '
            f'folder holding train/ and val/ as --data.root')
    if not any(p.is_dir() for p in path.iterdir()):
        raise FileNotFoundError(f'image folder {path} has no class sub-folders; expected {path}/<class>/<image>')
    return path


class SafeImageFolder:
    """``torchvision.datasets.ImageFolder`` whose items are ``(index, seed)`` (or plain indices) and
    whose unreadable images come back as ``None`` (logged with their path)."""

    def __init__(self, root: Union[str, Path], transform: Optional[Callable] = None,
                 class_to_idx: Optional[Dict[str, int]] = None) -> None:
        from torchvision.datasets import ImageFolder
        self.folder = ImageFolder(str(root), transform=None, allow_empty=False)
        if class_to_idx is not None and class_to_idx != self.folder.class_to_idx:
            missing = sorted(set(self.folder.class_to_idx) ^ set(class_to_idx))[:5]
            raise ValueError(f'{root}: its class folders differ from the training classes (e.g. {missing}); '
                             f'train/ and val/ must hold the same class names')
        self.transform = transform
        self.samples = self.folder.samples
        self.classes = self.folder.classes
        self.class_to_idx = self.folder.class_to_idx

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Union[Tuple[torch.Tensor, int], 'Unreadable']:
        index, seed = item if isinstance(item, (tuple, list)) else (item, None)
        path, target = self.samples[index]
        try:
            img = self.folder.loader(path)
            if seed is not None:
                seed_everything_from(int(seed))
            if self.transform is not None:
                img = self.transform(img)
        except READ_ERRORS as e:
            log.warning('skipping unreadable image %s: %s: %s', path, type(e).__name__, e)
            return Unreadable(str(path), f'{type(e).__name__}: {e}')
        return img, target


class Unreadable(NamedTuple):
    """What a dataset returns for a sample it could not read: where it is and why (the error lists them)."""
    path: str
    reason: str


def collate_skip_bad(batch: List[Any]) -> Dict[str, Any]:
    """Collate the readable samples: ``{'image', 'label', 'n_bad', 'n', 'bad_paths'}`` (``image`` is None if
    none was); an unreadable sample is an :class:`Unreadable` (its path goes to ``bad_paths``) or None."""
    good = [b for b in batch if b is not None and not isinstance(b, Unreadable)]
    out: Dict[str, Any] = {'n_bad': torch.tensor(len(batch) - len(good)), 'n': torch.tensor(len(batch)),
                           'bad_paths': [b.path for b in batch if isinstance(b, Unreadable)]}
    if good:
        out['image'], out['label'] = default_collate(good)
    else:
        out['image'], out['label'] = None, None
    return out


class BadSampleMonitor:
    """Counts skipped samples (per process) and fails once ``bad / seen > max_fraction``.

    The check runs after every batch once ``check_after`` samples were seen, and at every epoch end
    (:meth:`check` with ``final=True``) whatever the count.
    """

    LISTED = 10  # paths kept for the error message

    def __init__(self, max_fraction: float = 0.001, check_after: int = 1000) -> None:
        if not 0 <= max_fraction <= 1:
            raise ValueError(f'max_bad_fraction must be in [0, 1], got {max_fraction}')
        self.max_fraction, self.check_after = max_fraction, check_after
        self.bad = 0
        self.seen = 0
        self.paths: List[str] = []  # the first unreadable files (all of them are in the log)

    def update(self, n_bad: int, n: int, paths: Sequence[str] = ()) -> None:
        self.bad += int(n_bad)
        self.seen += int(n)
        self.paths += list(paths)[:self.LISTED - len(self.paths)]
        if self.seen >= self.check_after:
            self.check()

    def check(self, final: bool = False) -> None:
        if self.seen and self.bad / self.seen > self.max_fraction:
            raise BadDataError(
                f'{self.bad} of {self.seen} images ({100 * self.bad / self.seen:.2f}%) could not be read, more than '
                f'the allowed {100 * self.max_fraction:.2f}% (--data.max_bad_fraction); first: '
                f'{", ".join(self.paths) or "(paths not known: see the log)"} (the log names every one with its '
                f'error). Fix or remove them, or raise the threshold.')

    def state_dict(self) -> Dict[str, Any]:
        return {'bad': self.bad, 'seen': self.seen, 'paths': list(self.paths)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.bad, self.seen = int(state.get('bad', 0)), int(state.get('seen', 0))
        self.paths = list(state.get('paths', []))

