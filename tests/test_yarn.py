"""YaRN for 2-D RoPE (visionpe.pos.rope): NTK-by-parts frequencies and the attention temperature.

The table below was computed by hand (and checked with a calculator) from the formulas of the
module docstring, for head dim 16, theta 10000 (axial magnitudes 10^-i, i = 0..3), a 4 x 8 training
grid in index coordinates (extent W = 8 columns, H = 4 rows), s = 2, alpha = 0.1, beta = 1:

  x: turns r = 10^-i * 8 / 2pi  = 1.27324, 0.127324, 0.0127324, 0.00127324
     gamma = clamp((r - 0.1) / 0.9, 0, 1) = 1, 0.0303599, 0, 0
     factor = (1 - gamma) / 2 + gamma = 1, 0.515180, 0.5, 0.5
  y: turns r = 10^-i * 4 / 2pi  = 0.636620, 0.0636620, ...
     gamma = 0.596244, 0, 0, 0;  factor = 0.798122, 0.5, 0.5, 0.5
  temperature: q and k times 0.1 ln 2 + 1 = 1.0693147 (logits times its square)
"""
from __future__ import annotations

import math

import pytest
import timm
import torch

import visionpe  # noqa: F401
from visionpe.grid import Grid
from visionpe.pos import EncodingContext, build_encoding

CTX = EncodingContext(dim=64, depth=2, num_heads=4, grid_size=(4, 8), num_prefix_tokens=1)
HAND_X = [1.0, 0.0515179975, 0.005, 0.0005]
HAND_Y = [0.798122096, 0.05, 0.005, 0.0005]
HAND_MSCALE = 1.06931472
YARN = dict(yarn_scale=2.0, yarn_alpha=0.1, yarn_beta=1.0)


def _axial(**kw):
    return build_encoding('rope2d', CTX, rope_type='axial', theta=10000., **kw)


def test_axial_frequencies_match_the_hand_table():
    enc = _axial(**YARN)
    mag_x, mag_y = enc.axial_frequencies_xy()
    assert torch.allclose(mag_x, torch.tensor(HAND_X), rtol=1e-6, atol=0)
    assert torch.allclose(mag_y, torch.tensor(HAND_Y), rtol=1e-6, atol=0)
    assert enc.train_extent() == (8.0, 4.0)
    assert enc.mscale() == pytest.approx(HAND_MSCALE, rel=1e-7)


def test_axial_tables_on_a_larger_grid_match_the_hand_table():
    """A 6 x 10 test grid: token (x=5, y=3) is row 1 + 3 * 10 + 5 = 36 (after the class token)."""
    sin, cos = _axial(**YARN).prepare(Grid(6, 10, 1))
    angles = [5 * m for m in HAND_X] + [3 * m for m in HAND_Y]  # pairs (2j, 2j+1), x first
    for j, a in enumerate(angles):
        for c in (2 * j, 2 * j + 1):
            assert sin[36, c].item() == pytest.approx(HAND_MSCALE * math.sin(a), abs=1e-6)
            assert cos[36, c].item() == pytest.approx(HAND_MSCALE * math.cos(a), abs=1e-6)
    # the class token row: no rotation, but the temperature (softmax scale times mscale^2)
    assert torch.all(sin[0] == 0) and torch.allclose(cos[0], torch.full((16,), HAND_MSCALE))


def test_temperature_scales_every_logit_by_mscale_squared():
    enc = _axial(**YARN)
    plain = _axial()
    grid = Grid(6, 10, 1)
    q, k = torch.randn(2, 4, 61, 16), torch.randn(2, 4, 61, 16)
    qy, ky = enc.rotate(q, k, 0, enc.prepare(grid))
    enc.yarn_mscale = 1.0  # temperature off: the same frequencies, no scaling
    q1, k1 = enc.rotate(q, k, 0, enc.prepare(grid))
    assert torch.allclose(qy @ ky.transpose(-1, -2), HAND_MSCALE ** 2 * (q1 @ k1.transpose(-1, -2)), rtol=1e-5,
                          atol=1e-4)
    # s = 1 is the identity knob
    off = _axial(yarn_scale=1.0)
    for a, b in zip(off.prepare(grid), plain.prepare(grid)):
        assert torch.equal(a, b)


def test_mixed_uses_the_frequency_magnitude_and_reduces_to_axial():
    """RoPE-Mixed with axis-aligned frequencies (F_x = (m, 0), F_y = (0, m)) is axial RoPE: YaRN by frequency
    magnitude gives it the per-axis factors of the hand table."""
    mixed = build_encoding('rope2d', CTX, rope_type='mixed', theta=10000., **YARN)
    mags = torch.tensor([10. ** -i for i in range(4)])
    with torch.no_grad():
        mixed.freqs.zero_()
        mixed.freqs[0, :, :, :4] = mags
        mixed.freqs[1, :, :, 4:] = mags
    scaled = mixed.mixed_frequencies()
    assert torch.allclose(scaled[0, :, :, :4], torch.tensor(HAND_X).expand(2, 4, 4), rtol=1e-6, atol=0)
    assert torch.allclose(scaled[1, :, :, 4:], torch.tensor(HAND_Y).expand(2, 4, 4), rtol=1e-6, atol=0)
    grid = Grid(6, 10, 1)
    sin_m, cos_m = mixed.prepare(grid)[1]
    sin_a, cos_a = _axial(**YARN).prepare(grid)
    assert torch.allclose(sin_m, sin_a.expand_as(sin_m), atol=1e-6)
    assert torch.allclose(cos_m, cos_a.expand_as(cos_m), atol=1e-6)
    # a diagonal frequency turns (|f_x| W + |f_y| H) / 2 pi times
    with torch.no_grad():
        mixed.freqs[:, 0, 0, 0] = torch.tensor([0.06, 0.08])
    r = (0.06 * 8 + 0.08 * 4) / (2 * math.pi)
    g = (r - 0.1) / 0.9
    want = (1 - g) / 2 + g
    assert mixed.mixed_frequencies()[:, 0, 0, 0].tolist() == pytest.approx([0.06 * want, 0.08 * want], rel=1e-6)


def test_yarn_gradients_reach_mixed_frequencies():
    mixed = build_encoding('rope2d', CTX, rope_type='mixed', **YARN)
    sin, cos = mixed.prepare(Grid(6, 10, 1))[0]
    (sin.sum() + cos.sum()).backward()
    assert mixed.freqs.grad is not None and mixed.freqs.grad.abs().sum() > 0


def test_yarn_on_a_model_and_bad_settings():
    model = timm.create_model('vit_rope2d_tiny', embed_dim=64, depth=2, num_heads=4, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 448, 448)
    model.blocks[0].ls1.gamma.data.fill_(1.0)  # let a peaked attention reach the features at init
    model.blocks[0].attn.qkv.weight.data.mul_(8.0)
    with torch.no_grad():
        ref = model.forward_features(x)
        model.pe.yarn_scale = 2.0  # what the evaluator sets: test grid / training grid
        out = model.forward_features(x)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match='yarn_alpha < yarn_beta'):
        _axial(yarn_alpha=2.0, yarn_beta=1.0)
    with pytest.raises(ValueError, match='RoPE-Mixed learns its frequencies'):
        build_encoding('rope2d', CTX, rope_type='mixed', ntk_scale=2.0).prepare(Grid(4, 4, 1))
    polar = _axial(coord_mode='polar', yarn_scale=2.0)
    with pytest.raises(ValueError, match="coord_mode='polar'"):
        polar.prepare(Grid(4, 4, 1))
