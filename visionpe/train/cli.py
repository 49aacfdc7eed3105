"""``train.py``: LightningCLI over :class:`VisionClassifier` and :class:`ImageClassificationData`.

The data module decides the image size, classes and normalisation; the CLI links them into the
model's hyper-parameters (so the checkpoint is self-describing). ``--test_after_fit true`` runs the
test split after ``fit`` with the final weights. With no arguments at all, ``train.py`` runs
``fit --config configs/fmnist_vit_tiny.yaml`` (the small real default).

Detection (``visionpe.det``): ``--task det`` anywhere in the arguments, or ``task: det`` at the top of a
``--config`` file, selects :class:`DetectionCLI` over ``ObjectDetector`` + ``DetectionData``
(``python train.py fit --config configs/det/fmnist_det_tiny.yaml``).

Resuming (``--ckpt_path``) keeps the options given: a model option that differs from the checkpoint's is an
error listing the keys (:mod:`visionpe.train.resume`; ``--allow_changed [smoothing, ...]`` for the few that may
change), where Lightning's CLI would replace them with the checkpoint's. ``validate`` / ``test`` / ``predict``
with ``--ckpt_path`` take the checkpoint's model options (the model evaluated is the checkpoint's). Checkpoints
are read with :mod:`visionpe.train.ckpt_io` (a pickle that would run code is refused; ``--trust-checkpoint``
for files you vouch for). Options cannot be abbreviated (``--trainer.max_epoch`` is an error).

Configs are parsed in jsonargparse's ``omegaconf+`` mode: ``${trainer.default_root_dir}`` in a config is
resolved after the command line, so ``--trainer.default_root_dir runs/x`` moves logs and checkpoints together.
"""
from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import List, Optional

import torch
from jsonargparse import ActionYesNo, set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from .ckpt_io import SAFE_GLOBALS, checkpoint_hparams, trusting, unsafe_checkpoint_error
from .datamodule import ImageClassificationData
from .module import VisionClassifier

__all__ = ['VisionPECLI', 'DetectionCLI', 'main', 'command_line_args', 'DEFAULT_CONFIG', 'TASKS']

SUBCOMMANDS = ('fit', 'validate', 'test', 'predict')
TASKS = ('cls', 'det')
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / 'configs' / 'fmnist_vit_tiny.yaml'
# Configs may refer to other settings, resolved after the command line is merged in: the loggers' save_dir and
# the checkpoint dirpath are written '${trainer.default_root_dir}' so one override moves the whole run folder.
PARSER_MODE = 'omegaconf+'
# no abbreviations: `--trainer.max_epoch 1` must be an error, not max_epochs
_PARSER = {'parser_mode': PARSER_MODE, 'allow_abbrev': False}
PARSER_KWARGS = {**_PARSER, **{s: dict(_PARSER) for s in SUBCOMMANDS}}


class _CheckpointOptions(LightningCLI):
    """``--trust-checkpoint`` and ``--allow_changed``; checkpoints read with :mod:`.ckpt_io`; a resumed ``fit``
    keeps the given model options (the module compares them with the checkpoint's)."""

    def _add_checkpoint_arguments(self, parser) -> None:
        parser.add_argument('--trust-checkpoint', '--trust_checkpoint', dest='trust_checkpoint', action=ActionYesNo,
                            default=False, help='load --ckpt_path even if its pickle asks for more than tensors and '
                            'plain values (it could run code): only for files you made or trust')
        parser.add_argument('--allow_changed', type=List[str], default=[],
                            help='resuming: model options that may differ from the checkpoint\'s '
                                 f'(of {list(getattr(self.model_class, "RESUME_OPT_IN", ()))})')

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get('subcommand')
        if not sub or sub == 'fit':
            return  # fit: the options given stay; ResumeCheck compares them with the checkpoint's on load
        ckpt_path = self.config[sub].get('ckpt_path')
        if ckpt_path and Path(ckpt_path).is_file():  # evaluating a checkpoint: its model options
            hparams = dict(checkpoint_hparams(ckpt_path, trust=self.config[sub].get('trust_checkpoint')))
            hparams.pop('_instantiator', None)
            self.config = self.parser.parse_object({sub: {'model': hparams}}, self.config)

    def _run_subcommand(self, subcommand: str) -> None:
        trust = bool(self.config_init[subcommand].get('trust_checkpoint'))
        self.model.allow_changed = tuple(self.config_init[subcommand].get('allow_changed') or ())
        ckpt_path = self.config_init[subcommand].get('ckpt_path')
        with trusting(trust), torch.serialization.safe_globals(SAFE_GLOBALS):
            try:
                super()._run_subcommand(subcommand)
            except pickle.UnpicklingError as e:  # Lightning's own weights-only load of --ckpt_path refused it
                raise unsafe_checkpoint_error(ckpt_path, e) from None

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if 'ckpt_path' in kwargs and kwargs.get('weights_only') is None:
            kwargs['weights_only'] = not self.config_init[subcommand].get('trust_checkpoint')
        return kwargs


