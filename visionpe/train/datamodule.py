"""One LightningDataModule for the three data sources: ``fashion_mnist`` (in memory, batched tensor
augmentation on the device), ``imagefolder`` and ``webdataset`` (ImageNet; timm's per-image
``create_transform`` in DataLoader workers).

Training batches come from a :class:`visionpe.data.ResumableLoader`: the order and every augmentation
are functions of ``(seed, epoch, position)``, each rank reads its own share (no distributed sampler
injection needed) and Lightning saves the loader position in the checkpoint, so a resumed run reads
exactly the batches an uninterrupted one would. The module always hands ``(images, labels)`` to the
LightningModule: raw Fashion-MNIST batches are augmented (train) or resized (eval) in
``on_after_batch_transfer``, and skipped-image counts are taken off the batch there.
"""
from __future__ import annotations

import copy

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import lightning.pytorch as pl
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, DistributedSampler

from ..data.device_loader import batch_loader, resident
from ..data.fashion_mnist import FMNIST_MEAN, FMNIST_STD, FashionMNISTBatches, load_fashion_mnist, subset_indices
from ..data.imagefolder import BadSampleMonitor, SafeImageFolder, check_image_folder, collate_skip_bad
from ..data.multires import MultiResolution, ScheduledBatches, ScheduledTransformSkipBad
from ..data.sampling import ResumableBatchSampler, ResumableLoader
from ..data.shards import ShardEvalStream, ShardStream
from ..data.transforms import BatchScaleAugment, create_imagenet_transform, normalize_batch, resize_batch

__all__ = ['ImageClassificationData', 'DATASETS']

log = logging.getLogger(__name__)
DATASETS = ('fashion_mnist', 'imagefolder', 'webdataset')


