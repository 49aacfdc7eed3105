"""LookHere: layouts and the head rule, masks and slopes, bf16 rounding, memory structure (one base
per grid), FlexAttention score_mod, backends, converter + config reader, errors."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from helpers import assert_backends_agree, create_tiny
from visionpe.attention import flex_available, run_backend, use_backend
from visionpe.convert import CheckpointMismatchError
from visionpe.grid import Grid
from visionpe.pos.lookhere import MAX_BF16, NAMED_LAYOUTS, lookhere_base, parse_layout

# golden NOTES (lookhere), "This set": 16 heads of 'halves-corners-eighths1'
NOTES_16 = [(('up',), .5), (('down',), .5), (('left',), .5), (('right',), .5),
            (('up',), .25), (('down',), .25), (('left',), .25), (('right',), .25),
            (('up', 'left'), .5), (('up', 'right'), .5), (('down', 'left'), .5), (('down', 'right'), .5),
            (('tri_up', 'left'), .5), (('tri_down', 'left'), .5), (('tri_left', 'up'), .5), (('tri_right', 'up'), .5)]

# the field-of-view definitions of the golden NOTES, written out per token (dx, dy: key minus query)
VISIBLE = {
    'up': lambda dx, dy: dy <= 0, 'down': lambda dx, dy: dy >= 0,
    'left': lambda dx, dy: dx <= 0, 'right': lambda dx, dy: dx >= 0,
    'tri_up': lambda dx, dy: dy <= -abs(dx), 'tri_down': lambda dx, dy: dy >= abs(dx),
    'tri_left': lambda dx, dy: dx <= -abs(dy), 'tri_right': lambda dx, dy: dx >= abs(dy),
}
for _a in ('up', 'down'):
    for _b in ('left', 'right'):  # diag_a_b: visible under tri_a or tri_b
        VISIBLE[f'diag_{_a}_{_b}'] = (lambda a, b: lambda dx, dy: VISIBLE[a](dx, dy) or VISIBLE[b](dx, dy))(
            f'tri_{_a}', f'tri_{_b}')


def test_layout_matches_reference_table():
    specs = parse_layout('halves-corners-eighths1', 16)
    assert [(s.tokens, s.slope) for s in specs] == NOTES_16


@pytest.mark.parametrize('layout,heads,expected', [
    # the reference's combinations
    ('lh90', 12, [('corners', i % 4, .5 if i < 4 else .25 if i < 8 else .125) for i in range(12)]),
    ('lh45', 16, [('eighths1', i % 4, .5 if i < 4 else .25) for i in range(8)]
     + [('eighths2', i % 4, .5 if i < 4 else .25) for i in range(8)]),
    ('lh45', 12, [('eighths1', i % 4, .5 if i < 4 else .25) for i in range(8)] + [('eighths2', i, .5) for i in range(4)]),
    ('halves-none', 6, [('halves', i, .5) for i in range(4)] + [('none', 0, .25), ('none', 1, .0625)]),
    ('triangles-center-zero', 16, [('triangles', i % 4, .5 if i < 4 else .25) for i in range(8)]
     + [('center', i, s) for i, s in enumerate([.25, .0625, .015625, .00390625])]
     + [('zero', i, s) for i, s in enumerate([.25, .0625, .015625, .00390625])]),
    # beyond the reference: 3 heads (ViT-Ti), 6 heads of one family (ViT-S), 8 heads with two families
    ('lh180', 3, [('halves', i, .5) for i in range(3)]),
    ('lh90', 6, [('corners', i % 4, .5 if i < 4 else .25) for i in range(6)]),
    ('halves-corners', 8, [('halves', i, .5) for i in range(4)] + [('corners', i, .5) for i in range(4)]),
    ('none', 6, [('none', i % 4, s) for i, s in enumerate([.25, .25, .0625, .0625, .015625, .015625])]),
])
def test_head_rule(layout, heads, expected):
    from visionpe.pos.lookhere import FAMILIES
    specs = parse_layout(layout, heads)
    assert [(s.family, s.tokens, s.slope) for s in specs] == [(f, FAMILIES[f][i], sl) for f, i, sl in expected]


def test_too_few_heads_warns():
    with pytest.warns(UserWarning, match=r"families \['eighths2'\] get no head"):
        specs = parse_layout('lh45', 4)
    assert [s.family for s in specs] == ['eighths1'] * 4


@pytest.mark.parametrize('layout', ['lh180', 'lh90', 'lh45', 'diagonals-triangles', 'zerocorners'])
def test_masks_and_distances_non_square(layout):
    h, w, P = 3, 5, 1
    specs = parse_layout(layout, 8)
    from visionpe.grid import grid_coords
    base = lookhere_base(specs, grid_coords(h, w), P)
    assert base.shape == (8, P + h * w, P + h * w)
    assert (base[:, :P] == 0).all() and (base[:, :, :P] == 0).all()  # prefix pairs: no bias
    for hd, spec in enumerate(specs):
        for i in range(h * w):
            for j in range(h * w):
                dx, dy = j % w - i % w, j // w - i // w
                visible = all(VISIBLE[t](dx, dy) for t in spec.fov)
                d = 0.0 if spec.kind == 'zero' else math.hypot(dx, dy)
                got = float(base[hd, P + i, P + j])
                if visible:
                    assert got == pytest.approx(spec.slope * d, abs=1e-6), (spec, i, j)
                else:
                    assert got == math.inf, (spec, i, j)


def test_bias_rounding_after_layer_slope_and_fill():
    model = create_tiny('vit_lookhere_tiny', layer_slopes=(1.3, 0.7))
    enc, grid = model.pe, Grid(6, 7, 1)
    base = enc.base(grid, 0)
    scale = enc.layer_scale(0)  # 1.3: not a power of two
    bias = enc.layer_bias(grid, 0)
    finite = torch.isfinite(base)
    expected = -(base[finite] * torch.tensor(scale)).to(torch.bfloat16).float()
    assert torch.equal(bias[finite], expected)
    assert torch.equal(bias[~finite], torch.full_like(bias[~finite], -MAX_BF16))  # masked: -max bf16
    # rounding the base before the layer slope (a tempting shortcut) is not the same
    early = -(base[finite].to(torch.bfloat16).float() * scale)
    assert not torch.equal(early, expected)
    enc.bf16_round = False
    assert not torch.equal(enc.layer_bias(grid, 0)[finite], expected)


def test_zero_slope_removes_masks_as_reference():
    model = create_tiny('vit_lookhere_tiny', global_slope=0.0)
    assert (model.pe.layer_bias(Grid(3, 4, 1), 0) == 0).all()  # 0 * inf -> nan -> 0 (golden NOTES quirk 3)


@pytest.mark.parametrize('fill_with,distance', [('zero', 'sqrt'), ('max', 'square'), ('max', 'linear')])
def test_fill_and_distance_options(fill_with, distance):
    from visionpe.grid import grid_coords
    specs = parse_layout('halves-center', 8)
    base = lookhere_base(specs, grid_coords(3, 4), 0, distance=distance, fill_with=fill_with)
    d2 = 2 ** 2 + 3 ** 2
    dmax = {'sqrt': d2 ** 0.25, 'square': d2, 'linear': d2 ** 0.5}[distance]
    up = base[0] / specs[0].slope  # an 'up' head: keys below the query are hidden
    hidden = up[0, 4]  # query (0, 0), key (0, 1): dy = 1
    assert float(hidden) == pytest.approx(0.0 if fill_with == 'zero' else dmax, rel=1e-6)
    assert float(up[4, 0]) == pytest.approx({'sqrt': 1.0, 'square': 1.0, 'linear': 1.0}[distance])
    centre = base[4] / specs[4].slope  # centre heads: the key's distance from the grid centre, untransformed
    assert float(centre[0, 0]) == pytest.approx(math.hypot(1.5, 1.0), rel=1e-6)


def test_one_base_per_grid_independent_of_depth():
    for depth in (3, 6):
        model = create_tiny('vit_lookhere_tiny', depth=depth, dynamic_img_size=True).eval()
        with torch.no_grad(), use_backend('sdpa'):
            model(torch.randn(1, 3, 64, 96))
        stored = list(model.pe._bases._store.values())
        assert len(stored) == 1 and stored[0].shape == (4, 1 + 4 * 6, 1 + 4 * 6)
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert len(model.pe._bases) == 2  # one more grid, one more base; never a depth dimension


def test_per_layer_layouts_share_bases():
    model = create_tiny('vit_lookhere_tiny', layout=['lh180', 'lh90', 'lh180'])
    grid = Grid(3, 3, 1)
    assert model.pe.base(grid, 0) is model.pe.base(grid, 2)
    assert not torch.equal(model.pe.base(grid, 0), model.pe.base(grid, 1))
    assert len(model.pe._bases) == 2


def _dense_score_mod(fn, B, H, T):
    """Evaluate a score_mod on every (b, h, i, j) the way FlexAttention's reference path does."""
    f = fn
    for dim in reversed(range(4)):  # innermost: key index
        f = torch.vmap(f, in_dims=(0,) + tuple(0 if d == dim else None for d in range(4)))
    return f(torch.zeros(B, H, T, T), *(torch.arange(n) for n in (B, H, T, T)))