class VisionPECLI(_CheckpointOptions):
    def add_arguments_to_parser(self, parser) -> None:
        self._add_checkpoint_arguments(parser)
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


class DetectionCLI(_CheckpointOptions):
    """``train.py --task det``: the data module's size, classes and normalisation go into the detector's
    hyper-parameters (the checkpoint rebuilds the detector: ``visionpe.det.load_detector``)."""

    def add_arguments_to_parser(self, parser) -> None:
        self._add_checkpoint_arguments(parser)
        parser.link_arguments('data.img_size', 'model.img_size')
        parser.link_arguments('data.num_classes', 'model.num_classes', apply_on='instantiate')
        parser.link_arguments('data.mean', 'model.mean', apply_on='instantiate')
        parser.link_arguments('data.std', 'model.std', apply_on='instantiate')
        parser.add_argument('--task', type=str, default='det', help="'det' (this parser is the detection one)")


def _task(args: List[str]) -> str:
    """``--task X`` / ``--task=X`` in ``args``, else ``task:`` at the top of a ``--config`` file, else 'cls'."""
    for i, a in enumerate(args):
        if a == '--task' and i + 1 < len(args):
            task = args[i + 1]
        elif a.startswith('--task='):
            task = a.split('=', 1)[1]
        else:
            continue
        if task not in TASKS:
            raise ValueError(f'--task must be one of {TASKS}, got {task!r}')
        return task
    for i, a in enumerate(args):
        path = args[i + 1] if a == '--config' and i + 1 < len(args) else a.split('=', 1)[1] \
            if a.startswith('--config=') else None
        if path and Path(path).is_file():
            import yaml
            with open(path) as f:
                cfg = yaml.safe_load(f)
            if isinstance(cfg, dict) and cfg.get('task', 'cls') != 'cls':
                if cfg['task'] not in TASKS:
                    raise ValueError(f'{path}: task must be one of {TASKS}, got {cfg["task"]!r}')
                return cfg['task']
    return 'cls'


def _strip_task(args: List[str]) -> List[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == '--task':
            skip = True
        elif not a.startswith('--task='):
            out.append(a)
    return out


def command_line_args(argv: List[str]) -> List[str]:
    """The command line as LightningCLI takes it. A leading subcommand (or ``-h``) is kept as it is; without
    one the default run is meant: ``fit --config configs/fmnist_vit_tiny.yaml`` (the config only when no
    ``--config`` is given) followed by ``argv``, so ``python train.py --trainer.max_epochs 3`` overrides it."""
    rest = _strip_task(list(argv))  # `--task det fit ...` names its subcommand too
    if rest and rest[0] in (*SUBCOMMANDS, '-h', '--help'):
        return list(argv)
    if any(a in ('-c', '--config') or a.startswith('--config=') for a in argv):
        return ['fit', *argv]
    if not DEFAULT_CONFIG.is_file():
        raise FileNotFoundError(f'default config {DEFAULT_CONFIG} not found; pass a subcommand and --config')
    return ['fit', '--config', str(DEFAULT_CONFIG), *argv]


def main(args: Optional[List[str]] = None, run: bool = True) -> LightningCLI:
    """Entry point; ``args`` defaults to :func:`command_line_args` of ``sys.argv[1:]`` (no subcommand: the
    default Fashion-MNIST run, with any overrides given).
    ``run=False`` only instantiates (a leading subcommand in ``args`` is then ignored)."""
    if args is None:
        args = command_line_args(sys.argv[1:])
    # '${trainer.default_root_dir}' is written from a config's root; under a subcommand the config sits at
    # 'fit.', so the interpolations are made relative to where they appear when a config file is loaded
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    if not run and args and args[0] in SUBCOMMANDS:
        args = args[1:]  # without running, LightningCLI parses no subcommand
    arg_list = list(args)
    common = dict(args=_strip_task(arg_list), run=run, seed_everything_default=0,
                  save_config_kwargs={'overwrite': True}, parser_kwargs=PARSER_KWARGS, auto_configure_optimizers=False)
    if _task(arg_list) == 'det':
        from ..det.module import DetectionData, ObjectDetector
        return DetectionCLI(ObjectDetector, DetectionData, **common)
    return VisionPECLI(VisionClassifier, ImageClassificationData, **common)
