"""The issue-19 encodings (PaPE, PaPE-RI, Spiral RoPE, 2-D ALiBi, FIRE-2D): square and non-square sizes with every
backend against the math path, PaPE's widened q/k against its closed form, Spiral RoPE's geometry on non-square
grids, and the converters' errors. (Contract, gradients and sdpa forward/backward: test_timm_contract.py and
test_backends.py run every preset; ALiBi and FIRE details: test_distance_bias.py.)"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from visionpe.attention import flex_available, use_backend
from visionpe.convert import CheckpointMismatchError, convert_state_dict
from visionpe.grid import Grid, grid_coords
from visionpe.pos import EncodingContext, build_encoding

NEW = ('pape', 'pape_ri', 'spiral', 'alibi2d', 'fire2d')
TOL = 1e-5


def _tiny(pe, **kw):
    return timm.create_model(f'vit_{pe}_tiny', embed_dim=64, depth=2, num_heads=4, dynamic_img_size=True,
                             **{'parabolas': 4, **kw} if pe == 'pape' else kw).eval()


def _run(model, x, backend):
    with use_backend(backend), torch.no_grad():
        return model(x)


@pytest.mark.parametrize('pe', NEW)
def test_sizes_square_and_non_square_all_backends(pe):
    model = _tiny(pe)
    backends = ['sdpa'] + (['flex'] if flex_available() else [])
    for size in ((32, 32), (48, 32), (64, 64), (32, 80)):
        x = torch.randn(1, 3, *size)
        ref = _run(model, x, 'math')
        assert ref.shape == (1, 1000) and torch.isfinite(ref).all()
        for b in backends:
            assert (_run(model, x, b) - ref).abs().max() < TOL, (size, b)


@pytest.mark.parametrize('pe', NEW)
def test_512_px(pe):
    model = _tiny(pe)
    out = _run(model, torch.randn(1, 3, 512, 384), 'sdpa')
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# --- PaPE ------------------------------------------------------------------------------------------------
def _pape(name, **kw):
    ctx = EncodingContext(dim=64, depth=2, num_heads=4, grid_size=(4, 4))
    enc = build_encoding(name, ctx, **kw)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    return enc


@pytest.mark.parametrize('name,kw', [('pape', dict(parabolas=3, layout='compact')),
                                     ('pape', dict(parabolas=3, layout='upstream')), ('pape_ri', {})])
@pytest.mark.parametrize('mode', ['index', 'normalized', 'ref'])
def test_pape_widened_logits_equal_closed_form(name, kw, mode):
    enc = _pape(name, coord_mode=mode, **kw)
    grid = Grid(3, 5, 1)
    T = grid.num_tokens
    x = torch.randn(2, T, 64)
    q, k = torch.randn(2, 4, T, 16), torch.randn(2, 4, T, 16)
    state = enc.prepare(grid)
    assert enc.attn_input(x, 1, state) is x
    qw, kw = enc.rotate(q, k, 1, state)
    assert qw.shape[-1] % 8 == 0 and qw.shape == kw.shape
    assert qw.shape[-1] == {'compact': 24, 'upstream': 32}.get(enc.__dict__.get('layout'), 24)  # 16 + 6 / + 11 / + 5
    assert torch.equal(qw[..., :16], q) and torch.equal(kw[..., :16], k)
    pos = torch.cat([torch.zeros(1, 2), grid_coords(3, 5, mode, ref_hw=(4, 4)) + 1])  # prefix at (0, 0), 1-based
    layer = enc.layers[1]
    if name == 'pape':
        u = layer.ab(x).view(2, T, 2, 4, 3)
        a, beta = F.softplus(u[:, :, 0]), u[:, :, 1]  # (B, T, H, J)
        P = (pos @ layer.position.weight.t()).view(T, 4, 3)  # (T, H, J)
        d = P[:, None] - P[None, :]  # (s, t, H, J): query minus key
        pos_term = (-a[:, :, None] * d[None] ** 2 + beta[:, :, None] * d[None]).sum(-1).permute(0, 3, 1, 2)
    else:
        a = F.softplus(layer.a(x))  # (B, T, H)
        s = layer.position_scales.view(4)
        d2 = (pos[:, None] - pos[None, :]).square().sum(-1)  # (s, t)
        pos_term = -(a.transpose(1, 2)[..., None] * s[None, :, None, None] ** 2 * d2)
    want = q @ k.transpose(-1, -2) + pos_term
    got = qw @ kw.transpose(-1, -2)
    assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_pape_normalize_quirk_divides_x_by_rows():
    enc = _pape('pape', normalize=True)
    pos = enc.positions(Grid(2, 4, 1))
    assert torch.equal(pos[0], torch.zeros(2))
    # patch (row 1, column 3): (x, y) = (4, 2), divided by (rows, columns) = (2, 4), upstream's axis swap
    assert torch.allclose(pos[1 + 1 * 4 + 3], torch.tensor([4 / 2, 2 / 4]))


def test_pape_needs_the_attention_input():
    enc = _pape('pape')
    state = enc.prepare(Grid(2, 2, 1))
    q = torch.randn(1, 4, 5, 16)
    with pytest.raises(RuntimeError, match='attn_input'):
        enc.rotate(q, q, 0, state)


def test_pape_options_validated():
    with pytest.raises(ValueError, match='polar'):
        _pape('pape', coord_mode='polar')
    with pytest.raises(ValueError, match='at least one parabola'):
        _pape('pape', parabolas=0)
    with pytest.raises(ValueError, match='layout'):
        _pape('pape', layout='wide')


def test_pape_converter_errors_name_the_fix():
    from visionpe.convert.pape import UPSTREAM_KWARGS
    up = _tiny('pape', **UPSTREAM_KWARGS)
    sd = {'embedding.weight': up.patch_embed.proj.weight, 'embedding.bias': up.patch_embed.proj.bias,
          'encoder.norm_pre.weight': torch.ones(64),
          'encoder.layers.0.attention.qkv_proj.weight': torch.zeros(192, 64),
          'encoder.layers.0.attention.position_encoder.ab.weight': torch.zeros(32, 64)}
    with pytest.raises(CheckpointMismatchError, match='pre_norm=True'):
        convert_state_dict(sd, _tiny('pape'))
    with pytest.raises(CheckpointMismatchError, match='vit_pape_'):
        convert_state_dict(sd, _tiny('pape_ri', **UPSTREAM_KWARGS))
    sd['encoder.layers.0.attention.position_encoder.position.weight'] = torch.zeros(4 * 5, 2)
    with pytest.raises(CheckpointMismatchError, match='parabolas=5'):
        convert_state_dict(sd, up)


# --- Spiral RoPE ------------------------------------------------------------------------------------------
def _spiral(**kw):
    return build_encoding('spiral', EncodingContext(dim=64, depth=1, num_heads=4, grid_size=(4, 4)), **kw)


@pytest.mark.parametrize('mode', ['index', 'centered', 'ref'])
def test_spiral_without_clamp_is_relative_on_non_square_grids(mode):
    """Without the border clamp, q.k after the rotation depends only on the offset of the two patches."""
    enc = _spiral(border_clamp=False, coord_mode=mode)
    grid = Grid(3, 6, 0)
    sin, cos = enc.prepare(grid)
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 18, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 18, 16)
    qr, kr = enc.rotate(q, k, 0, (sin, cos))
    logits = (qr @ kr.transpose(-1, -2))[0, 0].reshape(3, 6, 3, 6)
    assert torch.allclose(logits[:2, :5, :2, :5], logits[1:, 1:, 1:, 1:], atol=1e-5)
    assert logits.std() > 1e-3


def test_spiral_directions_and_clamp():
    """A row-axis pair turned by 45 degrees measures the position along (x + y) / sqrt 2 about the centre,
    clamped to the grid's row extent; unturned pairs are plain x / y."""
    enc = _spiral(rotate=2, coord_mode='index', border_clamp=True)
    grid = Grid(3, 5, 0)
    ang = enc.angles(grid)  # (15, 8) pairs: 0-1 row phi 0, 2-3 row phi 45, 4-5 col phi 0, 6-7 col phi 45
    f = enc.freqs
    xy = grid_coords(3, 5)
    cx, cy = 2.0, 1.0
    s = math.sqrt(0.5)
    row45 = (cy + s * (xy[:, 0] - cx) + s * (xy[:, 1] - cy)).clamp(0, 2)
    col45 = (cx + s * (xy[:, 0] - cx) - s * (xy[:, 1] - cy)).clamp(0, 4)
    assert torch.allclose(ang[:, 0], xy[:, 1] * f[0]) and torch.allclose(ang[:, 4], xy[:, 0] * f[0])
    assert torch.allclose(ang[:, 2], row45 * f[2], atol=1e-6) and torch.allclose(ang[:, 6], col45 * f[2], atol=1e-6)
    assert (row45 == 0).any() and (row45 == 2).any()  # the clamp acts near the corners


