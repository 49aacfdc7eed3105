"""Evaluation data at one resolution: an image folder or the Fashion-MNIST test set.

* Image folder (ImageNet val, ImageNet-HR, ImageNet-V2, any ``ROOT/<class>/<image>`` layout): resize the
  short side to ``r / crop_ratio`` and centre-crop ``r`` (timm's eval transform; ``crop_ratio`` 1.0 as in
  RoPE-ViT, 0.875 as in timm / DeiT). Classes are the sorted sub-folder names (ImageNet's synset order).
* ``fmnist``: the training convention of :func:`visionpe.data.fashion_mnist.eval_transform`: the whole
  28 x 28 image resized to ``r`` (no crop: the item fills the frame at every resolution), so
  ``crop_ratio`` does not apply.

Sizes are ``(height, width)``: :func:`parse_size` reads ``N`` (square) or ``HxW``. A non-square size on an
image folder centre-crops each image to the size's aspect ratio (the largest such crop, times
``crop_ratio``) and resizes that crop to exactly ``H x W`` (no distortion, one shape per batch); a square
size is timm's transform above, unchanged. ``keep_aspect`` (``--keep-aspect``) is the aspect-preserving mode
of an image folder: a size ``N`` is the shorter side, nothing is cropped, the longer side becomes ``N`` times
the image's aspect ratio rounded to a multiple of the models' patch size (:func:`short_side_shape`), and
images are batched by shape (results still in test-set order).

``max_images`` keeps a fixed subset (the same images at every resolution and for every model:
:func:`visionpe.data.fashion_mnist.subset_indices`). :class:`EvalImages` serves it per resolution; an
image folder's unreadable files (corrupt, empty, truncated) are skipped, counted and listed, and the run
stops once they are more than ``max_bad_fraction`` of the subset (as training does,
:mod:`visionpe.data.imagefolder`).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

__all__ = ['DataSpec', 'parse_data', 'FMNIST', 'num_classes_of', 'EvalImages', 'Size', 'parse_size', 'size_text',
           'size_value', 'size_order', 'short_side_shape']

log = logging.getLogger(__name__)

FMNIST = 'fmnist'
FMNIST_TEST_IMAGES = 10_000
_PREFIXES = ('imagenet', 'folder', 'imagefolder', 'coco')
_SIZE = re.compile(r'^(\d+)(?:x(\d+))?$')
Size = tuple[int, int]


def parse_size(text: str | int | Sequence[int]) -> Size:
    """``'64'`` or ``64`` -> (64, 64); ``'48x64'`` -> (48, 64) (height x width); an (h, w) pair as it is."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        return int(text[0]), int(text[1])
    m = _SIZE.match(str(text).strip())
    if not m:
        raise ValueError(f'bad size {text!r}: use N (square) or HxW, e.g. 64 or 48x64')
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def size_text(size: Size) -> str:
    """(48, 64) -> ``'48x64'`` (every size, square ones included)."""
    return f'{size[0]}x{size[1]}'


def size_value(size: Size) -> int | str:
    """A row's ``resolution``: the int ``N`` for a square size (as rows always had), ``'HxW'`` otherwise."""
    return size[0] if size[0] == size[1] else size_text(size)


def size_order(size: Size | str | int) -> tuple[int, int]:
    """Sort key of sizes in reports: by area, then height."""
    h, w = parse_size(size)
    return h * w, h


@dataclass(frozen=True)
class DataSpec:
    kind: str            # 'fmnist' | 'folder' | 'coco'
    root: str | None  # folder (None: Fashion-MNIST's default location)

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


class _Readable(torch.utils.data.Dataset):
    """Items ``(image, label, index, None)``, or ``(None, -1, index, error)`` for an unreadable image.
    ``transform``: one for every image, or a mapping index -> transform (the aspect-preserving mode)."""

    def __init__(self, folder: Any, indices: Sequence[int], transform: Any):
        self.folder, self.indices, self.transform = folder, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from ..data.imagefolder import READ_ERRORS
        index = self.indices[i]
        path, label = self.folder.samples[index]
        tf = self.transform[index] if isinstance(self.transform, dict) else self.transform
        try:
            return tf(self.folder.loader(path)), label, index, None
        except READ_ERRORS as e:
            return None, -1, index, f'{type(e).__name__}: {e}'


def _collate(items):
    good = [(x, y, index) for x, y, index, err in items if err is None]
    bad = [(index, err) for _, _, index, err in items if err is not None]
    x = torch.stack([g[0] for g in good]) if good else None
    return x, torch.tensor([g[1] for g in good], dtype=torch.long), [g[2] for g in good], bad


