"""Data: Fashion-MNIST in memory (the small real default), ImageNet as an image folder or as
webdataset shards, batched tensor transforms and timm's transform factory, resumable sampling."""
from .fashion_mnist import (FMNIST_CLASSES, FMNIST_DIR, FMNIST_MEAN, FMNIST_STD, FashionMNISTBatches,
                            FashionMNISTTest, eval_transform, fmnist_test_loader, load_fashion_mnist, subset_indices)
from .imagefolder import BadDataError, BadSampleMonitor, SafeImageFolder, check_image_folder, collate_skip_bad
from .sampling import ResumableBatchSampler, ResumableLoader, mix_seed
from .shards import ShardEvalStream, ShardStream, expand_shards
from .transforms import BatchScaleAugment, create_imagenet_transform, normalize_batch, resize_batch

__all__ = ['FMNIST_CLASSES', 'FMNIST_DIR', 'FMNIST_MEAN', 'FMNIST_STD', 'FashionMNISTBatches', 'FashionMNISTTest',
           'eval_transform', 'fmnist_test_loader', 'load_fashion_mnist', 'subset_indices', 'BadDataError',
           'BadSampleMonitor', 'SafeImageFolder', 'check_image_folder', 'collate_skip_bad', 'ResumableBatchSampler',
           'ResumableLoader', 'mix_seed', 'ShardEvalStream', 'ShardStream', 'expand_shards', 'BatchScaleAugment',
           'create_imagenet_transform', 'normalize_batch', 'resize_batch']