@pytest.mark.parametrize('kw', [dict(layout='lh45'), dict(layout='halves-center-zerocorners-diagonals'),
                                dict(layout='lh90', fill_with='max', distance='sqrt'),
                                dict(layout='lh180', fill_with='zero', distance='square', coord_mode='ref')])
def test_score_mod_equals_bias_exactly(kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = create_tiny('vit_lookhere_tiny', num_heads=16, embed_dim=64, layer_slopes=(1.37, 0.61), **kw)
    enc, grid = model.pe, Grid(3, 5, 2)
    for layer in range(3):
        fn = enc.score_mod(None, None, 1.0, layer, enc.prepare(grid))
        dense = _dense_score_mod(fn, 1, 16, grid.num_tokens)
        assert torch.equal(dense[0], enc.layer_bias(grid, layer)), layer


@pytest.mark.skipif(not flex_available(), reason='this torch build has no FlexAttention')
def test_flex_attention_matches_math():
    model = create_tiny('vit_lookhere_tiny')
    enc, grid = model.pe, Grid(3, 4, 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, grid.num_tokens, 16, generator=g) for _ in range(3))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref, _ = run_backend('math', q, k, v, 0.25, bias=enc.bias(q, k, 0.25, 1, grid))
        out, _ = run_backend('flex', q, k, v, 0.25, score_mod=enc.score_mod(q, k, 0.25, 1, grid))
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize('name', ['vit_lookhere_tiny', 'vit_lookhere180_tiny'])
def test_backends_agree(name):
    model = create_tiny(name, dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        with use_backend('math'):
            ref = model.forward_features(x)
        with use_backend('sdpa'):
            assert torch.allclose(model.forward_features(x), ref, atol=1e-5)


@pytest.mark.skipif(not flex_available(), reason='this torch build has no FlexAttention')
def test_flex_model_forward_eval():
    model = create_tiny('vit_lookhere45_tiny', dynamic_img_size=True, depth=1, num_heads=8).eval()
    assert_backends_agree(model, torch.randn(1, 3, 32, 48), backends=('flex',), features=True)
    assert len(model.pe._bases) == 1  # the flex path itself built no base


def test_global_slope_test_time_override():
    model = create_tiny('vit_lookhere_tiny', init_values=0, img_size=64).eval()
    grid = Grid(4, 4, 1)
    full = model.pe.layer_bias(grid, 0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model.forward_features(x)
        model.pe.global_slope = 0.5
        b = model.forward_features(x)
    assert model.pe.layer_scale(0) == 0.5 * 1.5
    half = model.pe.layer_bias(grid, 0)
    finite = full > -MAX_BF16
    assert torch.allclose(half[finite], full[finite] * 0.5, rtol=1e-2) and (half[~finite] == -MAX_BF16).all()
    assert (a - b).abs().max() > 1e-3


def _upstream_release(model, lh_config, **extra):
    return {'config': dict(lh_config, **extra), 'weights': {f'_orig_mod.{k}': v for k, v in model.state_dict().items()}}


def test_release_file_config_reader(tmp_path):
    lh = dict(global_slope=0.75, layer_slopes=[1.25, 0.25], head_directions='halves-corners', distance='sqrt')
    src = create_tiny('vit_lookhere_tiny', head='mlp_tanh', norm_eps=1e-5, layout='halves-corners',
                      global_slope=0.75, layer_slopes=(1.25, 0.25), distance='sqrt', num_heads=8, img_size=64).eval()
    path = tmp_path / 'LH_tiny_weights_and_config.pth'
    torch.save(_upstream_release(src, lh), path)
    # the release stores no sizes (ViT-B/16): tiny sizes are given, everything else comes from the file
    model = create_tiny('vit_lookhere_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                        num_heads=8, img_size=64).eval()
    assert model.pe.layout == 'halves-corners' and model.pe.global_slope == 0.75
    assert model.pe.layer_slopes == (1.25, 0.25) and model.pe.distance == 'sqrt'
    assert model.head_type == 'mlp_tanh' and model.norm.eps == 1e-5
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    # a file that stores its sizes too (embed_dim, depth, num_heads) needs no size keywords
    torch.save(_upstream_release(src, lh, embed_dim=64, depth=3, num_heads=8), path)
    import timm
    model = timm.create_model('vit_lookhere_base', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.embed_dim == 64 and len(model.blocks) == 3 and model.blocks[0].attn.num_heads == 8
    # per-layer direction lists are read too
    torch.save(_upstream_release(src, dict(lh, head_directions=['halves', 'corners', 'halves'])), path)
    model = create_tiny('vit_lookhere_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                        num_heads=8)
    assert model.pe.layouts == ('halves', 'corners', 'halves')


def test_release_file_errors(tmp_path):
    src = create_tiny('vit_lookhere_tiny', head='mlp_tanh')
    path = tmp_path / 'lh.pth'
    torch.save(_upstream_release(src, dict(global_slope=1.0, layer_slopes=[1.5, 0.5], head_directions='corners')), path)
    with pytest.raises(CheckpointMismatchError, match="tanh MLP classifier .* head='mlp_tanh'"):
        create_tiny('vit_lookhere_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), head='linear')
    sd = dict(src.state_dict(), pos_embed=torch.zeros(1, 197, 64))
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError, match='not a LookHere checkpoint'):
        create_tiny('vit_lookhere_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), head='mlp_tanh')


@pytest.mark.parametrize('kw,match', [
    (dict(layout='lh30'), "unknown LookHere layout 'lh30'"),
    (dict(layout='halves-quarters'), r"unknown families \['quarters'\]"),
    (dict(layout=['lh90', 'lh45']), 'got 2 per-layer layouts for a model of depth 3'),
    (dict(distance='cosine'), 'distance must be one of'),
    (dict(fill_with='nan'), 'fill_with must be one of'),
    (dict(coord_mode='polar'), "coord_mode='polar' does not apply"),
    (dict(layer_slopes=1.0), 'layer_slopes must be a pair'),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        create_tiny('vit_lookhere_tiny', **kw)


def test_named_layouts_are_reference_shorthand():
    assert NAMED_LAYOUTS == {'lh180': 'halves', 'lh90': 'corners', 'lh45': 'eighths1-eighths2'}


def test_lh45_tiny_preset_does_not_warn_about_its_own_heads():
    """issue 17: vit_lookhere45_tiny warned about its own default head count (LH-45 is two families of four cone
    heads; ViT-Tiny has 3): the preset takes 8 heads (same parameters); 3 heads given by hand still warn."""
    import warnings
    import timm
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model = timm.create_model('vit_lookhere45_tiny', depth=1)
    assert model.blocks[0].attn.num_heads == 8
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in timm.create_model('vit_lookhere_tiny', depth=1).parameters())
    with pytest.warns(UserWarning, match='get no head'):
        timm.create_model('vit_lookhere45_tiny', depth=1, num_heads=3)
