"""Training with Lightning: :func:`fit` (a config file and overrides, in Python), the LightningModule (any timm model, DeiT-III recipe from timm parts), the
DataModule (Fashion-MNIST, ImageNet folder / webdataset), callbacks, the CLI, and
:func:`load_model_from_checkpoint` for evaluation.

For the evaluator: ``load_model_from_checkpoint(path, map_location='cpu', use_ema=True, **overrides)``
returns ``(model, info)``; :func:`visionpe.data.fmnist_test_loader` and
:func:`visionpe.data.eval_transform` give the Fashion-MNIST test set and evaluation transform at any
resolution, in the convention used in training.
"""
from ..data.fashion_mnist import eval_transform as fmnist_eval_transform
from ..data.fashion_mnist import fmnist_test_loader
from .api import FitResult, fit
from .callbacks import ImagesPerSecond, PreemptionCheckpoint
from .checkpoint import load_model_from_checkpoint
from .datamodule import ImageClassificationData
from .module import VisionClassifier, build_model

__all__ = ['fit', 'FitResult', 'VisionClassifier', 'ImageClassificationData', 'ImagesPerSecond', 'PreemptionCheckpoint',
           'load_model_from_checkpoint', 'build_model', 'fmnist_test_loader', 'fmnist_eval_transform']
