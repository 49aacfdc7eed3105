"""Radial-strip attention beyond the golden set: polar strip layouts, packing, backends, any H x W."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import create_tiny
from visionpe.attention import run_backend, use_backend, xformers_available
from visionpe.pos.rope import apply_rope
from visionpe.models._strips import StripSpec, polar_strips, row_strips
from visionpe.models.rst import RSASBlock, StripAttention


def _polar_bins(h, w, S, rw, A, shifted):
    """Independent per-token sector / band / azimuth bin / ring from the centre, in float64."""
    out = []
    for y in range(h):
        for x in range(w):
            dx, dy = x - (w - 1) / 2, y - (h - 1) / 2
            r = math.sqrt(dx * dx + dy * dy)
            th = float(torch.atan2(torch.tensor(dy, dtype=torch.float64), torch.tensor(dx, dtype=torch.float64)))
            alpha = int(math.floor((th + math.pi) * (A / (2 * math.pi)))) % A
            rho = int(math.floor(r))
            K = A // S
            sector = ((alpha + (K // 2 if shifted else 0)) % A) // K
            band = (rho + (rw // 2 if shifted else 0)) // rw
            out.append((band, sector, alpha, rho))
    return out


@pytest.mark.parametrize('hw,S,rw,A,shifted', [((14, 14), 4, 4, 32, False), ((13, 20), 8, 3, 64, True),
                                              ((7, 7), 1, 8, 16, False), ((9, 5), 2, 2, 12, True)])
def test_polar_layout(hw, S, rw, A, shifted):
    h, w = hw
    lay = polar_strips(h, w, S, rw, A, shifted)
    N, nW, L = h * w, lay.num_windows, lay.max_len
    ref = _polar_bins(h, w, S, rw, A, shifted)
    # every token sits in exactly one slot, and the slot maps back to it
    assert torch.equal(lay.index[lay.inverse], torch.arange(N))
    assert len(set(lay.inverse.tolist())) == N and sum(lay.lengths) == N and max(lay.lengths) == L
    valid = lay.valid if lay.valid is not None else torch.ones(nW, L, dtype=torch.bool)
    assert int(valid.sum()) == N
    idx = lay.index.view(nW, L)
    for s in range(nW):
        toks = idx[s][valid[s]].tolist()
        assert len({ref[t][:2] for t in toks}) == 1, 'a strip mixes sectors or rings'
        assert toks == sorted(toks), 'tokens inside a strip are not in row-major order'
        a = torch.tensor([ref[t][2] for t in toks])
        r = torch.tensor([ref[t][3] for t in toks])
        n = len(toks)
        assert torch.equal(lay.az_offset[s, :n, :n], (a[:, None] - a[None] + A // 2) % A - A // 2)
        assert torch.equal(lay.rad_offset[s, :n, :n], r[:, None] - r[None])
    assert len({ref[t][:2] for t in range(N)}) == nW  # one strip per non-empty (band, sector)
    if nW > 1:
        assert len(set(lay.lengths)) > 1  # strips hold different token counts -> packed with padding
        assert lay.mask is not None and torch.isinf(lay.mask).sum() == nW * L - N


def test_row_layout_pads_last_strip():
    lay = row_strips(3, 10, 4)
    assert lay.num_windows == 9 and lay.max_len == 4 and lay.lengths == (4, 4, 2) * 3
    assert torch.equal(lay.index.view(9, 4)[2], torch.tensor([8, 9, 8, 8]))  # padded slots repeat token 8
    assert torch.isinf(lay.mask[2, 0, 2:]).all() and (lay.mask[2, 0, :2] == 0).all()
    col = row_strips(6, 2, 4, transpose=True)  # 4 x 1 column strips
    assert col.index.view(-1, 4)[0].tolist() == [0, 2, 4, 6]


def _strip_attention(strips='polar', dim=16, heads=2, **kw):
    spec = StripSpec(strips, **kw)
    attn = StripAttention(dim, heads, spec).eval()
    with torch.no_grad():
        for p in attn.rel_pos.parameters():
            p.normal_()
    return attn


def _loop_reference(attn: StripAttention, x, lay, rope=None):
    """Per-strip Python loop with the bias formula written out: the packed path must equal it."""
    B, H, W, C = x.shape
    t = attn.qkv(x).reshape(B, H * W, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = t.unbind(0)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    rp = attn.rel_pos
    A = attn.spec.azimuth_bins
    out = torch.zeros_like(q)
    idx = lay.index.view(lay.num_windows, lay.max_len)
    for s, n in enumerate(lay.lengths):
        toks = idx[s, :n]
        d, e = lay.az_offset[s, :n, :n], lay.rad_offset[s, :n, :n]
        phi, rho = 2 * math.pi * d / A, e * math.pi / attn.spec.ring_width
        bias = (rp.a_p[d % rp.a_p.shape[0]] * torch.cos(phi)[..., None] + rp.b_p[d % rp.b_p.shape[0]]
                * torch.sin(phi)[..., None] + rp.a_r[e % rp.a_r.shape[0]] * torch.cos(rho)[..., None]
                + rp.b_r[e % rp.b_r.shape[0]] * torch.sin(rho)[..., None]).permute(2, 0, 1)
        a = (q[:, :, toks] * attn.scale) @ k[:, :, toks].transpose(-2, -1) + bias
        out[:, :, toks] = a.softmax(-1) @ v[:, :, toks]
    return attn.proj(out.transpose(1, 2).reshape(B, H, W, C))


@pytest.mark.parametrize('hw,shifted', [((11, 13), False), ((8, 8), True)])
def test_packed_strips_equal_loop_reference(hw, shifted):
    attn = _strip_attention(num_sectors=4, ring_width=3, azimuth_bins=24)
    x = torch.randn(2, *hw, 16)
    lay = attn.layout(*hw, x.device, shifted=shifted)
    from visionpe.pos import EncodingContext, LayerPos, build_encoding
    from visionpe.pos.rope import rope_tables
    rope = rope_tables(torch.randn(hw[0] * hw[1], 4), 0)
    enc = build_encoding('rope2d', EncodingContext(dim=attn.dim, depth=1, num_heads=attn.num_heads, grid_size=hw,
                                                   num_prefix_tokens=0))
    with torch.no_grad():
        ref = _loop_reference(attn, x, lay, rope)
        for backend in ('math', 'sdpa'):
            with use_backend(backend):  # the block rotates through the encoding interface (LayerPos.rotate)
                assert torch.allclose(attn(x, lay, LayerPos(enc, 0, rope)), ref, atol=1e-5), backend


def test_padded_keys_zero_probability_and_backends():
    attn = _strip_attention(num_sectors=4, ring_width=2, azimuth_bins=16)
    x = torch.randn(1, 9, 10, 16)
    lay = attn.layout(9, 10, x.device)
    assert lay.mask is not None
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(1, 90, 3, 2, 8).permute(2, 0, 3, 1, 4)
        shape = (1, 2 * lay.num_windows, lay.max_len, 8)
        qw, kw, vw = (t.index_select(2, lay.index).reshape(shape) for t in (q, k, v))
        bias = attn.bias(lay)
        ref, probs = run_backend('math', qw, kw, vw, attn.scale, bias)
        pad = ~lay.valid  # (nW, L)
        probs = probs.view(2, lay.num_windows, lay.max_len, lay.max_len)
        assert torch.equal(probs.masked_select(pad[None, :, None, :]), torch.zeros(int(pad.sum()) * 2 * lay.max_len))
        for name in ('sdpa', 'flex'):
            out, _ = run_backend(name, qw, kw, vw, attn.scale, bias)
            assert torch.allclose(out, ref, atol=1e-5), name
        if torch.cuda.is_available() and xformers_available():
            out, _ = run_backend('xformers', qw.cuda(), kw.cuda(), vw.cuda(), attn.scale, bias.cuda())
            assert torch.allclose(out.cpu(), ref, atol=1e-4)


@pytest.mark.skipif(not (torch.cuda.is_available() and xformers_available()), reason='BlockDiagonalMask path: CUDA + xformers only')
def test_xformers_block_diagonal_equals_padded():
    spec = StripSpec('polar', num_sectors=4, ring_width=2, azimuth_bins=16)
    attn = StripAttention(16, 2, spec, strip_bias=False).cuda().eval()
    x = torch.randn(2, 9, 10, 16, device='cuda')
    with torch.no_grad():
        with use_backend('math'):
            ref = attn(x)
        with use_backend('xformers'):
            assert torch.allclose(attn(x), ref, atol=1e-4)


def test_layout_cached_per_grid():
    attn = _strip_attention(num_sectors=2, ring_width=2, azimuth_bins=8)
    a = attn.layout(6, 7, torch.device('cpu'))
    b = attn.layout(6, 7, torch.device('cpu'))
    assert a.index is b.index and len(attn._layouts) == 1
    attn.layout(7, 6, torch.device('cpu'))
    assert len(attn._layouts) == 2


def test_rsas_block_any_width():
    # the reference block with strips of 8: width 12 leaves a masked 4-token strip per row
    block = RSASBlock(16, (4, 8), ffn_expansion_factor=2, theta_max=3.0).eval()
    x = torch.randn(1, 16, 8, 16)
    with torch.no_grad():
        y = block.attn_branch(x)
        lay = block.attn.layout(8, 16, x.device)
        assert lay.mask is None and lay.num_windows == 16
        z = block.attn_branch(torch.randn(1, 16, 8, 12))
    assert torch.isfinite(y).all() and torch.isfinite(z).all()
    with pytest.raises(ValueError, match='multiples of 8'):
        block(torch.randn(1, 16, 8, 12))


@pytest.mark.parametrize('strips', ['polar', 'row'])
def test_model_any_size_and_backends(strips):
    model = create_tiny('rst_tiny', strips=strips, dynamic_img_size=True, num_classes=4).eval()
    x = torch.randn(1, 3, 100, 164)
    with torch.no_grad():
        with use_backend('math'):
            ref = model(x)
        with use_backend('sdpa'):
            assert torch.allclose(model(x), ref, atol=1e-5)
        assert torch.isfinite(model(torch.randn(1, 3, 33, 65))).all()


def test_polar_rope_and_bad_options():
    model = create_tiny('rst_tiny')
    assert model.stages[0].rope.coord_mode == 'polar'
    with pytest.raises(ValueError, match="strips must be 'row'"):
        create_tiny('rst_tiny', strips='spiral')
    with pytest.raises(ValueError, match='multiple of num_sectors'):
        create_tiny('rst_tiny', azimuth_bins=30, num_sectors=4)
    with pytest.raises(ValueError, match='head dim divisible by 4'):
        create_tiny('rst_tiny', num_heads=(1, 2, 4, 8), embed_dim=34)


def test_length_buckets_equal_one_padded_batch(monkeypatch):
    """Strips grouped by length (several kernel calls) give the one-padded-batch result, forward and
    backward, and cover every token once."""
    import visionpe.models.rst as rst
    attn = _strip_attention(num_sectors=4, ring_width=2, azimuth_bins=24)
    x = torch.randn(2, 23, 19, 16, requires_grad=True)
    lay = attn.layout(23, 19, x.device)
    groups, inverse = rst.length_buckets(attn._layouts, lay)
    assert all(g.pair is not None for g in groups)  # small: each group keeps its offset-pair index
    assert len(groups) > 1 and sum(g.num_windows for g in groups) == lay.num_windows
    valid = [torch.arange(g.max_len)[None, :] < torch.tensor(lay.lengths)[g.windows][:, None] for g in groups]
    tokens = torch.cat([g.index.view(g.num_windows, g.max_len)[ok] for g, ok in zip(groups, valid)])
    assert sorted(tokens.tolist()) == list(range(23 * 19))
    assert sum(g.num_windows * g.max_len for g in groups) < lay.num_windows * lay.max_len
    outs, grads = [], []
    # 0: every strip in one group, padded to the longest; GROUP_COPY_MB 0: biases cut from the whole one
    for fill, copy_mb in ((rst.BUCKET_FILL, rst.GROUP_COPY_MB), (rst.BUCKET_FILL, 0.0), (0.0, 0.0)):
        monkeypatch.setattr(rst, 'BUCKET_FILL', fill)
        monkeypatch.setattr(rst, 'GROUP_COPY_MB', copy_mb)
        attn._layouts.clear()
        with use_backend('sdpa'):
            out = attn(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(x.grad.clone())
        x.grad = None
    for out, grad in zip(outs[1:], grads[1:]):
        assert (outs[0] - out).abs().max().item() < 1e-5
        assert (grads[0] - grad).abs().max().item() < 1e-4
