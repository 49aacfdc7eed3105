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
