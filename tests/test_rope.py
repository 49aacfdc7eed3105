"""2-D RoPE-Mixed (docs/encodings.md, "2-D RoPE"): per-layer rotations computed when each block asks for them."""
from __future__ import annotations

import timm
import torch

import visionpe  # noqa: F401  (registers the models)
from visionpe.grid import Grid, grid_coords
from visionpe.pos.rope import MixedRoPEState

from helpers import DEEP_VIT as SMALL
from helpers import inference_peak_bytes


def test_mixed_state_gives_each_layer_its_own_rotation():
    torch.manual_seed(0)
    model = timm.create_model('vit_rope2d_mixed_tiny', **SMALL)
    grid = Grid(5, 7, model.num_prefix_tokens)
    state = model.pe.prepare(grid)
    assert isinstance(state, MixedRoPEState) and len(state) == SMALL['depth']
    sin_all, cos_all = model.pe.tables(grid)
    heads, d = SMALL['num_heads'], SMALL['embed_dim'] // SMALL['num_heads']
    assert sin_all.shape == (SMALL['depth'], heads, grid.num_prefix + 35, d)
    xy = grid_coords(5, 7, 'index')
    for layer in (0, 5, 11):
        sin, cos = state[layer]
        torch.testing.assert_close(sin, sin_all[layer], rtol=0, atol=0)
        f = model.pe.freqs[:, layer].detach()  # (2, heads, d/2): phi = x F_x + y F_y, pairs interleaved
        phi = (xy[:, 0, None, None] * f[0] + xy[:, 1, None, None] * f[1]).transpose(0, 1).repeat_interleave(2, -1)
        torch.testing.assert_close(cos[:, grid.num_prefix:], phi.cos(), rtol=0, atol=1e-6)
        torch.testing.assert_close(cos[:, :grid.num_prefix], torch.ones_like(cos[:, :grid.num_prefix]))
    assert not torch.equal(state[0][0], state[1][0])
    # gradients reach the frequencies through the per-layer tables
    model(torch.randn(1, 3, 40, 56)).sum().backward()
    assert model.pe.freqs.grad is not None and model.pe.freqs.grad.abs().sum() > 0


def test_mixed_inference_memory_does_not_grow_with_depth():
    """The stacked (depth, heads, N, d) sin/cos held 2 x depth per-layer tables above the axial RoPE ViT."""
    x = torch.randn(1, 3, 256, 256)
    models = {name: timm.create_model(name, **SMALL).eval() for name in ('vit_rope2d_tiny', 'vit_rope2d_mixed_tiny')}
    peaks = {name: inference_peak_bytes(model, x) for name, model in models.items()}
    tokens = (256 // 8) ** 2 + models['vit_rope2d_tiny'].num_prefix_tokens
    layer_table = SMALL['num_heads'] * tokens * (SMALL['embed_dim'] // SMALL['num_heads']) * 4  # one of sin / cos
    extra = peaks['vit_rope2d_mixed_tiny'] - peaks['vit_rope2d_tiny']
    assert extra <= 6 * layer_table, (extra / layer_table, peaks)


def test_complex_rotation_equals_timm_apply_rot_embed():
    """apply_rope / apply_rope_qk rotate float32 pairs as one complex product: equal to timm's
    ``x cos + rot(x) sin`` on strided q / k views (odd offsets take a contiguous copy), with prefix rows,
    per-head (mixed) tables and mscale, gradients to x and to the tables included; other dtypes go to timm."""
    import pytest
    from timm.layers.pos_embed_sincos import apply_rot_embed
    from visionpe.pos.rope import apply_rope, apply_rope_qk, rope_tables
    angles = torch.randn(3, 20, 8, requires_grad=True)  # (heads, N, d/2)
    sin, cos = rope_tables(angles, num_prefix=1, mscale=1.3)  # (heads, 21, 16)
    qkv = torch.randn(2, 21, 3 * 3 * 16 + 1, requires_grad=True)
    for off in (0, 1):  # 1: odd storage offset, no complex view of it
        q, k, _ = qkv[..., off:off + 3 * 3 * 16].reshape(2, 21, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
        got = apply_rope_qk(q, k, sin, cos)
        ref = apply_rot_embed(q, sin, cos), apply_rot_embed(k, sin, cos)
        assert all((g - r).abs().max().item() < 1e-6 for g, r in zip(got, ref))
        assert (apply_rope(q, sin, cos) - ref[0]).abs().max().item() < 1e-6
        w = torch.randn_like(ref[0])
        g_got = torch.autograd.grad(((got[0] + got[1]) * w).sum(), (qkv, angles), retain_graph=True)
        g_ref = torch.autograd.grad(((ref[0] + ref[1]) * w).sum(), (qkv, angles), retain_graph=True)
        assert all((a - b).abs().max().item() < 1e-5 for a, b in zip(g_got, g_ref))
    qb = q.detach().bfloat16()
    assert torch.equal(apply_rope(qb, sin.detach(), cos.detach()), apply_rot_embed(qb, sin.detach(), cos.detach()))
    with pytest.raises(AssertionError):  # the comparison can fail: a wrong pairing is caught
        assert (apply_rope(q, sin, cos.roll(1, -1)) - ref[0]).abs().max().item() < 1e-6
