"""The resolution-extrapolation evaluator: outputs and their agreement, test-time knobs, the COCO
dispatch and the errors on bad input. Tiny models, tiny images."""
from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import timm
import visionpe  # noqa: F401
from visionpe.data.fashion_mnist import FMNIST_DIR, FMNIST_MEAN, FMNIST_STD
from visionpe.eval.cli import main
from visionpe.grid import Grid
from visionpe.eval.models import Knobs, KnobSpace, ModelSource, apply_knobs, knob_support, measure_tokens
from visionpe.eval.report import format_value
from visionpe.eval.runner import EvalConfig, run_eval

TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, init_values=None, img_size=16)
RES = [16, 24, 32]
# A knob "changes" an output when it moves it by 10x float32 rounding of O(1) values or more (random tiny models
# average position effects out, so the changes are small but far above rounding); "no change" is exact equality.
CHANGED = 1e-6
HAS_FMNIST = Path(FMNIST_DIR, 't10k-images-idx3-ubyte.gz').is_file()
needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason='needs the Debian package dataset-fashion-mnist')


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    """An image folder of 2 classes x 2 images (RGB, non-square, distinct per class)."""
    root = tmp_path_factory.mktemp('imgs')
    rng = np.random.default_rng(0)
    for c, name in enumerate(('cat', 'dog')):
        (root / name).mkdir()
        for i in range(2):
            img = rng.integers(0, 80, size=(20, 26, 3), dtype=np.uint8) + np.uint8(120 * c)
            Image.fromarray(img).save(root / name / f'{i}.png')
    return root


def tiny_model(name: str, num_classes: int = 2, **kw) -> torch.nn.Module:
    """A tiny random model with large weights, so that position changes move the logits visibly."""
    torch.manual_seed(1)
    model = timm.create_model(name, num_classes=num_classes, **{**TINY, **kw})
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def save_tiny(path: Path, name: str, num_classes: int = 2, **kw) -> Path:
    model = tiny_model(name, num_classes, **kw)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope='module')
def rope_file(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp('w') / 'rope.safetensors', 'vit_rope2d_tiny')


def lightning_ckpt(path: Path, name: str = 'vit_rope2d_tiny', num_classes: int = 10) -> Path:
    """A checkpoint in train.py's layout (hyper_parameters + 'model.'-prefixed state dict)."""
    kw = {k: v for k, v in TINY.items() if k != 'img_size'}
    model = tiny_model(name, num_classes)
    hp = dict(model_name=name, model_kwargs=kw, num_classes=num_classes, img_size=16, mean=FMNIST_MEAN,
              std=FMNIST_STD, dataset='fashion_mnist')
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(hyper_parameters=hp, state_dict={f'model.{k}': v for k, v in model.state_dict().items()},
                    epoch=1, global_step=7), path)
    return path