class _EvalShard(DistributedSampler):
    """Rank ``r`` of ``W`` reads indices ``r, r + W, ...`` once: no padding, so metrics count every image
    exactly once. A DistributedSampler subclass, so Lightning leaves it in place."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:  # noqa: D107 (no super().__init__: no dist)
        self.n, self.rank, self.num_replicas = n, rank, world_size
        self.epoch = 0

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


class ImageClassificationData(pl.LightningDataModule):
    """Image classification data for :class:`visionpe.train.VisionClassifier`.

    Args:
        dataset: ``fashion_mnist`` | ``imagefolder`` (ROOT/train, ROOT/val) | ``webdataset`` (tar shards).
        root: data folder (Fashion-MNIST: the IDX files, default the Debian package's folder;
            imagefolder: the folder holding train/ and val/; webdataset: a folder with train/ and val/
            shard folders, unless ``train_shards`` / ``val_shards`` are given).
        img_size: training (and validation) image size.
        batch_size: per device; ``eval_batch_size`` defaults to twice that.
        num_workers: DataLoader workers (0 for Fashion-MNIST: it needs none).
        seed: data order and augmentation seed.
        num_classes: inferred for fashion_mnist / imagefolder, required for webdataset.
        mean, std: normalisation (default: Fashion-MNIST statistics, or ImageNet's).
        val_size: Fashion-MNIST images held out of the 60k training set for validation (the last
            ``val_size`` of a fixed permutation); the 10k test set is the ``test`` split.
        train_subset, val_subset, test_subset: keep only the first N (a fixed subset) of a split.
        scale, ratio: random resized crop area / aspect ranges (both pipelines).
        canvas: Fashion-MNIST only: canvas side range, in item sides, on which the item is placed.
        hflip: horizontal flip probability.
        auto_augment, color_jitter, re_prob, interpolation, train_crop_mode, eval_crop_pct:
            ImageNet only, passed to ``timm.data.create_transform`` (``auto_augment='3a'`` is DeiT-III's
            3-Augment, ``'rand-m9-mstd0.5-inc1'`` RandAugment).
        train_shards, val_shards, train_samples: webdataset shard specs (folder, brace pattern) and the
            number of training samples (defines the epoch length).
        max_bad_fraction, bad_check_after: stop with an error when more than this fraction of the
            images could not be read (checked once ``bad_check_after`` were seen, and at epoch ends).
        multires_sizes, multires_range, multires_step: multi-resolution training (fashion_mnist, imagefolder):
            every training batch at one size from this list, or from ``lo, lo + step, ..., hi``; its batch size
            scaled by ``(img_size / size)^2`` (rounded to a multiple of ``multires_batch_multiple``) so tokens
            per batch stay about constant; validation and test stay at ``img_size``
            (:mod:`visionpe.data.multires`, timm's ScheduledBatchSampler; the same sizes on every DDP rank).
        multires_schedule, multires_schedule_epochs: ``uniform`` (each batch's size uniform over the set) or
            ``progressive`` (small to large over ``multires_schedule_epochs`` epochs, timm's curriculum).
        device_resident: Fashion-MNIST only: keep the whole dataset on the training device and look batches
            up there (:mod:`visionpe.data.device_loader`; the same images as the host path, for short GPU studies).
    """

    def __init__(
            self,
            dataset: str = 'fashion_mnist',
            root: Optional[str] = None,
            img_size: int = 32,
            batch_size: int = 128,
            eval_batch_size: Optional[int] = None,
            num_workers: int = 0,
            seed: int = 0,
            num_classes: Optional[int] = None,
            mean: Optional[Tuple[float, float, float]] = None,
            std: Optional[Tuple[float, float, float]] = None,
            val_size: int = 5000,
            train_subset: Optional[int] = None,
            val_subset: Optional[int] = None,
            test_subset: Optional[int] = None,
            scale: Tuple[float, float] = (0.08, 1.0),
            ratio: Tuple[float, float] = (0.75, 4 / 3),
            canvas: Tuple[float, float] = (1.0, 2.0),
            hflip: float = 0.5,
            auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1',
            color_jitter: float = 0.4,
            re_prob: float = 0.25,
            interpolation: str = 'bicubic',
            train_crop_mode: Optional[str] = None,
            eval_crop_pct: float = 0.875,
            train_shards: Optional[str] = None,
            val_shards: Optional[str] = None,
            train_samples: Optional[int] = None,
            shuffle_buffer: int = 1000,
            max_bad_fraction: float = 0.001,
            bad_check_after: int = 1000,
            pin_memory: bool = True,
            persistent_workers: bool = True,
            multires_sizes: Optional[List[int]] = None,
            multires_range: Optional[Tuple[int, int]] = None,
            multires_step: int = 8,
            multires_schedule: str = 'uniform',
            multires_schedule_epochs: Optional[int] = None,
            multires_batch_multiple: int = 2,
            device_resident: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f'data.dataset must be one of {DATASETS}, got {dataset!r}')
        if img_size <= 0 or batch_size <= 0:
            raise ValueError(f'img_size and batch_size must be positive, got {img_size} and {batch_size}')
        if num_workers < 0:
            raise ValueError(f'num_workers must be >= 0, got {num_workers}')
        self.save_hyperparameters()
        self.dataset, self.root, self.img_size = dataset, root, img_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.num_workers, self.seed = num_workers, seed
        default_mean, default_std = ((FMNIST_MEAN, FMNIST_STD) if dataset == 'fashion_mnist'
                                     else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
        self.mean = tuple(float(m) for m in (mean or default_mean))
        self.std = tuple(float(s) for s in (std or default_std))
        self._num_classes = num_classes
        self._given_num_classes = num_classes
        # the resolved values, so that Lightning's merge of model and data hparams (which reads the
        # *initial* hparams) sees the same ones as the model gets through the CLI links
        self._record_resolved(mean=self.mean, std=self.std)
        self.monitor = BadSampleMonitor(max_bad_fraction, bad_check_after)
        self._augment = BatchScaleAugment(img_size, scale, ratio, canvas, hflip) if dataset == 'fashion_mnist' else None
        self.multires = MultiResolution.from_options(
            multires_sizes, multires_range, multires_step, img_size=img_size, batch_size=batch_size,
            schedule=multires_schedule, schedule_epochs=multires_schedule_epochs,
            batch_multiple=multires_batch_multiple)
        if self.multires is not None and device_resident:
            raise ValueError('data.device_resident does not run multi-resolution batches yet (they would silently '
                             'take the host path): drop one of device_resident and multires_*')
        if self.multires is not None and dataset == 'webdataset':
            raise ValueError('multi-resolution batches need a map-style dataset (fashion_mnist or imagefolder); '
                             'webdataset streams cannot be scheduled per batch')
        self._size_augments = {s: BatchScaleAugment(s, scale, ratio, canvas, hflip) for s in self.multires.sizes} \
            if self.multires is not None and dataset == 'fashion_mnist' else {}
        self._splits: Dict[str, Any] = {}
        self._train_loader: Optional[ResumableLoader] = None
        self._pending_loader_state: Optional[Dict[str, Any]] = None
        if dataset == 'webdataset':
            if num_classes is None:
                raise ValueError('data.dataset=webdataset needs --data.num_classes (e.g. 1000 for ImageNet-1k)')
            if train_samples is None:
                raise ValueError('data.dataset=webdataset needs --data.train_samples (samples in the training '
                                 'shards, e.g. 1281167 for ImageNet-1k): it defines the epoch length')
        if device_resident and dataset != 'fashion_mnist':
            raise ValueError(f'data.device_resident keeps an in-memory dataset on the device: fashion_mnist only, '
                             f'not {dataset!r}')
        if dataset == 'imagefolder' and root is None:
            raise ValueError('data.dataset=imagefolder needs --data.root (the folder holding train/ and val/)')

    # ------------------------------------------------------------------ metadata
    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            if self.dataset == 'fashion_mnist':
                self._num_classes = 10
            else:  # imagefolder
                train = check_image_folder(self.root, 'train')
                self._num_classes = sum(1 for p in train.iterdir() if p.is_dir())
            self._record_resolved(num_classes=self._num_classes)
        return self._num_classes

    def _record_resolved(self, **values: Any) -> None:
        self.hparams.update(values)
        self._hparams_initial = copy.deepcopy(self._hparams)

    def _rank(self) -> Tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    # ------------------------------------------------------------------ datasets
    def setup(self, stage: Optional[str] = None) -> None:
        if self._splits:
            return
        if self.dataset == 'fashion_mnist':
            self._setup_fmnist()
        elif self.dataset == 'imagefolder':
            self._setup_imagefolder()
        else:
            self._setup_webdataset()

    def _subset(self, n: int, k: Optional[int]) -> torch.Tensor:
        return subset_indices(n, k, seed=self.seed)

    def _setup_fmnist(self) -> None:
        hp = self.hparams
        images, labels = load_fashion_mnist('train', self.root)
        perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(12345))
        if not 0 <= hp.val_size < images.shape[0]:
            raise ValueError(f'val_size must be in [0, {images.shape[0]}), got {hp.val_size}')
        train_idx, val_idx = perm[:images.shape[0] - hp.val_size], perm[images.shape[0] - hp.val_size:]
        train_idx = train_idx[self._subset(len(train_idx), hp.train_subset)]
        val_idx = val_idx[self._subset(len(val_idx), hp.val_subset)]
        t_images, t_labels = load_fashion_mnist('test', self.root)
        test_idx = self._subset(t_images.shape[0], hp.test_subset)
        self._splits = {'train': FashionMNISTBatches(images[train_idx], labels[train_idx]),
                        'val': FashionMNISTBatches(images[val_idx], labels[val_idx]) if len(val_idx) else None,
                        'test': FashionMNISTBatches(t_images[test_idx], t_labels[test_idx])}

    def _timm_transform(self, train: bool, img_size: Optional[int] = None):
        hp = self.hparams
        return create_imagenet_transform(
            train, img_size or self.img_size, self.mean, self.std, interpolation=hp.interpolation,
            auto_augment=hp.auto_augment, color_jitter=hp.color_jitter, re_prob=hp.re_prob, scale=hp.scale,
            ratio=hp.ratio, hflip=hp.hflip, train_crop_mode=hp.train_crop_mode, crop_pct=hp.eval_crop_pct)

    def _setup_imagefolder(self) -> None:
        hp = self.hparams
        train = SafeImageFolder(check_image_folder(self.root, 'train'), self._timm_transform(True))
        val = SafeImageFolder(check_image_folder(self.root, 'val'), self._timm_transform(False),
                              class_to_idx=train.class_to_idx)
        if self._given_num_classes is not None and self._given_num_classes != len(train.classes):
            raise ValueError(f'--data.num_classes {self._given_num_classes} but {self.root}/train has {len(train.classes)} '
                             f'class folders')
        self._splits = {'train': train, 'val': val, 'test': val,
                        'train_idx': self._subset(len(train), hp.train_subset),
                        'val_idx': self._subset(len(val), hp.val_subset),
                        'test_idx': self._subset(len(val), hp.test_subset)}

    def _shard_spec(self, given: Optional[str], split: str) -> str:
        if given:
            return given
        if self.root is None:
            raise ValueError(f'data.dataset=webdataset needs --data.{split}_shards or --data.root (with {split}/*.tar)')
        return str(Path(self.root) / split)

    def _setup_webdataset(self) -> None:
        self._splits = {'train': self._shard_spec(self.hparams.train_shards, 'train'),
                        'val': self._shard_spec(self.hparams.val_shards, 'val')}

    # ------------------------------------------------------------------ loaders
    def _loader_kwargs(self) -> Dict[str, Any]:
        nw = self.num_workers
        return dict(num_workers=nw, pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
                    persistent_workers=self.hparams.persistent_workers and nw > 0)

    def train_dataloader(self) -> ResumableLoader:
        loader = self._build_train_loader()
        if self._pending_loader_state is not None:
            loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        self._train_loader = loader
        return loader

    def _build_train_loader(self) -> ResumableLoader:
        self.setup('fit')
        rank, world = self._rank()
        if self.dataset == 'webdataset':
            stream = ShardStream(self._splits['train'], self.hparams.train_samples, self.batch_size,
                                 self._timm_transform(True), shuffle_buffer=self.hparams.shuffle_buffer,
                                 seed=self.seed, rank=rank, world_size=world, num_workers=self.num_workers)
            kw = self._loader_kwargs()
            kw['persistent_workers'] = False  # workers must see each epoch's set_epoch / resume offset
            return ResumableLoader(DataLoader(stream, batch_size=None, **kw), stream)
        if self.multires is not None:
            return self._build_multires_loader(rank, world)
        if self.dataset == 'fashion_mnist':
            ds = self._splits['train']
            bs = ResumableBatchSampler(len(ds), self.batch_size, shuffle=True, drop_last=True, seed=self.seed,
                                       rank=rank, world_size=world)
            return ResumableLoader(batch_loader(self._resident(ds), bs, self._batch_device()), bs)
        ds, idx = self._splits['train'], self._splits['train_idx']
        bs = ResumableBatchSampler(len(idx), self.batch_size, shuffle=True, drop_last=True, seed=self.seed,
                                   rank=rank, world_size=world)
        return ResumableLoader(DataLoader(_Indexed(ds, idx), batch_sampler=bs, collate_fn=collate_skip_bad,
                                          **self._loader_kwargs()), bs)

    def _build_multires_loader(self, rank: int, world: int) -> ResumableLoader:
        """Training batches of scheduled sizes (:mod:`visionpe.data.multires`)."""
        mr, ds = self.multires, self._splits['train']
        if self.dataset == 'fashion_mnist':
            bs = mr.batch_sampler(len(ds), self.seed, rank, world)
            return ResumableLoader(DataLoader(ScheduledBatches(ds, mr.sizes), sampler=bs, batch_size=None,
                                              num_workers=0), bs)
        idx = self._splits['train_idx']
        base = copy.copy(ds)
        base.transform = None  # the scheduled dataset applies the transform of the batch's size
        transforms = [self._timm_transform(True, s) for s in mr.sizes]
        bs = mr.batch_sampler(len(idx), self.seed, rank, world)
        return ResumableLoader(DataLoader(ScheduledTransformSkipBad(_Indexed(base, idx), transforms),
                                          batch_sampler=bs, collate_fn=collate_skip_bad, **self._loader_kwargs()), bs)

    def _eval_loader(self, split: str):
        self.setup()
        rank, world = self._rank()
        if self.dataset == 'webdataset':
            stream = ShardEvalStream(self._splits[split if split != 'test' else 'val'], self.eval_batch_size,
                                     self._timm_transform(False), rank=rank, world_size=world)
            return DataLoader(stream, batch_size=None, **self._loader_kwargs())
        ds = self._splits[split]
        if ds is None:
            return []
        if self.dataset == 'fashion_mnist':
            bs = ResumableBatchSampler(len(ds), self.eval_batch_size, shuffle=False, drop_last=False,
                                       rank=rank, world_size=world)
            return ResumableLoader(batch_loader(self._resident(ds), bs, self._batch_device()), bs)
        idx = self._splits[f'{split}_idx']
        return DataLoader(_Indexed(ds, idx), batch_size=self.eval_batch_size, sampler=_EvalShard(len(idx), rank, world),
                          collate_fn=collate_skip_bad, **self._loader_kwargs())

    def _batch_device(self) -> Optional[torch.device]:
        """The training device when batches are looked up there (``device_resident``), else None."""
        if not self.hparams.get('device_resident'):
            return None
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device('cpu')

    def _resident(self, ds: FashionMNISTBatches) -> FashionMNISTBatches:
        device = self._batch_device()
        return ds if device is None else resident(ds, device)

    def val_dataloader(self):
        return self._eval_loader('val')

    def test_dataloader(self):
        return self._eval_loader('test')

    def predict_dataloader(self):
        return self._eval_loader('test')

    # ------------------------------------------------------------------ device-side transforms
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict):
            return batch
        if 'n_bad' in batch:
            if not (self.trainer is not None and self.trainer.sanity_checking):  # seen again by validation
                self.monitor.update(int(batch['n_bad']), int(batch['n']), batch.get('bad_paths', ()))
            if batch['image'] is None:
                return None
            return batch['image'], batch['label']
        # raw Fashion-MNIST batch: uint8 (B, 28, 28)
        x = batch['image'].unsqueeze(1).float().div_(255)
        trainer = self.trainer
        if trainer is not None and trainer.training:
            g = torch.Generator(device=x.device).manual_seed(int(batch['seed']))
            augment = self._size_augments[int(batch['size'])] if 'size' in batch else self._augment
            x = augment(x, g)
        else:
            x = resize_batch(x, self.img_size)
        return normalize_batch(x, self.mean, self.std), batch['label']

    def eval_transform(self, img_size: Optional[int] = None):
        """The evaluation transform at ``img_size`` (default: the training size), for reuse outside training."""
        if self.dataset == 'fashion_mnist':
            from ..data.fashion_mnist import eval_transform
            return eval_transform(img_size or self.img_size, self.mean, self.std)
        hp = self.hparams
        return create_imagenet_transform(False, img_size or self.img_size, self.mean, self.std,
                                         interpolation=hp.interpolation, crop_pct=hp.eval_crop_pct)

    # ------------------------------------------------------------------ bad images and checkpoint state
    def check_bad_samples(self) -> None:
        """Fail if too many images were unreadable (called by the LightningModule at epoch ends)."""
        self.monitor.check(final=True)

    # The training loader's position is kept here as well as in Lightning's loop state: Lightning restores
    # the data module before ``configure_optimizers`` (which builds the loader to count the steps) but the
    # loops after it, and it does not load loader states into an already-built loader.
    def state_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {'bad_samples': self.monitor.state_dict()}
        if self._train_loader is not None:
            out['train_loader'] = self._train_loader.state_dict()
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict.get('bad_samples', {}))
        self._pending_loader_state = state_dict.get('train_loader')
        if self._train_loader is not None and self._pending_loader_state is not None:
            self._train_loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None


class _Indexed(torch.utils.data.Dataset):
    """``ds`` restricted to ``idx``; items may be ``(i, seed)`` pairs."""

    def __init__(self, ds: Any, idx: torch.Tensor) -> None:
        self.ds, self.idx = ds, idx.tolist()

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, item):
        if isinstance(item, (tuple, list)):
            return self.ds[(self.idx[item[0]], item[1])]
        return self.ds[self.idx[item]]

