"""Evaluation data at one resolution: an image folder or the Fashion-MNIST test set.

* Image folder (ImageNet val, ImageNet-HR, ImageNet-V2, any ``ROOT/<class>/<image>`` layout): resize the
  short side to ``r / crop_ratio`` and centre-crop ``r`` (timm's eval transform; ``crop_ratio`` 1.0 as in
  RoPE-ViT, 0.875 as in timm / DeiT). Classes are the sorted sub-folder names (ImageNet's synset order).
* ``fmnist``: the training convention of :func:`visionpe.data.fashion_mnist.eval_transform`: the whole
  28 x 28 image resized to ``r`` (no crop: the item fills the frame at every resolution), so
  ``crop_ratio`` does not apply.

``max_images`` keeps a fixed subset (the same images at every resolution and for every model:
:func:`visionpe.data.fashion_mnist.subset_indices`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import torch

__all__ = ['DataSpec', 'parse_data', 'FMNIST', 'num_classes_of', 'eval_batches']

FMNIST = 'fmnist'
_PREFIXES = ('imagenet', 'folder', 'imagefolder', 'coco')


@dataclass(frozen=True)
class DataSpec:
    kind: str            # 'fmnist' | 'folder' | 'coco'
    root: Optional[str]  # folder (None: Fashion-MNIST's default location)

    def describe(self) -> str:
        return 'Fashion-MNIST test set' if self.kind == FMNIST else f'{self.kind} {self.root}'


def parse_data(value: str, task: str = 'cls') -> DataSpec:
    """``fmnist`` | ``fmnist:DIR`` | ``PATH`` | ``imagenet:PATH`` / ``folder:PATH`` | ``coco:PATH``."""
    head, sep, rest = value.partition(':')
    if head in ('fmnist', 'fashion_mnist'):
        if task != 'cls':
            raise ValueError(f'--data {value}: Fashion-MNIST is a classification set; --task {task} needs a '
                             f'COCO-layout folder')
        root = rest or None
        if root is not None and not Path(root).is_dir():
            raise FileNotFoundError(f'--data {value}: folder {root} does not exist (it should hold the '
                                    f'Fashion-MNIST IDX files t10k-images-idx3-ubyte.gz, ...)')
        return DataSpec(FMNIST, root)
    path = rest if sep and head in _PREFIXES else value
    if not Path(path).is_dir():
        layout = ('COCO_ROOT/annotations/instances_val2017.json and COCO_ROOT/val2017/' if task == 'coco'
                  else 'an image folder PATH/<class>/<image> (e.g. ImageNet val with one folder per synset)')
        raise FileNotFoundError(f'--data {value}: dataset path {path} does not exist; expected {layout}, '
                                f'or --data fmnist for the Fashion-MNIST test set')
    if task == 'coco':
        return DataSpec('coco', path)
    if not any(p.is_dir() for p in Path(path).iterdir()):
        raise FileNotFoundError(f'--data {value}: {path} has no class sub-folders; expected {path}/<class>/<image>')
    return DataSpec('folder', path)


def num_classes_of(spec: DataSpec) -> int:
    if spec.kind == FMNIST:
        return 10
    return sum(1 for p in Path(spec.root).iterdir() if p.is_dir())


def eval_batches(spec: DataSpec, size: int, batch_size: int, max_images: Optional[int],
                 mean: Sequence[float], std: Sequence[float], crop_ratio: float = 1.0,
                 interpolation: str = 'bicubic', workers: int = 0) -> Tuple[Iterable, int]:
    """``(iterable of (images (B, 3, size, size), labels), number of images)``."""
    from ..data.fashion_mnist import subset_indices
    if spec.kind == FMNIST:
        from ..data.fashion_mnist import FashionMNISTTest
        ds = FashionMNISTTest(size, batch_size=batch_size, subset=max_images, root=spec.root, mean=mean, std=std)
        return ds, int(ds.images.shape[0])
    from torchvision.datasets import ImageFolder

    from ..data.transforms import create_imagenet_transform
    if not 0 < crop_ratio <= 1:
        raise ValueError(f'--crop-ratio must be in (0, 1], got {crop_ratio}')
    tf = create_imagenet_transform(False, size, mean, std, interpolation=interpolation, crop_pct=crop_ratio)
    folder = ImageFolder(spec.root, transform=tf)
    idx = subset_indices(len(folder), max_images)
    ds = torch.utils.data.Subset(folder, idx.tolist())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    return loader, len(ds)