def blobs(n: int) -> torch.Tensor:
    """Two images with a bright patch at different places (structure that positions can see)."""
    x = torch.full((2, 3, n, n), -1.0)
    x[0, :, : n // 3, : n // 3] = 2
    x[1, :, n // 2:, n // 4: n // 2] = 2
    return x + 0.1 * torch.randn_like(x)


def cfg(folder: Path, src: ModelSource, **kw) -> EvalConfig:
    args = dict(models=[src], data=str(folder), resolutions=RES, batch_size=4, workers=0, progress=False)
    return EvalConfig(**{**args, **kw})


def by(rows, **match):
    return {r['resolution']: r for r in rows if all(r[k] == v for k, v in match.items())}


# ---------------------------------------------------------------------------------------------- outputs
def test_outputs_exist_and_agree(folder, rope_file, tmp_path, capsys):
    out = tmp_path / 'run'
    rc = main(['--models', 'vit_rope2d_tiny', '--checkpoints', str(rope_file), '--model-kwargs', json.dumps(TINY),
               '--data', str(folder), '--resolutions', *map(str, RES), '--output', str(out), '--batch-size', '4',
               '--workers', '0', '--no-progress', '--coord-modes', 'index', 'ref'])
    assert rc == 0
    for ext in ('csv', 'json', 'md', 'png'):
        assert (out / f'results.{ext}').stat().st_size > 0
    js = json.loads((out / 'results.json').read_text())
    rows = js['rows']
    assert len(rows) == 2 * len(RES) and js['headline'] == 'top1'
    meta = js['meta']
    assert 'vit_rope2d_tiny' in meta['command'] and meta['versions']['torch'] == torch.__version__
    assert meta['device'].startswith('cpu') and meta['n_images'] == 4
    assert meta['models'][0]['train_res'] == [16, 16]
    with open(out / 'results.csv') as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    partial = [json.loads(ln) for ln in (out / 'rows.partial.jsonl').read_text().splitlines()]
    assert [(p['label'], p['resolution'], p['top1']) for p in partial] == \
        [(r['label'], r['resolution'], r['top1']) for r in rows]  # each row as it was measured
    md = (out / 'results.md').read_text()
    for c, r in zip(csv_rows, rows):
        assert c['label'] == r['label'] and int(c['resolution']) == r['resolution']
        for m in js['metrics']:
            assert float(c[m]) == pytest.approx(r[m], rel=1e-12, abs=1e-12)
            assert format_value(m, r[m]) in md
        assert 0 <= r['top1'] <= r['top5'] <= 100 and r['images_per_s'] > 0 and r['peak_mem_mb'] > 0
    # headline table: one line per label, cells = JSON values, best per column bold, training size starred
    table = next(b for b in md.split('\n\n') if b.startswith('| model |')).splitlines()
    assert table[0] == '| model | 16 px | 24 px | 32 px |'
    for label in ('vit_rope2d_tiny [coord=index]', 'vit_rope2d_tiny [coord=ref]'):
        line = next(ln for ln in table if ln.startswith(f'| {label} |'))
        cells = [c.strip() for c in line.strip('|').split('|')[1:]]
        for res, cell in zip(RES, cells):
            r = by(rows, label=label)[res]
            best = max(x['top1'] for x in rows if x['resolution'] == res)
            text = format_value('top1', r['top1'])
            expect = f'**{text}**' if text == format_value('top1', best) else text
            assert cell == expect + (' †' if res == 16 else '')
    assert '| vit_rope2d_tiny [coord=ref] |' in capsys.readouterr().out  # the table is printed


# ---------------------------------------------------------------------------------------------- knobs
def test_knobs_change_what_they_should(folder, rope_file):
    src = ModelSource('vit_rope2d_tiny', str(rope_file), dict(TINY))
    space = KnobSpace(coord_mode=['index', 'ref'], rope_scaling=['none', 'ntk'], temperature=[False, True])
    rows = run_eval(cfg(folder, src, knobs=space, resolutions=[16, 32])).rows
    assert len(rows) == 2 * 2 * 2 * 2
    base = by(rows, coord_mode='index', rope_scaling='none', temperature=False)
    for knob in (dict(coord_mode='ref', rope_scaling='none', temperature=False),
                 dict(coord_mode='index', rope_scaling='ntk', temperature=False),
                 dict(coord_mode='index', rope_scaling='none', temperature=True)):
        other = by(rows, **knob)
        assert other[16]['loss'] == base[16]['loss'], knob                            # training size: no change
        assert abs(other[32]['loss'] - base[32]['loss']) > CHANGED, knob              # elsewhere: a change



@pytest.mark.parametrize('own', ['index', 'ref'])
def test_rows_mark_the_native_setting(folder, rope_file, own):
    """Each row says whether its knob setting is the model's own (``native``): the setting it was trained with
    (a model built with ``ref`` coordinates has ``coord=ref`` as its native row, ``coord=index`` as the
    alternative), every other knob at its default. The study's reference rows are read from it."""
    src = ModelSource('vit_rope2d_tiny', str(rope_file), dict(TINY, coord_mode=own))
    space = KnobSpace(coord_mode=['index', 'ref'], rope_scaling=['none', 'ntk'])
    rows = run_eval(cfg(folder, src, knobs=space, resolutions=[16])).rows
    native = {(r['coord_mode'], r['rope_scaling']): r['native'] for r in rows}
    assert native == {(own, 'none'): True, ({'index': 'ref', 'ref': 'index'}[own], 'none'): False,
                      ('index', 'ntk'): False, ('ref', 'ntk'): False}

def test_temperature_rope_scaling_and_slope_on_logits(rope_file, tmp_path):
    model, info = ModelSource('vit_rope2d_tiny', str(rope_file), dict(TINY)).build(2)
    x16, x32 = blobs(16), blobs(32)
    with torch.no_grad():
        ref16, ref32 = model(x16), model(x32)
        ref_tokens = measure_tokens(model, (16, 16), torch.device('cpu'))
        assert sorted(set(ref_tokens.values())) == [16 + 1]  # 4 x 4 patches + class token, per attention
        apply_knobs(model, Knobs(temperature=True), (16, 16), (16, 16))
        assert torch.equal(model(x16), ref16)
        apply_knobs(model, Knobs(temperature=True), (32, 32), (16, 16))
        assert (model(x32) - ref32).abs().max() > CHANGED
        pi, _ = ModelSource('vit_rope2d_tiny', str(rope_file), dict(TINY)).build(2)
        apply_knobs(pi, Knobs(rope_scaling='pi'), (16, 16), (16, 16))
        assert pi.pe.pos_scale == 1.0 and torch.equal(pi(x16), ref16)
        apply_knobs(pi, Knobs(rope_scaling='pi'), (32, 32), (16, 16))
        assert pi.pe.pos_scale == 0.5 and (pi(x32) - ref32).abs().max() > CHANGED
        apply_knobs(pi, Knobs(rope_scaling='ntk:3'), (32, 32), (16, 16))
        assert pi.pe.ntk_scale == 3.0
    avg = dict(class_token=False, global_pool='avg')  # LookHere leaves the class token's row unbiased
    lh_file = save_tiny(tmp_path / 'lh.safetensors', 'vit_lookhere_tiny', **avg)
    lh, _ = ModelSource('vit_lookhere_tiny', str(lh_file), {**TINY, **avg}).build(2)
    assert 'lookhere_slope' in knob_support(lh) and 'lookhere_slope' not in knob_support(model)
    with torch.no_grad():
        grid = Grid(8, 8, lh.num_prefix_tokens)
        before, bias = lh(x32), lh.pe.layer_bias(grid, 0).clone()
        apply_knobs(lh, Knobs(lookhere_slope=0.25), (32, 32), (16, 16))
        assert lh.pe.global_slope == 0.25 and not torch.equal(lh(x32), before)
        finite = bias.abs() < 1e30  # distance penalties scale with the slope (out-of-view logits stay 'inf')
        torch.testing.assert_close(lh.pe.layer_bias(grid, 0)[finite], bias[finite] * 0.25, rtol=1e-2, atol=1e-6)


def test_backends_agree_and_inapplicable_knobs_collapse(folder, tmp_path):
    ape = save_tiny(tmp_path / 'ape.safetensors', 'vit_ape_tiny')
    srcs = [ModelSource('vit_rope2d_tiny', 'random', dict(TINY)), ModelSource('vit_ape_tiny', str(ape), dict(TINY))]
    res = run_eval(cfg(folder, srcs[0], models=srcs, resolutions=[16, 24],
                       knobs=KnobSpace(backend=['math', 'sdpa'], coord_mode=['index', 'ref'])))
    rope_math = by(res.rows, model='vit_rope2d_tiny', backend='math', coord_mode='ref')
    rope_sdpa = by(res.rows, model='vit_rope2d_tiny', backend='sdpa', coord_mode='ref')
    for r in (16, 24):
        assert rope_math[r]['loss'] == pytest.approx(rope_sdpa[r]['loss'], abs=1e-5)
        assert rope_math[r]['top1'] == rope_sdpa[r]['top1']
    ape_rows = [r for r in res.rows if r['model'] == 'vit_ape_tiny']
    assert len(ape_rows) == 2 * 2 and {r['coord_mode'] for r in ape_rows} == {None}  # no coordinate knob
    notes = next(m['notes'] for m in res.meta['models'] if m['name'] == 'vit_ape_tiny')
    assert any('coord_mode' in n for n in notes)


def test_patch_size_knob_equals_set_patch_size(folder, rope_file, capsys, tmp_path):
    """--patch-sizes 4 8 (FlexiViT at test time, declared by the ViT): every row equals the model run directly after
    set_patch_size(p) on the same images; labels and rows carry the size; the setting is undone after each size;
    a size the patch does not divide, a bad value and --task coco are clear errors."""
    from visionpe.eval.data import EvalImages, parse_data
    src = ModelSource('vit_rope2d_tiny', str(rope_file), dict(TINY))
    res = run_eval(cfg(folder, src, resolutions=[16, 32], knobs=KnobSpace(patch_size=[4, 8])))
    assert {r['label'] for r in res.rows} == {'vit_rope2d_tiny [patch=4]', 'vit_rope2d_tiny [patch=8]'}
    model, info = src.build(2)
    images = EvalImages(parse_data(str(folder)), None, 4, workers=0)
    for p in (4, 8):
        rows = by(res.rows, patch_size=p)
        for r in (16, 32):
            model.set_patch_size(p)
            logits, labels = [], []
            with torch.no_grad():
                for x, y in images.batches((r, r), info['mean'], info['std']):
                    logits.append(model(x)), labels.append(y)
            model.set_patch_size(None)
            logits, labels = torch.cat(logits), torch.cat(labels)
            top1 = 100.0 * float((logits.argmax(-1) == labels).float().mean())
            loss = float(torch.nn.functional.cross_entropy(logits, labels))
            assert rows[r]['top1'] == pytest.approx(top1) and rows[r]['loss'] == pytest.approx(loss, abs=1e-6), (p, r)
    assert abs(by(res.rows, patch_size=8)[32]['loss'] - by(res.rows, patch_size=4)[32]['loss']) > CHANGED
    # applied and undone around each size: the model's own patch size afterwards
    undo = apply_knobs(model, Knobs(patch_size=8), (32, 32), (16, 16))
    assert model.patch_size == (8, 8)
    undo()
    assert model.patch_size == (4, 4)
    assert 'patch_size' in knob_support(model)

    def err(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            main(['--models', 'vit_rope2d_tiny', '--checkpoints', str(rope_file), '--model-kwargs', json.dumps(TINY),
                  '--data', str(folder), '--no-progress', '--workers', '0', '--output', str(tmp_path / 'o'), *argv])
        assert e.value.code == 2
        return capsys.readouterr().err
    msg = err('--resolutions', '16', '20', '--patch-sizes', '4', '8')
    assert 'not a multiple of the patch size 8x8 of vit_rope2d_tiny [patch=8]' in msg and '20 -> 16 or 24' in msg
    assert 'positive integer' in err('--resolutions', '16', '--patch-sizes', '0')
    assert 'positive integer' in err('--resolutions', '16', '--patch-sizes', 'big')
    with pytest.raises(ValueError, match='--patch-sizes'):
        KnobSpace(patch_size=[2.5]).validate()


# ---------------------------------------------------------------------------------------------- checkpoints
@needs_fmnist
def test_lightning_checkpoint_on_fmnist_and_no_arg_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and 'run `python train.py` first' in capsys.readouterr().err
    lightning_ckpt(tmp_path / 'runs' / 'fmnist_vit_tiny' / 'checkpoints' / 'last.ckpt')
    assert main(['--resolutions', '16', '32', '--max-images', '24', '--no-progress', '--output', 'out']) == 0
    js = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert [r['resolution'] for r in js['rows']] == [16, 32] and js['rows'][0]['n_images'] == 24
    assert js['rows'][0]['train_res'] == 16 and js['meta']['models'][0]['global_step'] == 7
    assert js['meta']['models'][0]['mean'] == list(FMNIST_MEAN)
    assert 'whole 28x28 image resized' in js['meta']['preprocessing']
    with pytest.raises(SystemExit):
        main(['--resolutions', '16', '--crop-ratio', '0.875'])
    assert '--crop-ratio does not apply' in capsys.readouterr().err


def test_errors(folder, rope_file, tmp_path, capsys):
    def err(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            main(['--data', str(folder), '--resolutions', '16', '--no-progress', '--workers', '0',
                  '--model-kwargs', json.dumps(TINY), '--output', str(tmp_path / 'o'), *argv])
        assert e.value.code == 2
        return capsys.readouterr().err
    assert 'Did you mean vit_rope2d_tiny' in err('--models', 'vit_rope2d_tiyn', '--checkpoints', str(rope_file))
    msg = err('--models', 'vit_ape_tiny', '--checkpoints', str(rope_file))
    assert 'does not fit' in msg and 'pos_embed' in msg
    msg = err('--models', 'vit_rope2d_tiny', '--checkpoints', str(rope_file), '--resolutions', '18', '32')
    assert 'not a multiple of the patch size 4x4' in msg and '18 -> 16 or 20' in msg
    assert 'does not exist' in err('--models', 'vit_rope2d_tiny', '--checkpoints', str(rope_file), '--data',
                                   str(tmp_path / 'nowhere'))
    assert 'does not exist' in err('--models', 'vit_rope2d_tiny', '--checkpoints', str(tmp_path / 'no.pth'))
    ckpt = lightning_ckpt(tmp_path / 'ten.ckpt', num_classes=10)
    assert 'trained with 10 classes but the data has 2' in err('--checkpoints', str(ckpt))
    assert 'one per model' in err('--models', 'vit_rope2d_tiny', 'vit_ape_tiny', '--checkpoints', str(rope_file))
    assert '--rope-scaling' in err('--models', 'vit_rope2d_tiny', '--checkpoints', 'random', '--rope-scaling', 'bogus')
    assert 'unknown coordinate mode' in err('--models', 'vit_rope2d_tiny', '--checkpoints', 'random',
                                            '--coord-modes', 'diagonal')


# ---------------------------------------------------------------------------------------------- COCO
@pytest.fixture
def fake_detector(tmp_path, monkeypatch):
    """A COCO root and a fake ``visionpe.det.evaluate`` that records its calls: ``(root, calls)``."""
    root = tmp_path / 'coco'
    (root / 'annotations').mkdir(parents=True)
    calls = []

    def load_detector(model_name, checkpoint, **overrides):
        calls.append(('load', model_name, checkpoint, overrides))
        return timm.create_model(model_name, num_classes=0, **{**TINY, **overrides})

    def evaluate_detection(model, data_root, size, batch_size, device, max_images):
        calls.append(('eval', data_root, size, batch_size, str(device), max_images))
        ap = 0.5 - size / 1e4
        return dict(AP=ap, AP50=ap + .2, AP75=ap - .1, APs=.1, APm=.2, APl=.3, images_per_s=10., peak_mem_mb=5.)

    fake = types.ModuleType('visionpe.det.evaluate')
    fake.load_detector, fake.evaluate_detection = load_detector, evaluate_detection
    if 'visionpe.det' not in sys.modules:
        try:
            import visionpe.det  # noqa: F401
        except ImportError:
            monkeypatch.setitem(sys.modules, 'visionpe.det', types.ModuleType('visionpe.det'))
    monkeypatch.setitem(sys.modules, 'visionpe.det.evaluate', fake)
    return root, calls


def test_coco_dispatch_with_a_fake_detector(tmp_path, fake_detector, capsys):
    root, calls = fake_detector
    out = tmp_path / 'run'
    with pytest.raises(SystemExit):
        main(['--task', 'coco', '--models', 'vit_rope2d_tiny', '--checkpoints', str(tmp_path / 'det.ckpt'),
              '--data', f'coco:{root}', '--resolutions', '32', '--no-progress', '--output', str(out)])
    (tmp_path / 'det.ckpt').write_bytes(b'x')
    assert main(['--task', 'coco', '--models', 'vit_rope2d_tiny', '--checkpoints', str(tmp_path / 'det.ckpt'),
                 '--data', f'coco:{root}', '--resolutions', '32', '48', '--batch-size', '2', '--max-images', '3',
                 '--output', str(out), '--no-progress', '--device', 'cpu', '--coord-modes', 'index', 'ref']) == 0
    loads = [c for c in calls if c[0] == 'load']
    assert loads[0][1:3] == ('vit_rope2d_tiny', str(tmp_path / 'det.ckpt'))
    assert {c[3].get('coord_mode') for c in loads} >= {'index', 'ref'}
    evals = [c for c in calls if c[0] == 'eval']
    assert evals[0] == ('eval', str(root), 32, 2, 'cpu', 3) and len(evals) == 4
    js = json.loads((out / 'results.json').read_text())
    assert js['headline'] == 'AP' and js['meta']['task'] == 'coco'
    assert {r['AP'] for r in js['rows']} == {0.5 - 32 / 1e4, 0.5 - 48 / 1e4}
    with open(out / 'results.csv') as f:
        header = next(csv.reader(f))
    assert {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'images_per_s', 'peak_mem_mb'} <= set(header)
    md = (out / 'results.md').read_text()
    assert 'COCO AP' in md and '32 px (short side)' in md and (out / 'results.png').stat().st_size > 0
    with pytest.raises(SystemExit):  # the feature pyramid is built for the trained patch stride
        main(['--task', 'coco', '--models', 'vit_rope2d_tiny', '--checkpoints', str(tmp_path / 'det.ckpt'),
              '--data', f'coco:{root}', '--resolutions', '32', '--no-progress', '--output', str(out),
              '--patch-sizes', '8'])
    assert '--patch-sizes does not apply to --task coco' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- benchmark
@needs_fmnist
@pytest.mark.slow
def test_coordinate_modes_stay_in_the_training_frame(folder):
    """Only modes that give the training coordinates at the training size are swept: index / ref for an
    index-trained RoPE, normalized / normalized_ref for ComRoPE, polar alone for polar RoPE."""
    space = KnobSpace(coord_mode=['index', 'ref', 'normalized', 'normalized_ref', 'polar'])
    srcs = [ModelSource('vit_rope2d_tiny', 'random', dict(TINY)),
            ModelSource('vit_comrope_ap_tiny', 'random', dict(TINY)),
            ModelSource('vit_rope2d_polar_tiny', 'random', dict(TINY))]
    res = run_eval(cfg(folder, srcs[0], models=srcs, resolutions=[16], knobs=space))
    modes = {m: sorted(r['coord_mode'] for r in res.rows if r['model'] == m) for m in (s.name for s in srcs)}
    assert modes == {'vit_rope2d_tiny': ['index', 'ref'], 'vit_comrope_ap_tiny': ['normalized', 'normalized_ref'],
                     'vit_rope2d_polar_tiny': ['polar']}
    polar_notes = next(m['notes'] for m in res.meta['models'] if m['name'] == 'vit_rope2d_polar_tiny')
    assert any("trained with 'polar'" in n for n in polar_notes)
    # at the training size a mode of the family gives the same logits as the training mode
    train = by(res.rows, model='vit_rope2d_tiny', coord_mode='index')[16]
    assert by(res.rows, model='vit_rope2d_tiny', coord_mode='ref')[16]['loss'] == pytest.approx(train['loss'], abs=1e-6)


@pytest.mark.parametrize('model', ['vit_pape_tiny', 'vit_pape_ri_tiny', 'vit_spiral_tiny', 'vit_alibi2d_tiny',
                                   'vit_fire2d_tiny'])
def test_frontier_encodings_take_the_coordinate_knob(model):
    """PaPE, PaPE-RI, Spiral RoPE, 2-D ALiBi and FIRE-2D read index coordinates, so position interpolation
    (``--coord-modes ref``) is their test-time alternative: it is swept, and the rebuilt model gives the same
    logits at the training size and other logits at twice that size."""
    from visionpe.eval.models import expand_knobs, knob_support
    import timm
    kw = dict(TINY, dynamic_img_size=True)
    settings, _ = expand_knobs(KnobSpace(coord_mode=['index', 'ref', 'normalized']),
                               knob_support(timm.create_model(model, **kw)))
    assert [s.label() for s in settings] == ['coord=index', 'coord=ref']
    logits = {}
    for mode in ('index', 'ref'):
        torch.manual_seed(0)
        m = timm.create_model(model, coord_mode=mode, **kw).eval()
        with torch.no_grad():
            for p in m.parameters():  # weights large enough that positions move the logits far above rounding
                p.normal_(0, 0.5)
            logits[mode] = [m(blobs(r)) for r in (16, 32)]
    torch.testing.assert_close(logits['ref'][0], logits['index'][0], rtol=0, atol=1e-5)
    assert (logits['ref'][1] - logits['index'][1]).abs().max() > 1e-3


def test_resume_reuses_measured_rows(folder, rope_file, tmp_path, monkeypatch):
    out = tmp_path / 'run'
    argv = ['--models', 'vit_rope2d_tiny', '--checkpoints', str(rope_file), '--model-kwargs', json.dumps(TINY),
            '--data', str(folder), '--output', str(out), '--batch-size', '4', '--workers', '0', '--no-progress',
            '--coord-modes', 'index']
    assert main([*argv, '--resolutions', '16', '24']) == 0
    first = {r['resolution']: r for r in json.loads((out / 'results.json').read_text())['rows']}
    import visionpe.eval.runner as runner
    calls = []
    real = runner.evaluate_classifier
    monkeypatch.setattr(runner, 'evaluate_classifier', lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main([*argv, '--resolutions', '16', '24', '32', '--resume']) == 0
    assert len(calls) == 1  # only 32 px is measured again
    rows = {r['resolution']: r for r in json.loads((out / 'results.json').read_text())['rows']}
    for r in (16, 24):
        assert rows[r]['images_per_s'] == first[r]['images_per_s'] and rows[r]['top1'] == first[r]['top1']
    assert len((out / 'rows.partial.jsonl').read_text().splitlines()) == 3
    calls.clear()
    assert main([*argv, '--resolutions', '16']) == 0 and len(calls) == 1  # without --resume: measured anew
