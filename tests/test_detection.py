"""Detection (visionpe.det): the generated Fashion-MNIST COCO set, pycocotools scoring, the ViTDet
pyramid and window-absolute embeddings, a short overfit, evaluation at two sizes, checkpoint loading and
``train.py --task det``."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from visionpe.data.fashion_mnist import FMNIST_DIR
from visionpe.det import (AP_KEYS, CocoDetectionSet, build_detector, coco_ap, evaluate_detection, load_detector,
                          make_fmnist_coco, tile_abs_pos)
from visionpe.det.data import detection_collate, train_transform

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not Path(FMNIST_DIR, 'train-images-idx3-ubyte.gz').is_file(),
                                  reason='needs the Debian package dataset-fashion-mnist')
TINY_VIT = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4)
TINY_DET = dict(model_kwargs=TINY_VIT, fpn_channels=64, head_convs=2, strides=(8, 16, 32))
CANVAS = 96


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny detectors run fastest on one thread (and do not oversubscribe a shared CPU: with 2 threads
    next to other jobs a 4-image FCOS step went from ~0.05 s to ~20 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def fmdet(tmp_path_factory) -> Path:
    if not Path(FMNIST_DIR, 'train-images-idx3-ubyte.gz').is_file():
        pytest.skip('needs the Debian package dataset-fashion-mnist')
    root = tmp_path_factory.mktemp('fmdet')
    return make_fmnist_coco(root, n_train=8, n_val=4, canvas=CANVAS, n_items=(1, 3), item_size=(24, 44), seed=0)


def _targets(ds):
    images, targets = detection_collate([ds[i] for i in range(len(ds))])
    return images, [{'boxes': t['boxes'].as_subclass(torch.Tensor), 'labels': t['labels']} for t in targets]


# ------------------------------------------------------------------------------------- data and scoring
def test_generated_set_layout_and_boxes(fmdet):
    from PIL import Image
    for split, n in (('train', 8), ('val', 4)):
        ann = json.loads((fmdet / 'annotations' / f'instances_{split}2017.json').read_text())
        assert len(ann['images']) == n and [c['id'] for c in ann['categories']] == list(range(1, 11))
        assert ann['annotations'] and all(1 <= a['category_id'] <= 10 for a in ann['annotations'])
        for a in ann['annotations']:
            x, y, w, h = a['bbox']
            img = torch.from_numpy(__import__('numpy').array(Image.open(fmdet / f'{split}2017' /
                                                                       f'{a["image_id"]:012d}.png')))
            assert img.shape == (CANVAS, CANVAS) and 0 <= x and 0 <= y and x + w <= CANVAS and y + h <= CANVAS
            inside = img[int(y):int(y + h), int(x):int(x + w)]
            # a tight box: its first and last rows and columns hold item pixels
            for edge in (inside[0], inside[-1], inside[:, 0], inside[:, -1]):
                assert edge.max() > 16
    ds = CocoDetectionSet(fmdet, 'val', train_transform(hflip=0.0))
    image, target = ds[0]
    assert image.shape == (3, CANVAS, CANVAS) and image.dtype == torch.float32
    assert target['boxes'].shape[1] == 4 and target['labels'].dtype == torch.int64


def test_ground_truth_as_detections_scores_ap_one(fmdet):
    ds = CocoDetectionSet(fmdet, 'train')
    gt = [dict(image_id=a['image_id'], category_id=a['category_id'], bbox=a['bbox'], score=1.0)
          for a in ds.coco.dataset['annotations']]
    stats = coco_ap(ds.coco, gt, ds.ids)
    assert set(stats) == set(AP_KEYS)
    assert stats['AP'] == stats['AP50'] == stats['AP75'] == 1.0
    assert all(v == 1.0 or math.isnan(v) for v in stats.values()) and not math.isnan(stats['APm'])
    # the check can fail: boxes shifted by half their size score far below, wrong classes score 0
    shifted = [dict(d, bbox=[d['bbox'][0] + d['bbox'][2] / 2, *d['bbox'][1:]]) for d in gt]
    assert coco_ap(ds.coco, shifted, ds.ids)['AP50'] < 0.5
    wrong = [dict(d, category_id=d['category_id'] % 10 + 1) for d in gt]
    assert coco_ap(ds.coco, wrong, ds.ids)['AP'] == 0.0
    assert coco_ap(ds.coco, [], ds.ids)['AP'] == 0.0


def test_missing_data_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='make_fmnist_coco'):
        CocoDetectionSet(tmp_path, 'val')


# ------------------------------------------------------------------------------------- backbones
def test_tile_abs_pos_is_window_absolute():
    h0, w0, d = 3, 4, 5
    table = torch.randn(1, 1 + h0 * w0, d)
    out = tile_abs_pos(table, (7, 5), (h0, w0), 1)
    assert out.shape == (1, 1 + 35, d) and torch.equal(out[:, 0], table[:, 0])
    grid0, grid = table[0, 1:].reshape(h0, w0, d), out[0, 1:].reshape(7, 5, d)
    for i in range(7):
        for j in range(5):
            assert torch.equal(grid[i, j], grid0[i % h0, j % w0])
    assert tile_abs_pos(table, (h0, w0), (h0, w0), 1) is table


@pytest.mark.parametrize('size', [(96, 96), (64, 128), (128, 80)])
def test_vitdet_pyramid_shapes_and_tile_mode(size):
    det = build_detector('vit_ape_tiny', 11, img_size=96, abs_pos='tile', **TINY_DET).eval()
    ref = build_detector('vit_ape_tiny', 11, img_size=96, abs_pos='interp', **TINY_DET).eval()
    ref.load_state_dict(det.state_dict())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats = det.backbone(x)
        assert [tuple(f.shape) for f in feats.values()] == [(2, 64, -(-size[0] // s), -(-size[1] // s))
                                                             for s in (8, 16, 32)]
        if size == (96, 96):  # at the training grid both modes are the table itself
            assert torch.equal(feats['p3'], ref.backbone(x)['p3'])
        else:  # elsewhere the tiled table differs from the interpolated one
            assert not torch.allclose(feats['p3'], ref.backbone(x)['p3'])
    with pytest.raises(ValueError, match='learned absolute table'):
        build_detector('vit_rope2d_tiny', 11, img_size=96, abs_pos='tile', **TINY_DET)


@pytest.mark.parametrize('name,kwargs', [
    ('vit_rope2d_tiny', TINY_DET),
    ('swin_tiny', dict(model_kwargs=dict(patch_size=4, embed_dim=32, depths=(1, 1), num_heads=(1, 2),
                                         window_size=4), fpn_channels=32, head_convs=1)),
])
def test_gradients_reach_every_parameter(name, kwargs):
    import visionpe
    assert name in visionpe.list_models(), f'{name} is not registered'  # a missing backbone is a failure
    det = build_detector(name, 11, img_size=64, **kwargs).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 80)]
    targets = [{'boxes': torch.tensor([[4., 6., 30., 40.], [30., 30., 60., 50.]]), 'labels': torch.tensor([1, 7])},
               {'boxes': torch.tensor([[10., 5., 40., 20.]]), 'labels': torch.tensor([3])}]
    sum(det(images, targets).values()).backward()
    missing = [n for n, p in det.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, missing


# ------------------------------------------------------------------------------------- training and evaluation
@needs_fmnist
def test_overfit_then_evaluate_at_two_sizes_and_reload(fmdet, tmp_path):
    """A short overfit on 4 generated canvases reaches AP50 > 0.5 on them; the evaluator's interface
    returns every key at two test sizes; a saved state dict reloads to the same detections."""
    torch.manual_seed(0)
    ds = CocoDetectionSet(fmdet, 'val', train_transform(hflip=0.0))
    images, targets = _targets(ds)
    det = build_detector('vit_ape_tiny', 11, img_size=CANVAS, **TINY_DET)
    opt = torch.optim.AdamW(det.parameters(), lr=1e-3, weight_decay=0.0)
    det.train()
    for _ in range(60):
        loss = sum(det(images, targets).values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(det.parameters(), 1.0)
        opt.step()
    res = evaluate_detection(det, str(fmdet), CANVAS, batch_size=4, device='cpu', max_images=None)
    assert res['AP50'] > 0.5, res
    for size in (64, 128):
        out = evaluate_detection(det, str(fmdet), size, batch_size=2, device='cpu', max_images=2)
        assert set(out) == {*AP_KEYS, 'images_per_s', 'peak_mem_mb'}
        assert all(0 <= out[k] <= 1 for k in AP_KEYS if not math.isnan(out[k]))
        assert out['images_per_s'] > 0 and out['peak_mem_mb'] > 0
    assert det.transform.min_size == (CANVAS,)  # the evaluator restores the model's size

    path = tmp_path / 'det.pth'
    torch.save(det.state_dict(), path)
    loaded = load_detector('fcos_vit_ape_tiny', str(path), num_classes=11, img_size=CANVAS, **TINY_DET)
    det.eval()
    with torch.no_grad():
        a, b = det(images[:2]), loaded(images[:2])
    for x, y in zip(a, b):
        assert torch.equal(x['labels'], y['labels']) and (x['boxes'] - y['boxes']).abs().max() < 1e-4
    with pytest.raises(RuntimeError, match='do not fit'):
        load_detector('vit_ape_tiny', str(path), num_classes=11, img_size=CANVAS,
                      **{**TINY_DET, 'model_kwargs': {**TINY_VIT, 'embed_dim': 32}})


@pytest.mark.slow
@needs_fmnist
def test_train_py_task_det_and_checkpoint(fmdet, tmp_path, monkeypatch):
    """``train.py --task det`` (config ``task: det``): two steps + validation AP; the checkpoint
    rebuilds the detector with load_detector."""
    from visionpe.train.cli import main
    monkeypatch.chdir(tmp_path)
    cli = main(['fit', '--config', str(ROOT / 'configs' / 'det' / 'fmnist_det_tiny.yaml'),
                '--data.root', str(fmdet), '--data.img_size', str(CANVAS), '--data.batch_size', '4',
                '--data.val_subset', '4', '--model.model_kwargs', json.dumps(TINY_VIT),
                '--model.layer_decay', '0.75', '--trainer.max_steps', '2', '--trainer.max_epochs', '1',
                '--trainer.enable_progress_bar', 'false'])
    hp = cli.model.hparams
    assert hp.num_classes == 11 and hp.img_size == CANVAS and cli.trainer.global_step == 2
    assert 'val/AP' in cli.trainer.callback_metrics
    ckpt = tmp_path / 'runs' / 'fmnist_det_tiny' / 'checkpoints' / 'last.ckpt'
    model = load_detector('vit_ape_tiny', str(ckpt))
    x = [torch.rand(3, CANVAS, CANVAS)]
    cli.model.detector.eval()
    with torch.no_grad():
        a, b = cli.model.detector(x)[0], model(x)[0]
    assert torch.equal(a['labels'], b['labels']) and torch.allclose(a['scores'], b['scores'])
    with pytest.raises(ValueError, match='holds a detector'):
        load_detector('vit_rope2d_tiny', str(ckpt))


# ------------------------------------------------------------------------------------- annotation validation
def _broken_copy(src: Path, dst: Path, split: str, edit) -> Path:
    """A copy of the generated set whose ``split`` annotation file is changed by ``edit(dict)``."""
    import shutil
    shutil.copytree(src, dst)
    path = dst / 'annotations' / f'instances_{split}2017.json'
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return dst


def _unknown_category(data):
    data['annotations'][1]['category_id'] = 42


def _missing_file(data):
    data['images'][0]['file_name'] = 'nowhere.png'


def _bad_boxes(data):
    w = data['images'][0]['width']
    data['annotations'][0]['bbox'] = [w - 10.0, 5.0, 30.0, 20.0]  # runs off the right edge: clipped to 10 px
    data['annotations'][1]['bbox'] = [5.0, 5.0, -8.0, 10.0]  # negative width: dropped
    data['annotations'][2]['bbox'] = [w + 5.0, 5.0, 10.0, 10.0]  # wholly outside: dropped


_BROKEN = {'unknown-category': (_unknown_category, ValueError, r'annotation id \d+ \(image id \d+, category_id 42\)'),
           'missing-file': (_missing_file, FileNotFoundError, r'image id 1 \(nowhere\.png\)')}


def _det_train_args(root: Path, *extra: str) -> list[str]:
    return ['fit', '--config', str(ROOT / 'configs' / 'det' / 'fmnist_det_tiny.yaml'), '--data.root', str(root),
            '--data.img_size', str(CANVAS), '--data.batch_size', '4', '--data.val_subset', '4',
            '--model.model_kwargs', json.dumps(TINY_VIT), '--trainer.max_steps', '1', '--trainer.max_epochs', '1',
            '--model.warmup_epochs', '0', '--trainer.enable_progress_bar', 'false', *extra]


@needs_fmnist
@pytest.mark.parametrize('case', sorted(_BROKEN))
def test_unusable_annotations_named_by_train_and_eval(fmdet, tmp_path, monkeypatch, capsys, case):
    """issue 17 defect 7: an unknown category_id crashed training inside torchvision (IndexError) and was accepted
    by evaluation; a missing image file gave a traceback in training. Both are named when the set is built."""
    from visionpe.eval.cli import main as eval_main
    from visionpe.train.cli import main as train_main
    edit, error, words = _BROKEN[case]
    monkeypatch.chdir(tmp_path)
    train_root = _broken_copy(fmdet, tmp_path / 'train_broken', 'train', edit)
    with pytest.raises(error, match=words):
        train_main(_det_train_args(train_root))
    val_root = _broken_copy(fmdet, tmp_path / 'val_broken', 'val', edit)
    with pytest.raises(SystemExit) as e:
        eval_main(['--task', 'coco', '--models', 'vit_ape_tiny', '--checkpoints', 'random', '--data', f'coco:{val_root}',
                   '--model-kwargs', json.dumps(dict(num_classes=11, img_size=CANVAS, **TINY_DET)),
                   '--resolutions', str(CANVAS), '--output', str(tmp_path / 'eval'), '--no-progress'])
    assert e.value.code == 2
    assert re.search(words, capsys.readouterr().err)


@needs_fmnist
def test_out_of_image_and_negative_boxes_are_repaired_and_counted(fmdet, tmp_path, monkeypatch, caplog, capsys):
    from visionpe.eval.cli import main as eval_main
    from visionpe.train.cli import main as train_main
    monkeypatch.chdir(tmp_path)
    root = _broken_copy(fmdet, tmp_path / 'boxes', 'train', _bad_boxes)
    _bad_boxes_val = _broken_copy(fmdet, tmp_path / 'boxes_val', 'val', _bad_boxes)
    caplog.set_level('WARNING')
    ds = CocoDetectionSet(root, 'train')
    assert ds.repairs == {'clipped': 1, 'dropped': 2}
    anns = {a['id']: a for a in ds.coco.dataset['annotations']}
    assert 2 not in anns and 3 not in anns and anns[1]['bbox'] == [CANVAS - 10.0, 5.0, 10.0, 20.0]
    assert re.search(r'1 box clipped to its image, 2 dropped .*annotation ids \[2, 3\]', caplog.text)
    caplog.clear()
    cli = train_main(_det_train_args(root, '--data.val_subset', '2'))  # trains on the repaired boxes
    assert cli.trainer.global_step == 1 and 'clipped' in caplog.text
    caplog.clear()
    eval_main(['--task', 'coco', '--models', 'vit_ape_tiny', '--checkpoints', 'random', '--data',
               f'coco:{_bad_boxes_val}', '--model-kwargs', json.dumps(dict(num_classes=11, img_size=CANVAS, **TINY_DET)),
               '--resolutions', str(CANVAS), '--output', str(tmp_path / 'eval'), '--no-progress'])
    assert re.search(r'1 box clipped to its image, 2 dropped', caplog.text)
