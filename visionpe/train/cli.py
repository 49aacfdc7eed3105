"""``train.py``: LightningCLI over :class:`VisionClassifier` and :class:`ImageClassificationData`.

The data module decides the image size, classes and normalisation; the CLI links them into the
model's hyper-parameters (so the checkpoint is self-describing). ``--test_after_fit true`` runs the
test split after ``fit`` with the final weights. With no arguments at all, ``train.py`` runs
``fit --config configs/fmnist_vit_tiny.yaml`` (the small real default).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from lightning.pytorch.cli import LightningCLI

from .datamodule import ImageClassificationData
from .module import VisionClassifier

__all__ = ['VisionPECLI', 'main', 'DEFAULT_CONFIG']

SUBCOMMANDS = ('fit', 'validate', 'test', 'predict')
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / 'configs' / 'fmnist_vit_tiny.yaml'


class VisionPECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments('data.img_size', 'model.img_size')
        parser.link_arguments('data.dataset', 'model.dataset')
        parser.link_arguments('data.num_classes', 'model.num_classes', apply_on='instantiate')
        parser.link_arguments('data.mean', 'model.mean', apply_on='instantiate')
        parser.link_arguments('data.std', 'model.std', apply_on='instantiate')
        parser.add_argument('--test_after_fit', type=bool, default=False,
                            help='after fit, evaluate the final weights on the test split')

    def after_fit(self) -> None:
        if self.config[self.subcommand].get('test_after_fit'):
            self.trainer.test(self.model, datamodule=self.datamodule)


def main(args: Optional[List[str]] = None, run: bool = True) -> VisionPECLI:
    """Entry point; ``args`` defaults to ``sys.argv[1:]`` (no arguments: the default Fashion-MNIST run).
    ``run=False`` only instantiates (a leading subcommand in ``args`` is then ignored)."""
    if args is None and len(sys.argv) == 1:
        if not DEFAULT_CONFIG.is_file():
            raise FileNotFoundError(f'default config {DEFAULT_CONFIG} not found; pass a subcommand and --config')
        args = ['fit', '--config', str(DEFAULT_CONFIG)]
    if not run and args and args[0] in SUBCOMMANDS:
        args = args[1:]  # without running, LightningCLI parses no subcommand
    return VisionPECLI(VisionClassifier, ImageClassificationData, args=args, run=run, seed_everything_default=0,
                       save_config_kwargs={'overwrite': True}, auto_configure_optimizers=False)
