"""Trustworthy evaluator runs (issue 17, evaluator side): measured rows are never lost (a resume rejected
by its checks, an interrupted run), reused rows belong to the same weights, the model name agrees with the
checkpoint, unreadable images are skipped and listed, a detection checkpoint is sent to --task coco."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_eval import fake_detector, folder, lightning_ckpt  # noqa: F401  (fixtures)
from visionpe.eval.cli import PARTIAL_ROWS, main

ROOT = Path(__file__).resolve().parents[1]


def rows_of(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / PARTIAL_ROWS).read_text().splitlines() if ln.strip()]


def keys(rows) -> set:
    return {(r['label'], r['resolution'], r['top1'], r['loss']) for r in rows}


def argv_for(folder: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ['--checkpoints', str(ckpt), '--data', str(folder), '--output', str(out), '--batch-size', '4',
            '--workers', '0', '--no-progress', *extra]


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.fixture
def two_class_ckpt(tmp_path) -> Path:
    return lightning_ckpt(tmp_path / 'm.ckpt', num_classes=2)


# ------------------------------------------------------------------------------------ defect 1: lost rows
def test_resume_rejected_by_its_checks_keeps_the_rows(folder, two_class_ckpt, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(argv_for(folder, two_class_ckpt, out, '--resolutions', '16', '24')) == 0
    before = (out / PARTIAL_ROWS).read_text()
    assert len(rows_of(out)) == 2
    # a resolution that is not a multiple of the patch: rejected before anything is touched
    assert exit_code(argv_for(folder, two_class_ckpt, out, '--resolutions', '16', '18', '--resume')) == 2
    assert 'not a multiple of the patch size' in capsys.readouterr().err
    assert (out / PARTIAL_ROWS).read_text() == before
    # a bad knob value and an unknown model: the same
    assert exit_code(argv_for(folder, two_class_ckpt, out, '--resolutions', '16', '--resume', '--rope-scaling',
                              'bogus')) == 2
    assert exit_code(['--models', 'vit_nope_tiny', *argv_for(folder, two_class_ckpt, out, '--resume')]) == 2
    assert (out / PARTIAL_ROWS).read_text() == before
    # a run without --resume into the same folder appends: the earlier rows stay
    assert main(argv_for(folder, two_class_ckpt, out, '--resolutions', '32')) == 0
    assert (out / PARTIAL_ROWS).read_text().startswith(before) and len(rows_of(out)) == 3


def test_coco_resume_rejected_keeps_rows_and_reuses_them(fake_detector, tmp_path):
    root, calls = fake_detector
    ckpt = tmp_path / 'det.ckpt'
    ckpt.write_bytes(b'x')
    out = tmp_path / 'run'
    argv = ['--task', 'coco', '--models', 'vit_rope2d_tiny', '--checkpoints', str(ckpt), '--data', f'coco:{root}',
            '--output', str(out), '--no-progress', '--device', 'cpu', '--max-images', '3']
    assert main([*argv, '--resolutions', '32', '48']) == 0
    before = (out / PARTIAL_ROWS).read_text()
    assert len(before.splitlines()) == 2
    assert exit_code([*argv, '--resolutions', '32', '--resume', '--temperature']) == 2
    assert (out / PARTIAL_ROWS).read_text() == before
    calls.clear()
    assert main([*argv, '--resolutions', '32', '48', '64', '--resume']) == 0
    assert [c[2] for c in calls if c[0] == 'eval'] == [64]  # 32 and 48 reused
    js = json.loads((out / 'results.json').read_text())
    assert [r['resolution'] for r in js['rows']] == [32, 48, 64] and js['meta']['reused_rows'] == 2


@pytest.mark.slow
def test_interrupted_resume_keeps_the_rows(folder, two_class_ckpt, tmp_path):
    """A --resume run SIGINT'ed after its first new row: every earlier row and the new one are in the file."""
    out = tmp_path / 'run'
    assert main(argv_for(folder, two_class_ckpt, out, '--resolutions', '16', '24')) == 0
    before = rows_of(out)
    many = [str(r) for r in range(16, 200, 4)]  # far more than can finish before the interrupt
    # a child of a pytest-xdist worker may inherit SIGINT as ignored (then Python installs no KeyboardInterrupt
    # handler and the run ignores the interrupt): give it a terminal's default, as a user's shell would
    code = 'import signal; signal.signal(signal.SIGINT, signal.default_int_handler); ' \
           f'import sys; from visionpe.eval.cli import main; sys.exit(main({argv_for(folder, two_class_ckpt, out)!r} ' \
           f'+ ["--resume", "--resolutions", *{many!r}]))'
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, '-c', code], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    path, size0 = out / PARTIAL_ROWS, (out / PARTIAL_ROWS).stat().st_size
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if path.stat().st_size != size0:  # the first change to the file (a new row, or anything else)
            break
        time.sleep(0.02)
    assert proc.poll() is None, 'the run ended before it could be interrupted: ' + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    after = rows_of(out)
    assert keys(before) <= keys(after), 'earlier rows were lost'
    assert proc.returncode == 130, err[-2000:]
    assert 'interrupted' in err and '--resume' in err
    assert len(after) > len(before) and {r['resolution'] for r in after[len(before):]} <= set(map(int, many)) - {16, 24}


