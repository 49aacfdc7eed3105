"""Fashion-MNIST (Xiao et al. 2017) from the Debian package ``dataset-fashion-mnist``, kept in memory.

The four IDX files (``train-images-idx3-ubyte.gz`` ...) are read once into uint8 tensors
(60k + 10k images of 28 x 28, 55 MB); batches are index lookups and the augmentation runs batched
on tensors (:mod:`visionpe.data.transforms`), so loading costs nothing next to the model.

Convention: the grayscale item is repeated to 3 channels and normalised with the training-set
pixel statistics ``FMNIST_MEAN`` / ``FMNIST_STD`` (0.2860 / 0.3530, the same for the 3 channels).
At evaluation the whole 28 x 28 image is resized to the target size (bilinear, antialiased when
shrinking): the item fills the frame at every resolution, so a model trained at 32 px and tested
at 64 px sees the same item twice as many tokens across (see :func:`eval_transform`).
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .transforms import Size, normalize_batch, resize_batch

__all__ = ['FMNIST_DIR', 'FMNIST_MEAN', 'FMNIST_STD', 'FMNIST_CLASSES', 'load_fashion_mnist', 'eval_transform',
           'FashionMNISTBatches', 'FashionMNISTTest', 'fmnist_test_loader', 'subset_indices', 'resolve_root']

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
ENV_DIR = 'VISIONPE_FMNIST_DIR'
FMNIST_MEAN: Tuple[float, float, float] = (0.2860, 0.2860, 0.2860)
FMNIST_STD: Tuple[float, float, float] = (0.3530, 0.3530, 0.3530)
FMNIST_CLASSES: List[str] = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                             'Bag', 'Ankle boot']
_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
          'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}


def resolve_root(root: Optional[str] = None) -> Path:
    """``root``, else ``$VISIONPE_FMNIST_DIR``, else the Debian package's folder."""
    return Path(root or os.environ.get(ENV_DIR) or FMNIST_DIR)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + '.gz', stem):
        if (root / name).is_file():
            return root / name
    expected = ', '.join(f'{a}.gz' for pair in _FILES.values() for a in pair)
    raise FileNotFoundError(
        f'Fashion-MNIST not found: {root / (stem + ".gz")} does not exist. Install the Debian package with '
        f'`sudo apt-get install dataset-fashion-mnist` (files go to {FMNIST_DIR}), or pass --data.root DIR '
        f'(or set ${ENV_DIR}) to a folder holding {expected} (gzipped or not).')


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format: magic, dims as big-endian int32, then uint8 data)."""
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f'{path} is not an IDX file of unsigned bytes (bad magic {data[:4]!r})')
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise ValueError(f'{path}: header says {dims} but holds {len(data) - offset} bytes (truncated file?)')
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load(root: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    img_stem, lbl_stem = _FILES[split]
    images = torch.from_numpy(read_idx(_find(Path(root), img_stem)).copy())
    labels = torch.from_numpy(read_idx(_find(Path(root), lbl_stem)).astype(np.int64))
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f'Fashion-MNIST {split} in {root}: {tuple(images.shape)} images for '
                         f'{tuple(labels.shape)} labels (expected N x 28 x 28 and N)')
    return images, labels


def load_fashion_mnist(split: str = 'train', root: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of ``split`` in ``{'train', 'test'}`` (cached)."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    return _load(str(resolve_root(root)), split)


def eval_transform(img_size: Size, mean: Sequence[float] = FMNIST_MEAN, std: Sequence[float] = FMNIST_STD):
    """uint8 images (B, 28, 28) or (B, 1, 28, 28) -> float (B, 3, H, W): resize the whole image, normalise."""
    def apply(images: torch.Tensor) -> torch.Tensor:
        x = images.unsqueeze(1) if images.dim() == 3 else images
        x = x.float().div_(255)
        return normalize_batch(resize_batch(x, img_size), mean, std)
    return apply


class FashionMNISTBatches(torch.utils.data.Dataset):
    """Batch lookups into in-memory tensors: ``ds[[(index, seed), ...]]`` ->
    ``{'image': uint8 (B, 28, 28), 'label': (B,), 'seed': seed of the batch}``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, items: List[Tuple[int, int]]):
        idx = torch.tensor([i for i, _ in items], dtype=torch.long)
        return {'image': self.images[idx], 'label': self.labels[idx],
                'seed': torch.tensor(items[0][1] if items else 0, dtype=torch.long)}


def subset_indices(n_total: int, subset: Optional[int], seed: int = 0) -> torch.Tensor:
    """The fixed test subset: the first ``subset`` of a permutation drawn with ``seed`` (all if None)."""
    if subset is None or subset >= n_total:
        return torch.arange(n_total)
    if subset <= 0:
        raise ValueError(f'subset must be positive, got {subset}')
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:subset].sort().values


class FashionMNISTTest:
    """The Fashion-MNIST test set at ``img_size``: yields ``(x float (B, 3, H, W) normalised, y (B,))``.

    ``subset`` keeps a fixed subset (see :func:`subset_indices`); ``device`` moves each batch
    before resizing. Re-iterable, ``len()`` is the number of batches.
    """

    def __init__(self, img_size: Size, batch_size: int = 256, subset: Optional[int] = None,
                 root: Optional[str] = None, device: Optional[torch.device] = None,
                 mean: Sequence[float] = FMNIST_MEAN, std: Sequence[float] = FMNIST_STD) -> None:
        images, labels = load_fashion_mnist('test', root)
        idx = subset_indices(images.shape[0], subset)
        self.images, self.labels = images[idx], labels[idx]
        self.batch_size, self.device = batch_size, device
        self.transform = eval_transform(img_size, mean, std)

    def __len__(self) -> int:
        return -(-self.images.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.images.shape[0], self.batch_size):
            x, y = self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size]
            if self.device is not None:
                x, y = x.to(self.device), y.to(self.device)
            yield self.transform(x), y


def fmnist_test_loader(img_size: Size, batch_size: int = 256, subset: Optional[int] = None,
                       root: Optional[str] = None, device: Optional[torch.device] = None) -> FashionMNISTTest:
    """The Fashion-MNIST test set (or its fixed ``subset``) at ``img_size``, in the evaluation convention."""
    return FashionMNISTTest(img_size, batch_size=batch_size, subset=subset, root=root, device=device)