def short_side_shape(width: int, height: int, short: int, multiple: int) -> Size:
    """``(h, w)`` of an image of ``width x height`` in the aspect-preserving mode: the shorter side ``short``
    (a multiple of ``multiple``), the longer side ``short * long / short_side`` rounded to the nearest multiple
    of ``multiple`` (at least one): the aspect ratio is kept up to half a patch on the longer side."""
    if short % multiple:
        raise ValueError(f'--keep-aspect: the shorter side {short} is not a multiple of {multiple}')
    lo, hi = min(width, height), max(width, height)
    long = max(multiple, round(short * hi / lo / multiple) * multiple)
    return (short, long) if height <= width else (long, short)


def folder_transform(size: Size, mean: Sequence[float], std: Sequence[float], interpolation: str = 'bicubic',
                     crop_ratio: float = 1.0):
    """Image-folder evaluation transform at ``size`` (h, w): square sizes timm's (short side to
    ``r / crop_ratio``, centre crop ``r``); non-square ones the centre crop of the image's largest region of
    aspect ``h : w`` (times ``crop_ratio``) resized to exactly ``h x w``."""
    from ..data.transforms import create_imagenet_transform
    h, w = size
    if h == w:
        return create_imagenet_transform(False, h, mean, std, interpolation=interpolation, crop_pct=crop_ratio)
    from torchvision import transforms as T
    mode = T.InterpolationMode(interpolation)
    return T.Compose([_AspectCrop(h / w, crop_ratio), T.Resize((h, w), interpolation=mode, antialias=True),
                      T.ToTensor(), T.Normalize(mean, std)])


class _AspectCrop:
    """Centre crop of a PIL image to aspect ``ratio`` (height / width), the largest such region times
    ``crop_ratio`` per side."""

    def __init__(self, ratio: float, crop_ratio: float = 1.0):
        self.ratio, self.crop_ratio = ratio, crop_ratio

    def __call__(self, img):
        iw, ih = img.size
        ch, cw = (ih, ih / self.ratio) if ih / iw <= self.ratio else (iw * self.ratio, iw)
        ch, cw = max(1, math.floor(ch * self.crop_ratio)), max(1, math.floor(cw * self.crop_ratio))
        top, left = (ih - ch) // 2, (iw - cw) // 2
        return img.crop((left, top, left + cw, top + ch))


