"""Detection data in the COCO 2017 layout: torchvision's ``CocoDetection`` with transforms v2, and a
generator of a small real detection set made of Fashion-MNIST items.

Layout (COCO's own, read and written here)::

    ROOT/annotations/instances_train2017.json   ROOT/train2017/*.jpg|png
    ROOT/annotations/instances_val2017.json     ROOT/val2017/*.jpg|png

Targets are torchvision's detection convention: ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY, pixels),
``labels`` (the raw COCO ``category_id``, so a detector has ``max(category_id) + 1`` classes, class 0
unused, as torchvision's COCO models) and ``image_id``.

The Fashion-MNIST set (:func:`make_fmnist_coco`): each canvas holds a few items of the Debian package
``dataset-fashion-mnist`` (train split -> ``train2017``, test split -> ``val2017``), each resized by a
random factor, placed without overlap, pasted with ``max`` on a black canvas; the box is the tight
box of the item's pixels above ``PIXEL_THRESHOLD``; category ids 1..10 follow ``FMNIST_CLASSES``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ['SPLITS', 'ann_file', 'image_dir', 'check_coco_root', 'coco_num_classes', 'CocoDetectionSet',
           'train_transform', 'eval_transform', 'detection_collate', 'make_fmnist_coco', 'PIXEL_THRESHOLD',
           'validate_coco']

log = logging.getLogger(__name__)

SPLITS = ('train', 'val')
PIXEL_THRESHOLD = 16  # uint8 level above which a pixel belongs to the item (its tight box)


def ann_file(root: str | Path, split: str) -> Path:
    return Path(root) / 'annotations' / f'instances_{split}2017.json'


def image_dir(root: str | Path, split: str) -> Path:
    return Path(root) / f'{split}2017'


def check_coco_root(root: str | Path, split: str) -> None:
    """Fail with the expected layout when ``root`` lacks the ``split`` annotation file or image folder."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ann, img = ann_file(root, split), image_dir(root, split)
    missing = [str(p) for p in (ann, img) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f'COCO data not found: missing {", ".join(missing)}. Expected the COCO 2017 layout '
            f'ROOT/annotations/instances_{{train,val}}2017.json and ROOT/{{train,val}}2017/; download COCO 2017 '
            f'or generate the Fashion-MNIST set with `python -m visionpe.det.make_fmnist_coco {root}`')


def coco_num_classes(root: str | Path, split: str = 'val') -> int:
    """Number of detector classes: ``max(category_id) + 1`` (91 for COCO, 11 for Fashion-MNIST)."""
    check_coco_root(root, split)
    with open(ann_file(root, split)) as f:
        cats = json.load(f).get('categories', [])
    if not cats:
        raise ValueError(f'{ann_file(root, split)} has no categories')
    return max(int(c['id']) for c in cats) + 1


