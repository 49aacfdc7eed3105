"""Evaluation sizes beyond squares (``--resolutions 32 32x64``), per-image results (``--per-image``) and the
study shortcuts of the evaluator (``--study``, ``--benchmark fmnist``)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from visionpe.eval.cli import main
from visionpe.eval.data import folder_transform, parse_size, size_order
from visionpe.eval.models import ModelSource
from visionpe.eval.runner import DetectionTask, EvalConfig, check_resolutions
from visionpe.eval.data import parse_data
from visionpe.study.stats import unpack_correct

from test_eval import FMNIST_MEAN, FMNIST_STD, folder, lightning_ckpt, needs_fmnist  # noqa: F401  (fixture)

SIZES = ['16', '24', '16x32', '32x16']


def _rows(out):
    return json.loads((out / 'results.json').read_text())['rows']


@needs_fmnist
def test_non_square_sizes_and_per_image_on_fmnist(tmp_path):
    ckpt = lightning_ckpt(tmp_path / 'm.ckpt')
    out = tmp_path / 'run'
    assert main(['--checkpoints', str(ckpt), '--resolutions', *SIZES, '--max-images', '24', '--per-image',
                 '--no-progress', '--output', str(out)]) == 0
    rows = {r['size']: r for r in _rows(out)}
    assert set(rows) == {'16x16', '24x24', '16x32', '32x16'}
    assert rows['16x16']['resolution'] == 16 and rows['16x32']['resolution'] == '16x32'
    assert (rows['32x16']['height'], rows['32x16']['width']) == (32, 16)
    # the model saw the whole test image resized to h x w: same top-1 and per-image results as a direct run
    from visionpe.data.fashion_mnist import FashionMNISTTest
    model, _ = ModelSource('vit_rope2d_tiny', str(ckpt)).build(10)
    for size, r in rows.items():
        h, w = parse_size(size)
        hits = [model(x).argmax(-1).eq(y) for x, y in FashionMNISTTest((h, w), subset=24, mean=FMNIST_MEAN,
                                                                        std=FMNIST_STD)]
        direct = torch.cat(hits).numpy()
        per_image = unpack_correct(r['correct'], r['n_images'])
        assert np.array_equal(per_image, direct) and r['top1'] == pytest.approx(100 * direct.mean())
    assert not np.array_equal(unpack_correct(rows['16x32']['correct'], 24), unpack_correct(rows['32x16']['correct'], 24)) \
        or rows['16x32']['loss'] != rows['32x16']['loss']  # height and width are not swapped into one size
    # reports order sizes by area, then height: 16, 16x32, 32x16, 24
    order = ['16', '16x32', '32x16', '24']
    assert sorted(SIZES, key=size_order) == order
    md = (out / 'results.md').read_text()
    assert '| model | 16 px | 16x32 px | 32x16 px | 24 px |' in md
    with open(out / 'results.csv') as f:
        assert [c['resolution'] for c in csv.DictReader(f)] == order


@needs_fmnist
def test_resume_key_includes_the_size(tmp_path, monkeypatch):
    ckpt = lightning_ckpt(tmp_path / 'm.ckpt')
    out = tmp_path / 'run'
    argv = ['--checkpoints', str(ckpt), '--max-images', '8', '--no-progress', '--output', str(out)]
    assert main([*argv, '--resolutions', '16', '16x32']) == 0
    # a row written before non-square sizes existed (resolution only) is still reused
    partial = out / 'rows.partial.jsonl'
    old = [json.loads(ln) for ln in partial.read_text().splitlines()]
    for r in old:
        if r['size'] == '16x16':
            for k in ('height', 'width', 'size'):
                r.pop(k)
    partial.write_text(''.join(json.dumps(r) + '\n' for r in old))
    import visionpe.eval.runner as runner
    calls = []
    real = runner.evaluate_classifier
    monkeypatch.setattr(runner, 'evaluate_classifier', lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main([*argv, '--resolutions', '16', '16x32', '32x16', '32', '--resume']) == 0
    assert len(calls) == 2  # 16 and 16x32 reused; 32x16 (same area as 16x32) and 32 measured
    js = json.loads((out / 'results.json').read_text())
    assert js['meta']['reused_rows'] == 2
    # a per-image run does not reuse rows without per-image results
    calls.clear()
    assert main([*argv, '--resolutions', '16', '--resume', '--per-image']) == 0
    assert len(calls) == 1 and 'correct' in _rows(out)[0]


def test_patch_multiple_checked_per_axis():
    check_resolutions(['16x32', 24], (4, 4), 'm')
    check_resolutions(['16x24'], (8, 4), 'm')  # height by 8, width by 4
    with pytest.raises(ValueError, match=r"not a multiple of the patch size 4x4 .*16x18 -> height 16, width 16 or 20"):
        check_resolutions(['16x18'], (4, 4), 'm')
    with pytest.raises(ValueError, match='18 -> 16 or 20'):
        check_resolutions([18], (4, 4), 'm')
    with pytest.raises(ValueError, match='HxW'):
        parse_size('32by64')


def test_bad_size_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(['--resolutions', '32', '32by64'])
    assert e.value.code == 2 and 'use N (square) or HxW' in capsys.readouterr().err


def test_folder_non_square_crops_to_the_aspect_then_resizes():
    img = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3).astype(np.uint8))
    mean, std = (0.0,) * 3, (1.0,) * 3
    x = folder_transform((16, 64), mean, std, 'bilinear')(img)
    assert x.shape == (3, 16, 64)
    # the 60-wide image holds a 15 x 60 region of aspect 1:4, centred (rows 12..27), resized without distortion
    from torchvision.transforms import functional as TF
    ref = TF.to_tensor(TF.resize(img.crop((0, 12, 60, 27)), [16, 64], antialias=True))
    assert torch.allclose(x, ref)
    tall = folder_transform((64, 16), mean, std, 'bilinear')(img)  # 40 x 10 region, columns 25..35
    ref = TF.to_tensor(TF.resize(img.crop((25, 0, 35, 40)), [64, 16], antialias=True))
    assert tall.shape == (3, 64, 16) and torch.allclose(tall, ref)
    # square sizes: timm's transform, as before (short side to r, centre crop)
    from visionpe.data.transforms import create_imagenet_transform
    sq = create_imagenet_transform(False, 32, mean, std, interpolation='bilinear', crop_pct=1.0)(img)
    assert torch.equal(folder_transform((32, 32), mean, std, 'bilinear')(img), sq)


def test_folder_sweep_with_a_non_square_size(folder, tmp_path):  # noqa: F811
    from test_eval import TINY, rope_file  # noqa: F401
    from test_eval import save_tiny
    w = save_tiny(tmp_path / 'r.safetensors', 'vit_rope2d_tiny')
    out = tmp_path / 'run'
    assert main(['--models', 'vit_rope2d_tiny', '--checkpoints', str(w), '--model-kwargs', json.dumps(TINY),
                 '--data', str(folder), '--resolutions', '16', '16x24', '--workers', '0', '--batch-size', '4',
                 '--no-progress', '--per-image', '--output', str(out)]) == 0
    rows = {r['size']: r for r in _rows(out)}
    assert set(rows) == {'16x16', '16x24'} and rows['16x24']['n_images'] == 4
    assert all(len(unpack_correct(r['correct'], 4)) == 4 for r in rows.values())


def test_non_square_training_size(folder, tmp_path):  # noqa: F811
    """--train-res takes HxW: rows carry the whole training size (a model trained at 16x24 is marked there),
    and the knobs that need it (position interpolation by ref coordinates) get both axes."""
    from test_eval import TINY, save_tiny
    w = save_tiny(tmp_path / 'r.safetensors', 'vit_rope2d_tiny')
    out = tmp_path / 'run'
    assert main(['--models', 'vit_rope2d_tiny', '--checkpoints', str(w), '--model-kwargs', json.dumps(TINY),
                 '--data', str(folder), '--resolutions', '16x24', '32x48', '--train-res', '16x24', '--workers', '0',
                 '--batch-size', '4', '--no-progress', '--coord-modes', 'ref', '--output', str(out)]) == 0
    rows = _rows(out)
    assert {r['train_res'] for r in rows} == {'16x24'} and {r['size'] for r in rows} == {'16x24', '32x48'}
    meta = json.loads((out / 'results.json').read_text())['meta']
    assert meta['models'][0]['train_res'] == [16, 24]
    assert '16x24' in (out / 'results.md').read_text()


def test_train_res_must_be_a_size(capsys):
    with pytest.raises(SystemExit):
        main(['--models', 'vit_rope2d_tiny', '--resolutions', '16', '--train-res', '16by24'])
    assert '--train-res' in capsys.readouterr().err


# ------------------------------------------------------------------------------- aspect-preserving image folders
#: (width, height) of the images of the aspect folder, and their (h, w) at shorter side 16, longer side to 4
ASPECT_IMAGES = {(40, 20): (16, 32), (20, 40): (32, 16), (30, 30): (16, 16), (50, 24): (16, 32), (24, 36): (24, 16),
                 (26, 20): (16, 20)}


@pytest.fixture(scope='module')
def aspect_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('aspect')
    rng = np.random.default_rng(1)
    for c, name in enumerate(('a', 'b')):
        (root / name).mkdir()
        for i, (w, h) in enumerate(ASPECT_IMAGES):
            img = rng.integers(0, 120, size=(h, w, 3), dtype=np.uint8) + np.uint8(100 * c)
            Image.fromarray(img).save(root / name / f'{i}.png')
    return root


def test_short_side_shape():
    from visionpe.eval.data import short_side_shape
    for (w, h), hw in ASPECT_IMAGES.items():
        assert short_side_shape(w, h, 16, 4) == hw
    assert short_side_shape(1000, 10, 16, 16) == (16, 1600) and short_side_shape(10, 11, 32, 16) == (32, 32)
    with pytest.raises(ValueError, match='not a multiple of 16'):
        short_side_shape(30, 20, 24, 16)


def test_keep_aspect_batches_by_shape_without_cropping(aspect_folder):
    """Every image at its own shape (shorter side 16, nothing cropped: the direct resize of the whole image),
    batches of one shape, every image once."""
    from torchvision.transforms import functional as TF
    from visionpe.eval.data import EvalImages
    images = EvalImages(parse_data(str(aspect_folder)), None, batch_size=2, keep_aspect=True)
    images.multiple = 4
    mean, std = (0.5,) * 3, (0.25,) * 3
    seen = []
    for x, y in images.batches((16, 16), mean, std, 'bilinear'):
        seen += [(x[j], int(y[j])) for j in range(x.shape[0])]
    assert sorted(images.order) == images.indices and len(seen) == 12
    for (x, label), index in zip(seen, images.order):
        path, true_label = images.folder.samples[index]
        img = Image.open(path).convert('RGB')
        hw = ASPECT_IMAGES[img.size]
        ref = TF.normalize(TF.to_tensor(TF.resize(img, list(hw), interpolation=TF.InterpolationMode.BILINEAR,
                                                  antialias=True)), mean, std)
        assert label == true_label and x.shape[1:] == hw and torch.allclose(x, ref, atol=1e-6)
    assert images.in_test_set_order(images.order) == images.indices


def test_keep_aspect_sweep_rows_pair_in_test_set_order(aspect_folder, tmp_path):
    """A sweep with --keep-aspect: per-image results in test-set order, equal to each image run alone at its own
    shape; rows say how images were resized, and a resumed run does not reuse rows measured with crops."""
    from torchvision.transforms import functional as TF
    from test_eval import TINY, save_tiny
    from visionpe.eval.runner import _norm_stats
    w = save_tiny(tmp_path / 'r.safetensors', 'vit_rope2d_tiny')
    out = tmp_path / 'run'
    args = ['--models', 'vit_rope2d_tiny', '--checkpoints', str(w), '--model-kwargs', json.dumps(TINY),
            '--data', str(aspect_folder), '--resolutions', '16', '24', '--workers', '0', '--batch-size', '3',
            '--no-progress', '--per-image', '--output', str(out)]
    assert main([*args, '--keep-aspect']) == 0
    rows = {r['size']: r for r in _rows(out)}
    assert {r['resize'] for r in rows.values()} == {'short_side'} and rows['16x16']['n_images'] == 12
    meta = json.loads((out / 'results.json').read_text())['meta']
    assert 'shorter side' in meta['preprocessing'] and 'multiple of 4' in meta['preprocessing']
    source = ModelSource('vit_rope2d_tiny', str(w), dict(TINY))
    model, info = source.build(2)
    mean, std = _norm_stats(info, parse_data(str(aspect_folder)))
    from torchvision.datasets import ImageFolder
    samples = ImageFolder(str(aspect_folder)).samples
    from visionpe.eval.data import short_side_shape
    for short in (16, 24):
        direct = []
        for path, label in samples:
            img = Image.open(path).convert('RGB')
            hw = short_side_shape(*img.size, short, 4)
            x = TF.normalize(TF.to_tensor(TF.resize(img, list(hw), interpolation=TF.InterpolationMode.BICUBIC,
                                                    antialias=True)), mean, std)
            with torch.no_grad():
                direct.append(bool(model.eval()(x[None]).argmax(-1).item() == label))
        r = rows[f'{short}x{short}']
        assert unpack_correct(r['correct'], 12).tolist() == direct
        assert r['top1'] == pytest.approx(100 * np.mean(direct))
    # the same run with crops is measured anew, not taken from the aspect rows
    assert main([*args, '--resume']) == 0
    crop = {r['size']: r for r in _rows(out)}
    assert all('resize' not in r for r in crop.values())  # a reused row would carry the aspect rows' 'resize'


@pytest.mark.parametrize('extra,msg', [
    (['--data', 'fmnist', '--keep-aspect'], 'for image folders'),
    (['--resolutions', '16x24', '--keep-aspect'], 'give N, not'),
    (['--crop-ratio', '0.875', '--keep-aspect'], 'crops nothing'),
    (['--task', 'coco', '--keep-aspect'], 'keeps the aspect ratio already'),
])
def test_keep_aspect_errors(aspect_folder, extra, msg, capsys):
    args = ['--models', 'vit_rope2d_tiny', '--data', str(aspect_folder), '--resolutions', '16', '--no-progress']
    with pytest.raises(SystemExit) as e:
        main([*args, *extra])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_detection_rejects_non_square_sizes_and_per_image(tmp_path):
    root = tmp_path / 'coco'
    root.mkdir()
    spec = parse_data(f'coco:{root}', 'coco')
    with pytest.raises(ValueError, match='shorter side .* HxW sizes'):
        DetectionTask(EvalConfig(models=[], resolutions=[32, '32x48'], task='coco'), spec)
    with pytest.raises(ValueError, match='--per-image is for classification'):
        DetectionTask(EvalConfig(models=[], resolutions=[32], task='coco', per_image=True), spec)


# ------------------------------------------------------------------------------------------ study shortcuts
def test_study_and_benchmark_delegate_to_the_study_runner(monkeypatch, tmp_path, capsys):
    import visionpe.study.__main__ as study_main
    seen = []
    monkeypatch.setattr(study_main, 'main', lambda argv: seen.append(argv) or 0)
    assert main(['--study', 'configs/study/fmnist_quick.yaml', '--workers', '2']) == 0
    assert seen[-1][0] == 'run' and seen[-1][1] == '--config' and seen[-1][2].endswith('fmnist_quick.yaml')
    assert seen[-1][3:] == ['--workers', '2']
    assert main(['--benchmark', 'fmnist', '--aggregate', '--output', str(tmp_path)]) == 0
    assert seen[-1][0] == 'aggregate' and seen[-1][2].endswith('configs/study/fmnist.yaml')
    assert seen[-1][3:] == ['--output', str(tmp_path)]
    assert main(['--study', 'configs/study/fmnist.yaml', '--emit-slurm', str(tmp_path / 's')]) == 0
    assert seen[-1][0] == 'emit-slurm' and seen[-1][3:5] == ['--slurm-dir', str(tmp_path / 's')]
    assert main(['--benchmark', 'fmnist', '--print_config']) == 0
    assert seen[-1][3:] == ['--print_config']
    n = len(seen)
    for argv, msg in ((['--study', 'x.yaml', '--resolutions', '32'], 'takes its models, sizes'),
                      (['--print_config'], 'need --study'),
                      (['--study', 'x.yaml', '--coord-modes', 'ref'], 'takes its models, sizes'),
                      (['--benchmark', 'fmnist', '--study', 'x.yaml'], 'give one of them'),
                      (['--aggregate'], 'need --study')):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert len(seen) == n


def test_study_print_config_through_the_evaluator(capsys):
    """``eval_resolution.py --study F --print_config`` prints the parsed study, every field, as the runner does."""
    assert main(['--study', 'configs/study/fmnist_quick.yaml', '--print_config']) == 0
    out = capsys.readouterr().out
    assert 'encodings:' in out and 'seeds:' in out and 'eval_images:' in out


def test_max_images_all_means_the_full_set_even_on_a_cpu(tmp_path):
    """The full study evaluates all 10,000 Fashion-MNIST test images: its jobs pass --max-images all, which
    overrides the evaluator's 2,000-image CPU default."""
    from visionpe.eval.cli import build_parser, config_from_args
    from visionpe.eval.runner import ClassificationTask
    args = build_parser().parse_args(['--max-images', 'all', '--device', 'cpu'])
    task = ClassificationTask(config_from_args(args, []), parse_data('fmnist'))
    assert task.max_images is None and task.images.n_requested == 10_000
    default = ClassificationTask(config_from_args(build_parser().parse_args(['--device', 'cpu']), []),
                                 parse_data('fmnist'))
    assert default.max_images == 2000
    from visionpe.study.jobs import eval_command
    from visionpe.study.spec import Recipe, StudySpec
    spec = StudySpec(name='t', recipes=[Recipe('fixed', 'configs/fmnist_vit_tiny.yaml')], encodings=['ape'],
                     output=str(tmp_path))
    cmd = eval_command(spec, spec.jobs()[0], tmp_path / 'last.ckpt', tmp_path / 'eval')
    assert build_parser().parse_args(cmd[2:]).max_images == 'all'
    with pytest.raises(SystemExit):
        build_parser().parse_args(['--max-images', 'many'])