class EvalImages:
    """The evaluation subset of ``spec``, batched at any resolution; unreadable images of a folder are
    skipped (each read once: later passes leave them out), counted and listed (:meth:`report`), and more
    than ``max_bad_fraction`` of them is an error."""

    def __init__(self, spec: DataSpec, max_images: int | None, batch_size: int, crop_ratio: float = 1.0,
                 workers: int = 0, max_bad_fraction: float = 0.001, keep_aspect: bool = False):
        from ..data.fashion_mnist import subset_indices
        if not 0 < crop_ratio <= 1:
            raise ValueError(f'--crop-ratio must be in (0, 1], got {crop_ratio}')
        if keep_aspect and spec.kind != 'folder':
            raise ValueError('--keep-aspect is for image folders: Fashion-MNIST images are square (28x28) and '
                             '--task coco keeps the aspect ratio already; drop the option')
        if keep_aspect and crop_ratio != 1.0:
            raise ValueError('--keep-aspect crops nothing (the shorter side is resized to each size); drop --crop-ratio')
        self.spec, self.max_images, self.batch_size = spec, max_images, batch_size
        self.crop_ratio, self.workers, self.max_bad_fraction = crop_ratio, workers, max_bad_fraction
        self.keep_aspect = keep_aspect
        self.multiple = 1  # keep_aspect: longer sides are rounded to this (the lcm of the models' patch sizes)
        self.order: list[int] = []  # the image indices of the last pass, in the order they were yielded
        self._dims: dict[int, tuple[int, int]] | None = None  # keep_aspect: index -> (width, height)
        self.unreadable: dict[int, str] = {}  # index -> error
        if spec.kind == FMNIST:
            self.folder = None
            self.n_requested = min(max_images, FMNIST_TEST_IMAGES) if max_images else FMNIST_TEST_IMAGES
        else:
            from torchvision.datasets import ImageFolder
            self.folder = ImageFolder(spec.root)
            self.indices = subset_indices(len(self.folder), max_images).tolist()
            self.n_requested = len(self.indices)

    @property
    def n_unreadable(self) -> int:
        return len(self.unreadable)

    def batches(self, size: Size, mean: Sequence[float], std: Sequence[float],
                interpolation: str = 'bicubic') -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images (B, 3, h, w), labels)`` of the readable images, in test-set order (``keep_aspect``: grouped
        by shape; :attr:`order` then lists the image indices in the order they came)."""
        size = parse_size(size)
        self.order = []
        if self.folder is None:
            from ..data.fashion_mnist import FashionMNISTTest
            yield from FashionMNISTTest(size, batch_size=self.batch_size, subset=self.max_images, root=self.spec.root,
                                        mean=mean, std=std)
            return
        if self.keep_aspect:
            ds, sampler = self._by_shape(size, mean, std, interpolation)
            loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=self.workers,
                                                 collate_fn=_collate)
        else:
            tf = folder_transform(size, mean, std, interpolation, self.crop_ratio)
            ds = _Readable(self.folder, [i for i in self.indices if i not in self.unreadable], tf)
            loader = torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=False,
                                                 num_workers=self.workers, collate_fn=_collate)
        for x, y, good, bad in loader:
            for index, err in bad:
                log.warning('skipping unreadable image %s: %s', self.folder.samples[index][0], err)
                self.unreadable[index] = err
            self._check()
            if x is not None:
                self.order.extend(good)
                yield x, y

    def _by_shape(self, size: Size, mean: Sequence[float], std: Sequence[float], interpolation: str):
        """Dataset and batch sampler of the aspect-preserving mode: each image's own shape at shorter side
        ``size``, batches of one shape (shapes in sorted order, images in test-set order within each)."""
        from torchvision import transforms as T
        if size[0] != size[1]:
            raise ValueError(f'--keep-aspect: sizes are the shorter side of each image; give N, not {size_text(size)}')
        shapes = {i: short_side_shape(w, h, size[0], self.multiple) for i, (w, h) in self._image_dims().items()
                  if i not in self.unreadable}
        order = sorted(shapes, key=lambda i: shapes[i])  # stable: test-set order within a shape
        mode = T.InterpolationMode(interpolation)
        tfs = {hw: T.Compose([T.Resize(hw, interpolation=mode, antialias=True), T.ToTensor(), T.Normalize(mean, std)])
               for hw in set(shapes.values())}
        batches: list[list[int]] = []
        for pos, i in enumerate(order):
            if not batches or len(batches[-1]) == self.batch_size or shapes[order[batches[-1][0]]] != shapes[i]:
                batches.append([])
            batches[-1].append(pos)
        return _Readable(self.folder, order, {i: tfs[shapes[i]] for i in order}), batches

    def _image_dims(self) -> dict[int, tuple[int, int]]:
        """``(width, height)`` of every image of the subset, from its header (read once); an image whose
        header cannot be read is unreadable."""
        if self._dims is None:
            from PIL import Image

            from ..data.imagefolder import READ_ERRORS
            log.info('--keep-aspect: reading the sizes of %d images from their headers', len(self.indices))
            self._dims = {}
            for i in self.indices:
                if i in self.unreadable:
                    continue
                path = self.folder.samples[i][0]
                try:
                    with Image.open(path) as im:
                        self._dims[i] = im.size
                except READ_ERRORS as e:
                    log.warning('skipping unreadable image %s: %s', path, e)
                    self.unreadable[i] = f'{type(e).__name__}: {e}'
            self._check()
        return self._dims

    def in_test_set_order(self, per_image: Sequence[Any]) -> list[Any]:
        """Per-image results of the last pass (in :attr:`order`) rearranged into test-set order."""
        if self.folder is None or not self.keep_aspect:
            return list(per_image)
        rank = {index: pos for pos, index in enumerate(self.indices)}
        return [per_image[j] for j in sorted(range(len(self.order)), key=lambda j: rank[self.order[j]])]

    def _check(self) -> None:
        from ..data.imagefolder import BadDataError
        n, bad = self.n_requested, self.n_unreadable
        if bad / n > self.max_bad_fraction:
            first = '; '.join(self.folder.samples[i][0] for i in sorted(self.unreadable)[:5])
            raise BadDataError(f'{bad} of {n} images in {self.spec.root} ({100 * bad / n:.2f}%) could not be read, '
                               f'more than the allowed {100 * self.max_bad_fraction:.2f}% (--max-bad-fraction); '
                               f'first: {first}. Fix or remove them, or raise the limit')

    def report(self) -> dict[str, Any]:
        """For ``results.json``: how many images could not be read, and which (path and error)."""
        n = self.n_requested
        return dict(count=self.n_unreadable, fraction=self.n_unreadable / n if n else 0.0,
                    max_fraction=self.max_bad_fraction,
                    images=[dict(path=self.folder.samples[i][0], error=e) for i, e in sorted(self.unreadable.items())])