# ---------------------------------------------------------------------------------------------- transforms
def train_transform(lsj_size: Optional[int] = None, lsj_scale: Tuple[float, float] = (0.1, 2.0),
                    hflip: float = 0.5):
    """Training transform (transforms v2, boxes follow the image): horizontal flip and, with ``lsj_size``,
    large-scale jitter as in ViTDet / Copy-Paste (Ghiasi et al. 2021): rescale the image so that it fits
    ``lsj_size`` times a factor in ``lsj_scale``, then crop or pad to ``lsj_size`` squared; boxes cut to
    nothing are dropped (``SanitizeBoundingBoxes``)."""
    from torchvision.transforms import v2
    ops: List[Any] = [v2.ToImage()]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if lsj_size:
        ops += [v2.ScaleJitter(target_size=(lsj_size, lsj_size), scale_range=tuple(lsj_scale), antialias=True),
                v2.RandomCrop(lsj_size, pad_if_needed=True)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(ops)


def eval_transform():
    """Evaluation transform: the image as float in [0, 1] at its own size (the detector's transform
    resizes to the test size and maps the boxes back to the original pixels)."""
    from torchvision.transforms import v2
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def _ids(items: list[tuple], n: int = 5) -> str:
    return ', '.join(str(x) for x in items[:n]) + (f' and {len(items) - n} more' if len(items) > n else '')


def validate_coco(coco: Any, image_ids: Sequence[int], image_root: Path, ann_path: Path) -> dict[str, int]:
    """Check a COCO annotation set when a dataset is built, and repair its boxes in place.

    Errors (nothing can be trained or scored with them), naming the ids: an annotation whose ``category_id``
    is not in ``categories`` (``ValueError``); an image of ``image_ids`` whose file is missing
    (``FileNotFoundError``). Repairs, logged with their count and first annotation ids: a box
    (``[x, y, w, h]``) that runs past its image is clipped to it; one with ``w <= 0`` or ``h <= 0``, a
    non-finite value, or wholly outside its image is dropped. Returns ``{'clipped': n, 'dropped': m}``.
    """
    cats = set(coco.cats)
    unknown = [a for a in coco.dataset.get('annotations', []) if a.get('category_id') not in cats]
    if unknown:
        raise ValueError(f'{ann_path}: {len(unknown)} annotation(s) with a category_id that is not among its '
                         f'categories {sorted(cats)}: ' + _ids([f'annotation id {a["id"]} (image id {a["image_id"]}, '
                                                                f'category_id {a.get("category_id")})' for a in unknown])
                         + '; fix their category_id or add the category to "categories"')
    missing = [i for i in image_ids if not (image_root / coco.imgs[i]['file_name']).is_file()]
    if missing:
        raise FileNotFoundError(f'{ann_path}: {len(missing)} image file(s) missing from {image_root}: '
                                + _ids([f'image id {i} ({coco.imgs[i]["file_name"]})' for i in missing])
                                + '; restore the files or remove these images from the annotation file')
    kept, clipped, dropped = [], [], []
    for a in coco.dataset.get('annotations', []):
        img = coco.imgs.get(a['image_id'], {})
        x, y, w, h = (float(v) for v in a['bbox'])
        x1, y1 = x + w, y + h
        if 'width' in img and 'height' in img:
            x1, y1 = min(x1, float(img['width'])), min(y1, float(img['height']))
        x0, y0 = max(x, 0.0), max(y, 0.0)
        if not all(map(math.isfinite, (x, y, w, h))) or w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
            dropped.append(a['id'])
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            clipped.append(a['id'])
            new = [x0, y0, x1 - x0, y1 - y0]
            a = {**a, 'bbox': new, 'area': float(a.get('area', w * h)) * (new[2] * new[3]) / (w * h)}
        kept.append(a)
    if clipped or dropped:
        log.warning('%s: %d box%s clipped to its image, %d dropped (width or height <= 0, not finite, or outside the '
                    'image); clipped annotation ids %s, dropped annotation ids %s', ann_path, len(clipped),
                    '' if len(clipped) == 1 else 'es', len(dropped), clipped[:10], dropped[:10])
        coco.dataset['annotations'] = kept
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints 'creating index...'
            coco.createIndex()
    return {'clipped': len(clipped), 'dropped': len(dropped)}


class CocoDetectionSet(torch.utils.data.Dataset):
    """``torchvision.datasets.CocoDetection`` wrapped for transforms v2; every item is ``(image, target)``
    with ``target = {'boxes', 'labels', 'image_id'}`` (empty ``boxes`` of shape (0, 4) for an image
    without annotations). ``max_images`` keeps the first images of the annotation file (sorted ids).
    The annotations are checked when the set is built (:func:`validate_coco`): ``repairs`` counts the boxes
    clipped and dropped."""

    def __init__(self, root: str | Path, split: str, transforms=None, max_images: Optional[int] = None) -> None:
        from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
        check_coco_root(root, split)
        self.root, self.split = Path(root), split
        base = CocoDetection(str(image_dir(root, split)), str(ann_file(root, split)), transforms=transforms)
        if max_images is not None:
            if max_images < 1:
                raise ValueError(f'max_images must be positive or None, got {max_images}')
            base.ids = base.ids[:max_images]
        self.coco = base.coco
        self.ids: List[int] = list(base.ids)
        self.repairs = validate_coco(self.coco, self.ids, image_dir(root, split), ann_file(root, split))
        self.ds = wrap_dataset_for_transforms_v2(base, target_keys=('boxes', 'labels', 'image_id'))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        from torchvision import tv_tensors
        image, target = self.ds[i]
        if 'boxes' not in target:  # no annotation: torchvision leaves the keys out
            h, w = image.shape[-2:]
            target['boxes'] = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format='XYXY', canvas_size=(h, w))
            target['labels'] = torch.zeros(0, dtype=torch.int64)
        return image, target


