"""PoPE-2D: logits against the direct formula (with and without unpositioned prefix tokens), the softmax
scale of the original head dim, backends, the clamped key phase and its gradient, options."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_backends_agree, create_tiny
from visionpe.attention import Attention
from visionpe.grid import Grid, grid_coords
from visionpe.pos import EncodingContext, LayerPos, build_encoding
from visionpe.pos.pope import clamp_projected


def make(heads: int = 4, d: int = 16, depth: int = 2, **kw):
    return build_encoding('pope2d', EncodingContext(heads * d, depth, heads, (4, 4), 1), **kw)


def reference_logits(q, k, enc, layer: int, grid: Grid) -> torch.Tensor:
    """float64: sum_c mu_q mu_k cos(phi_s - phi_t - delta) between positioned tokens, q . k otherwise."""
    q, k, p = q.double(), k.double(), grid.num_prefix
    xy = grid_coords(grid.h, grid.w, enc.coord_mode).double()
    d = q.shape[-1]
    f = enc.theta ** -(torch.arange(d // 2, dtype=torch.float64) / (d // 2))
    phi = torch.cat([xy[:, :1] * f, xy[:, 1:] * f], dim=-1)  # x drives the first half, y the second
    delta = enc.delta[layer].detach().double().clamp(-2 * math.pi, 0)
    ang = phi[:, None, :] - phi[None, :, :] - delta[:, None, None, :]  # (H, N, N, d)
    mq, mk = F.softplus(q[:, :, p:]), F.softplus(k[:, :, p:])
    logits = q @ k.transpose(-1, -2)
    logits[:, :, p:, p:] = torch.einsum('bhsc,bhtc,hstc->bhst', mq, mk, ang.cos())
    return logits


@pytest.mark.parametrize('hw,prefix', [((3, 5), 0), ((4, 4), 1), ((2, 3), 2)])
def test_logits_match_direct_formula(hw, prefix):
    enc = make(delta_init='uniform')
    grid = Grid(*hw, prefix)
    q, k = torch.randn(2, 2, 4, grid.num_tokens, 16).unbind(0)
    q_t, k_t = enc.rotate(q, k, 1, enc.prepare(grid))
    width = 32 + 2 * prefix  # 2d + 2P, even on CPU (a multiple of 8 on CUDA, for the fused kernels)
    assert q_t.shape[-1] == k_t.shape[-1] == width and not q_t.is_complex()
    got = (q_t @ k_t.transpose(-1, -2)).double()
    ref = reference_logits(q, k, enc, 1, grid)
    assert torch.allclose(got, ref, atol=1e-5 * ref.abs().max()), (got - ref).abs().max()


def test_attention_uses_the_original_head_dim_scale():
    enc = make(delta_init='uniform')
    attn = Attention(64, 4, attn_backend='math').eval()
    grid = Grid(3, 4, 1)
    x = torch.randn(2, grid.num_tokens, 64)
    with torch.no_grad():
        out = attn(x, LayerPos(enc, 0, enc.prepare(grid)))
        q, k, v = attn.qkv(x).reshape(2, grid.num_tokens, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
        probs = (reference_logits(q, k, enc, 0, grid) * 16 ** -0.5).softmax(-1)  # 1/sqrt(d), not 1/sqrt(2d)
        ref = attn.proj((probs.float() @ v).transpose(1, 2).reshape(2, grid.num_tokens, 64))
    assert attn.scale == 16 ** -0.5
    assert torch.allclose(out, ref, atol=1e-5)


def test_phases_follow_column_then_row():
    enc = make()
    phi = enc.phases(Grid(2, 3, 0))  # tokens row-major: token 4 is row 1, column 1; token 5 row 1, column 2
    f = 10000. ** -(torch.arange(8) / 8)
    assert torch.allclose(phi[5], torch.cat([2 * f, 1 * f]))
    assert torch.allclose(phi[2], torch.cat([2 * f, 0 * f]))


def test_backends_agree():
    model = create_tiny('vit_pope2d_tiny', dynamic_img_size=True).eval()
    with torch.no_grad():
        model.pe.delta.uniform_(-2 * math.pi, 0)
    assert_backends_agree(model, torch.randn(2, 3, 32, 48))  # a 2 x 3 grid


def test_projected_clamp_gradient():
    x = torch.tensor([-7., -7., -1., 0., 0., .5, .5], requires_grad=True)
    y = clamp_projected(x, -2 * math.pi, 0.)
    assert torch.equal(y, x.detach().clamp(-2 * math.pi, 0.))
    y.backward(torch.tensor([-1., 1., 2., 3., -3., 4., -4.]))
    # gradient descent (x -= lr * grad) may move a parameter into the range, never further out
    assert torch.equal(x.grad, torch.tensor([-1., 0., 2., 3., 0., 4., 0.]))


def test_phase_offset_trains_from_zero_init():
    model = create_tiny('vit_pope2d_tiny', dynamic_img_size=True).train()
    assert torch.equal(model.pe.delta, torch.zeros_like(model.pe.delta))  # reference init: on the clamp's bound
    model(torch.randn(2, 3, 32, 48)).square().mean().backward()
    grad = model.pe.delta.grad
    # torch.clamp would give exactly zero here; the projected gradient keeps the inward-pointing half
    assert torch.isfinite(grad).all() and (grad > 0).float().mean() > 0.2 and not (grad < 0).any()
    assert 'pe.delta' in model.no_weight_decay()


def test_dtype_follows_input_without_complex():
    enc = make()
    grid = Grid(2, 2, 1)
    q, k = torch.randn(2, 1, 4, 5, 16, dtype=torch.bfloat16).unbind(0)
    q_t, k_t = enc.rotate(q, k, 0, enc.prepare(grid))
    assert q_t.dtype == k_t.dtype == torch.bfloat16


@pytest.mark.parametrize('kwargs,match', [
    (dict(embed_dim=60), 'must be even, got 15'),
    (dict(theta=0.), 'theta must be positive'),
    (dict(delta_init='normal'), "delta_init must be 'zeros' or 'uniform'"),
    (dict(coord_mode='pixels'), 'unknown coordinate mode'),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_tiny('vit_pope2d_tiny', **kwargs)
