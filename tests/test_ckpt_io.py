"""The checkpoint reader refuses pickles that could run code, and names what a bad file is."""
from __future__ import annotations

import pytest
import torch

from visionpe.train.ckpt_io import CheckpointError, UnsafeCheckpointError, checkpoint_hparams, read_checkpoint


class _RunsCode:
    """Unpickling this calls ``pathlib.Path.touch`` on a marker file: code execution, observable."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_code_running_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.ckpt'
    torch.save({'hyper_parameters': {'model_name': 'vit_ape_tiny'}, 'payload': _RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match='trust-checkpoint') as e:
        read_checkpoint(path)
    assert 'asks for getattr' in str(e.value)  # the blocked global is named
    assert not marker.exists(), 'the pickle ran code'
    read_checkpoint(path, trust=True)  # the explicit opt-in loads it (and so runs it)
    assert marker.exists()


def test_plain_checkpoint_reads(tmp_path):
    path = tmp_path / 'ok.ckpt'
    torch.save({'hyper_parameters': {'model_name': 'vit_ape_tiny', 'mean': (0.5,), 'root': tmp_path},
                'state_dict': {'w': torch.ones(2)}, 'epoch': 1}, path)
    ck = read_checkpoint(path)
    assert ck['epoch'] == 1 and torch.equal(ck['state_dict']['w'], torch.ones(2))
    assert checkpoint_hparams(path)['root'] == tmp_path


@pytest.mark.parametrize('content, words', [(b'', 'empty'), (b'hello, not a checkpoint', 'not a readable')])
def test_bad_files_are_named(tmp_path, content, words):
    path = tmp_path / 'bad.ckpt'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=words) as e:
        read_checkpoint(path)
    assert 'weights_only' not in str(e.value)  # never advise unsafe loading


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / 'cut.ckpt'
    torch.save({'state_dict': {'w': torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match='truncated'):
        read_checkpoint(path)


def test_not_a_train_checkpoint(tmp_path):
    path = tmp_path / 'sd.pth'
    torch.save({'w': torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match='hyper_parameters.model_name'):
        checkpoint_hparams(path)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / 'missing.ckpt')


def _evil(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.ckpt'
    torch.save({'hyper_parameters': {'model_name': 'vit_ape_tiny', 'num_classes': 10, 'img_size': 32,
                                     'fpn_channels': 16}, 'state_dict': {}, 'payload': _RunsCode(marker)}, path)
    return path, marker


@pytest.mark.parametrize('models', [[], ['--models', 'vit_ape_tiny']], ids=['name-from-ckpt', 'name-given'])
def test_evaluator_refuses_code_running_checkpoint(tmp_path, capsys, models):
    """issue 17 defect 8: eval_resolution.py refuses such a checkpoint (exit 2, naming the opt-in) without running
    it, whether it reads the model name from the checkpoint or rebuilds the model from it."""
    from visionpe.eval.cli import main
    path, marker = _evil(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*models, '--checkpoints', str(path), '--resolutions', '32', '--max-images', '8',
              '--output', str(tmp_path / 'out'), '--no-progress'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'refused to load' in err and '--trust-checkpoint' in err and 'weights_only' not in err
    assert not marker.exists(), 'the pickle ran code'


def test_loaders_refuse_code_running_checkpoint(tmp_path):
    from visionpe.det.evaluate import load_detector
    from visionpe.train import load_model_from_checkpoint
    path, marker = _evil(tmp_path)
    for load in (lambda: load_model_from_checkpoint(path), lambda: load_detector('vit_ape_tiny', str(path))):
        with pytest.raises(UnsafeCheckpointError):
            load()
    assert not marker.exists()


def test_evaluator_rejects_abbreviated_options(capsys):
    from visionpe.eval.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(['--resolution', '32'])
    assert 'unrecognized arguments' in capsys.readouterr().err


def test_detection_checkpoint_is_named_by_the_classifier_loader(tmp_path):
    from visionpe.train import load_model_from_checkpoint
    path = tmp_path / 'det.ckpt'
    torch.save({'hyper_parameters': {'model_name': 'vit_ape_tiny', 'num_classes': 11, 'fpn_channels': 64},
                'state_dict': {}}, path)
    with pytest.raises(ValueError, match='detection checkpoint.*--task coco'):
        load_model_from_checkpoint(path)