def detection_collate(batch: Sequence[Tuple[torch.Tensor, Dict[str, Any]]]):
    """Lists of images (sizes may differ) and targets, as torchvision detectors take them."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# ---------------------------------------------------------------------------------------------- generator
def _place(rng: np.random.Generator, canvas: int, sizes: List[int], taken: List[Tuple[int, int, int, int]],
           tries: int = 50) -> List[Tuple[int, int, int]]:
    """Top-left corners for squares of ``sizes`` on the canvas, avoiding overlap (rejection sampling)."""
    out = []
    for s in sizes:
        for _ in range(tries):
            y, x = int(rng.integers(0, canvas - s + 1)), int(rng.integers(0, canvas - s + 1))
            if all(y + s <= ty or ty + ts <= y or x + s <= tx or tx + ts <= x for ty, tx, ts, _ in taken):
                taken.append((y, x, s, 0))
                out.append((y, x, s))
                break
    return out


def _render(items: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, canvas: int,
            n_items: Tuple[int, int], item_size: Tuple[int, int]):
    """One canvas (uint8, canvas x canvas) and its annotations [(category_id, [x, y, w, h])]."""
    img = torch.zeros(canvas, canvas, dtype=torch.uint8)
    n = int(rng.integers(n_items[0], n_items[1] + 1))
    sizes = [int(rng.integers(item_size[0], item_size[1] + 1)) for _ in range(n)]
    anns = []
    for (y, x, s) in _place(rng, canvas, sizes, []):
        j = int(rng.integers(0, items.shape[0]))
        item = F.interpolate(items[j][None, None].float(), size=(s, s), mode='bilinear', align_corners=False,
                             antialias=s < 28)[0, 0].round().clamp_(0, 255).to(torch.uint8)
        img[y:y + s, x:x + s] = torch.maximum(img[y:y + s, x:x + s], item)
        ys, xs = torch.nonzero(item > PIXEL_THRESHOLD, as_tuple=True)
        if ys.numel() == 0:
            continue
        x0, y0 = x + int(xs.min()), y + int(ys.min())
        w, h = int(xs.max()) - int(xs.min()) + 1, int(ys.max()) - int(ys.min()) + 1
        anns.append((int(labels[j]) + 1, [float(x0), float(y0), float(w), float(h)]))
    return img, anns


def make_fmnist_coco(root: str | Path, n_train: int = 2000, n_val: int = 500, canvas: int = 128,
                     n_items: Tuple[int, int] = (1, 4), item_size: Tuple[int, int] = (20, 56), seed: int = 0,
                     fmnist_root: Optional[str] = None) -> Path:
    """Write the Fashion-MNIST detection set to ``root`` in the COCO 2017 layout and return ``root``.

    ``n_train`` / ``n_val`` canvases of ``canvas`` x ``canvas`` px (grayscale PNG) hold ``n_items`` (min, max)
    items each, every item resized to a side in ``item_size`` px (28 px originals), placed without overlap.
    Deterministic in ``seed``."""
    from PIL import Image

    from ..data.fashion_mnist import FMNIST_CLASSES, load_fashion_mnist
    if not (1 <= n_items[0] <= n_items[1]):
        raise ValueError(f'n_items must be (min, max) with 1 <= min <= max, got {n_items}')
    if not (4 <= item_size[0] <= item_size[1] <= canvas):
        raise ValueError(f'item_size must be (min, max) with 4 <= min <= max <= canvas ({canvas}), got {item_size}')
    if n_train < 0 or n_val < 0 or n_train + n_val == 0:
        raise ValueError(f'n_train and n_val must be >= 0 and not both 0, got {n_train}, {n_val}')
    root = Path(root)
    categories = [dict(id=i + 1, name=name, supercategory='fashion') for i, name in enumerate(FMNIST_CLASSES)]
    ann_id = 1
    for split, n, fm_split, offset in (('train', n_train, 'train', 0), ('val', n_val, 'test', 1)):
        items, labels = load_fashion_mnist(fm_split, fmnist_root)
        rng = np.random.default_rng([seed, offset])
        out_dir = image_dir(root, split)
        out_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for k in range(n):
            img, anns = _render(items, labels, rng, canvas, n_items, item_size)
            image_id = k + 1
            name = f'{image_id:012d}.png'
            Image.fromarray(img.numpy()).save(out_dir / name)
            images.append(dict(id=image_id, file_name=name, height=canvas, width=canvas))
            for cat, box in anns:
                annotations.append(dict(id=ann_id, image_id=image_id, category_id=cat, bbox=box,
                                        area=box[2] * box[3], iscrowd=0))
                ann_id += 1
        path = ann_file(root, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = dict(description='Fashion-MNIST items on a canvas (visionpe.det.make_fmnist_coco)',
                    canvas=canvas, n_items=list(n_items), item_size=list(item_size), seed=seed)
        with open(path, 'w') as f:
            json.dump(dict(info=info, images=images, annotations=annotations, categories=categories), f)
    return root