# ------------------------------------------------------------------------------------ defect 2: wrong label
def test_models_must_agree_with_a_train_py_checkpoint(folder, tmp_path, capsys):
    ape = lightning_ckpt(tmp_path / 'ape.ckpt', name='vit_ape_tiny', num_classes=2)
    out = tmp_path / 'run'
    assert exit_code(['--models', 'vit_rope2d_tiny', *argv_for(folder, ape, out, '--resolutions', '16')]) == 2
    msg = capsys.readouterr().err
    assert 'vit_ape_tiny' in msg and 'vit_rope2d_tiny' in msg and 'leave --models out' in msg
    assert not out.exists()
    assert main(['--models', 'vit_ape_tiny', *argv_for(folder, ape, out, '--resolutions', '16')]) == 0
    assert main(argv_for(folder, ape, tmp_path / 'run2', '--resolutions', '16')) == 0  # --models left out


def test_detection_checkpoint_for_classification_says_use_coco(folder, tmp_path, capsys):
    det = tmp_path / 'det.ckpt'
    torch.save(dict(hyper_parameters=dict(model_name='vit_rope2d_tiny', num_classes=11, fpn_channels=64),
                    state_dict={}), det)
    assert exit_code(argv_for(folder, det, tmp_path / 'run', '--resolutions', '16')) == 2
    assert 'this is a detection checkpoint (a detector on vit_rope2d_tiny): use --task coco' in capsys.readouterr().err


# ------------------------------------------------------------------------------------ defect 4: stale rows
def test_resume_does_not_reuse_rows_of_a_replaced_checkpoint(folder, two_class_ckpt, tmp_path, monkeypatch, caplog):
    out = tmp_path / 'run'
    argv = argv_for(folder, two_class_ckpt, out, '--resolutions', '16', '24', '--resume')
    assert main(argv) == 0
    import visionpe.eval.runner as runner
    calls = []
    real = runner.evaluate_classifier
    monkeypatch.setattr(runner, 'evaluate_classifier', lambda *a, **k: calls.append(1) or real(*a, **k))
    with caplog.at_level(logging.INFO, logger='visionpe.eval'):
        assert main(argv) == 0
    assert calls == [] and 'reused 2 of 2 rows' in caplog.text  # same file: everything reused
    first = json.loads((out / 'results.json').read_text())['rows']
    # re-trained: another model at the same path (same size, so only the content tells them apart)
    torch.manual_seed(5)
    ckpt = torch.load(two_class_ckpt, weights_only=True)
    ckpt['state_dict'] = {k: v + 0.05 * torch.randn_like(v) for k, v in ckpt['state_dict'].items()}
    torch.save(ckpt, two_class_ckpt)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='visionpe.eval'):
        assert main(argv) == 0
    assert len(calls) == 2 and 'reused 0 of 2 rows' in caplog.text
    second = json.loads((out / 'results.json').read_text())['rows']
    assert all(a['checkpoint_sha256'] != b['checkpoint_sha256'] and a['loss'] != b['loss']
               for a, b in zip(first, second))


# ------------------------------------------------------------------------------------ defect 6: bad images
@pytest.fixture
def folder_with_bad_images(tmp_path) -> tuple[Path, list[str]]:
    """2 classes x 4 readable images, plus a corrupt JPEG, an empty file and a truncated PNG."""
    root = tmp_path / 'imgs'
    rng = np.random.default_rng(0)
    for c, name in enumerate(('cat', 'dog')):
        (root / name).mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 80, size=(20, 26, 3), dtype=np.uint8) + np.uint8(120 * c)
            Image.fromarray(img).save(root / name / f'{i}.png')
    (root / 'cat' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg' * 4)
    (root / 'dog' / 'empty.jpg').write_bytes(b'')
    good = (root / 'dog' / '0.png').read_bytes()
    (root / 'dog' / 'truncated.png').write_bytes(good[: len(good) // 2])
    return root, sorted(str(root / p) for p in ('cat/corrupt.jpg', 'dog/empty.jpg', 'dog/truncated.png'))


def test_unreadable_images_are_skipped_counted_and_listed(folder_with_bad_images, tmp_path, capsys):
    root, bad = folder_with_bad_images
    ckpt = lightning_ckpt(tmp_path / 'm.ckpt', num_classes=2)
    out = tmp_path / 'run'
    assert main(argv_for(root, ckpt, out, '--resolutions', '16', '24', '--max-bad-fraction', '0.5')) == 0
    printed = capsys.readouterr().out
    assert 'skipped 3 unreadable image(s)' in printed and all(p in printed for p in bad)
    js = json.loads((out / 'results.json').read_text())
    info = js['meta']['unreadable_images']
    assert info['count'] == 3 and sorted(i['path'] for i in info['images']) == bad
    assert all(i['error'] for i in info['images'])
    assert [(r['n_images'], r['n_unreadable']) for r in js['rows']] == [(8, 3), (8, 3)]
    md = (out / 'results.md').read_text()
    assert '## Unreadable images (3, skipped)' in md and all(p in md for p in bad)
    # past the limit (the default is training's 0.1%): an error that lists them
    assert exit_code(argv_for(root, ckpt, tmp_path / 'run2', '--resolutions', '16')) == 2
    err = capsys.readouterr().err
    assert 'could not be read' in err and '--max-bad-fraction' in err and bad[0] in err


def test_no_abbreviated_options(capsys):
    """A misspelt or shortened option is an error, not silently taken for another one."""
    assert exit_code(['--max-image', '10']) == 2 and 'unrecognized arguments: --max-image' in capsys.readouterr().err
    assert exit_code(['--temp']) == 2