def test_spiral_options_validated():
    with pytest.raises(ValueError, match='multiple'):
        _spiral(rotate=3)
    with pytest.raises(ValueError, match='polar'):
        _spiral(coord_mode='polar')


def test_spiral_converter_errors_name_the_fix():
    model = _tiny('spiral')
    sd = {'blocks.0.attn.rope.freqs': model.pe.freqs.clone(), 'norm.scale': torch.ones(64),
          'pos_embed': torch.zeros(1, 196, 64)}
    with pytest.raises(CheckpointMismatchError, match="norm_layer='rmsnorm_eps_outside'"):
        convert_state_dict(sd, model)
    with pytest.raises(CheckpointMismatchError, match='vit_spiral_'):
        convert_state_dict(sd, _tiny('alibi2d'))


@pytest.mark.parametrize('dq,dv', [(24, 16), (16, 24)])
def test_sdpa_with_other_qk_width_than_v_equals_math(dq, dv):
    """SDPA pads the narrower of q/k and v with zero channels (fused kernels need one head dim)."""
    from visionpe.attention import attend
    q, k = torch.randn(2, 3, 10, dq, requires_grad=True), torch.randn(2, 3, 10, dq, requires_grad=True)
    v = torch.randn(2, 3, 10, dv, requires_grad=True)
    bias = torch.randn(1, 3, 10, 10)
    ref, _ = attend(q, k, v, 0.3, bias=bias, backend='math')
    out, _ = attend(q, k, v, 0.3, bias=bias, backend='sdpa')
    assert out.shape == (2, 3, 10, dv) and (out - ref).abs().max() < 1e-6
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(g_ref, g_out))
