"""The resolution-robust training configs: --print_config shows every option, and each config runs a few
steps with a tiny model (the ImageNet ones on a generated image folder, on the CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from visionpe.data.fashion_mnist import FMNIST_DIR
from visionpe.train.cli import main

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ['fmnist_vit_tiny_coordaug', 'fmnist_vit_tiny_multires', 'fmnist_vit_tiny_flexi']
IMAGENET = ['vit_small_in1k_deit3_coordaug', 'vit_small_in1k_deit3_multires']
TINY = dict(embed_dim=32, depth=1, num_heads=4, mlp_ratio=2.0)
OPTIONS = {'fmnist_vit_tiny_coordaug': 'coord_aug', 'fmnist_vit_tiny_multires': 'multires_range',
           'fmnist_vit_tiny_flexi': 'flexi_patch_sizes', 'vit_small_in1k_deit3_coordaug': 'coord_aug',
           'vit_small_in1k_deit3_multires': 'multires_range'}


def _model_kwargs(name: str, **extra) -> str:
    cfg = yaml.safe_load((ROOT / 'configs' / f'{name}.yaml').read_text())
    return json.dumps({**cfg['model']['model_kwargs'], **TINY, **extra})


def test_print_config_shows_every_option(capsys):
    for name in FMNIST + IMAGENET:
        with pytest.raises(SystemExit):
            main(['fit', '--config', str(ROOT / 'configs' / f'{name}.yaml'), '--print_config'])
        out = capsys.readouterr().out
        for option in ('multires_sizes:', 'multires_range:', 'multires_step:', 'multires_schedule:',
                       'multires_schedule_epochs:', 'multires_batch_multiple:', 'model_kwargs:'):
            assert option in out, (name, option)
        assert OPTIONS[name] in out, name


@pytest.mark.slow
@pytest.mark.skipif(not Path(FMNIST_DIR, 'train-images-idx3-ubyte.gz').is_file(), reason='needs dataset-fashion-mnist')
@pytest.mark.parametrize('name', FMNIST)
def test_fmnist_config_runs(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    cli = main(['fit', '--config', str(ROOT / 'configs' / f'{name}.yaml'), '--model.model_kwargs', _model_kwargs(name),
                '--data.batch_size', '16', '--data.train_subset', '96', '--data.val_subset', '16',
                '--data.test_subset', '16', '--trainer.max_steps', '3', '--trainer.max_epochs', '100',
                '--model.warmup_epochs', '0.25', '--trainer.enable_progress_bar', 'false'])
    assert cli.trainer.global_step == 3 and 'test/acc' in cli.trainer.callback_metrics


@pytest.mark.slow
@pytest.mark.skipif(not Path(FMNIST_DIR, 'train-images-idx3-ubyte.gz').is_file(), reason='needs dataset-fashion-mnist')
def test_coordaug_config_trains_a_swin_with_rotary_windows(tmp_path, monkeypatch):
    """The coordinate-augmentation recipe with a hierarchical model: Swin RoPE-Mixed on its window coordinates."""
    monkeypatch.chdir(tmp_path)
    kwargs = dict(patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, coord_aug={'rescale': 2.0})
    cli = main(['fit', '--config', str(ROOT / 'configs' / 'fmnist_vit_tiny_coordaug.yaml'),
                '--model.model_name', 'swin_rope2d_mixed_tiny', '--model.model_kwargs', json.dumps(kwargs),
                '--data.batch_size', '16', '--data.train_subset', '96', '--data.val_subset', '16',
                '--data.test_subset', '16', '--trainer.max_steps', '3', '--trainer.max_epochs', '100',
                '--model.warmup_epochs', '0.25', '--trainer.enable_progress_bar', 'false'])
    model = cli.model.model
    assert cli.trainer.global_step == 3 and model.coord_aug.rescale == 2.0 and 'test/acc' in cli.trainer.callback_metrics


@pytest.mark.slow
@pytest.mark.parametrize('name', IMAGENET)
def test_imagenet_config_runs_on_an_image_folder(tmp_path, monkeypatch, name):
    from test_data import make_image_folder
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / 'data', per_class=8, corrupt=0)  # (a skipped image would leave an odd
    # batch for mixup; unreadable images under multi-resolution: test_multires.py)
    args = ['fit', '--config', str(ROOT / 'configs' / f'{name}.yaml'),
            '--model.model_kwargs', _model_kwargs(name, patch_size=8), '--data.root', str(root),
            '--data.img_size', '32', '--data.batch_size', '4', '--data.num_workers', '0',
            '--trainer.accelerator', 'cpu', '--trainer.devices', '1', '--trainer.strategy', 'auto',
            '--trainer.precision', '32-true', '--trainer.max_steps', '2', '--trainer.max_epochs', '100',
            '--model.warmup_epochs', '0.25', '--trainer.enable_progress_bar', 'false']
    if name.endswith('multires'):
        args += ['--data.multires_range', '[24, 40]', '--data.multires_step', '8']
    cli = main(args)
    assert cli.trainer.global_step == 2
