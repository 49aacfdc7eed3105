"""Swin: parity with timm's swin_transformer, window masks, RoPE in windows, any input size, backends,
checkpoint conversion (microsoft / naver RoPE Swin layouts)."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import visionpe
from visionpe.attention import attend, use_backend
from visionpe.convert import CheckpointMismatchError
from visionpe.models.swin import (PAD_MASK_VALUE, SwinTransformerStage, window_attention_mask)
from visionpe.models._window import log_spaced_coords, relative_position_index, resize_rpb_table

TINY = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=7)


def _perturbed_timm(name='swin_tiny_patch4_window7_224', scale=0.1, **kwargs):
    ref = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * scale)
    return ref


def _load(name, ref, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=ref.state_dict()),
                             **kwargs).eval()


def _maxdiff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------ timm parity
def test_timm_parity_224_features_logits_intermediates():
    ref = _perturbed_timm(num_classes=10, **TINY)
    ours = _load('swin_tiny', ref, num_classes=10, **TINY)
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert _maxdiff(ours.forward_features(x), ref.forward_features(x)) < 1e-5
        assert _maxdiff(ours(x), ref(x)) < 1e-5
        f0, i0 = ref.forward_intermediates(x, norm=True)
        f1, i1 = ours.forward_intermediates(x, norm=True)
        assert _maxdiff(f0, f1) < 1e-5 and all(_maxdiff(a, b) < 1e-5 for a, b in zip(i0, i1))
        assert [t.shape[-1] for t in i1] == [56, 28, 14, 7]
        assert _maxdiff(ours.forward_head(ours.forward_features(x), pre_logits=True),
                        ref.forward_head(ref.forward_features(x), pre_logits=True)) < 1e-5


@pytest.mark.parametrize('size', [(160, 224), (224, 320)])
def test_timm_parity_dynamic_size_timm_padding(size):
    """timm's dynamic mode pads to the window and attends padded tokens; pad_mask=False reproduces it."""
    ref = _perturbed_timm(num_classes=10, dynamic_img_size=True, **TINY)
    ours = _load('swin_tiny', ref, num_classes=10, dynamic_img_size=True, pad_mask=False, window_policy='keep', **TINY)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        assert _maxdiff(ours.forward_features(x), ref.forward_features(x)) < 1e-5
        assert _maxdiff(ours(x), ref(x)) < 1e-5
        # the default (padded keys masked) differs wherever a window is padded
        ours_masked = _load('swin_tiny', ref, num_classes=10, dynamic_img_size=True, **TINY)
        assert _maxdiff(ours_masked(x), ref(x)) > 1e-4


@pytest.mark.parametrize('size', [(160, 224), (320, 320)])
def test_timm_parity_set_input_size(size):
    """set_input_size scales windows with the grid and resamples tables like timm (rpb_resize='beit');
    with window_size=7 it pads instead (timm attends the padding: pad_mask=False)."""
    ref = _perturbed_timm(num_classes=10, **TINY)
    ours = _load('swin_tiny', ref, num_classes=10, rpb_resize='beit', pad_mask=False, **TINY)
    ref.set_input_size(img_size=size)
    ours.set_input_size(img_size=size)
    assert [b.window_size for s in ours.layers for b in s.blocks] == \
        [b.window_size for s in ref.layers for b in s.blocks]
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        assert _maxdiff(ours(x), ref(x)) < 1e-5
    # option (a) through set_input_size: keep 7 x 7 windows (tables resampled back to 7 x 7 in both)
    ref.set_input_size(img_size=size, window_size=7)
    ours.set_input_size(img_size=size, window_size=7)
    with torch.no_grad():
        assert _maxdiff(ours(x), ref(x)) < 1e-5


def test_timm_parity_real_swin_tiny():
    ref = _perturbed_timm(scale=0.02)
    ours = _load('swin_tiny', ref)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _maxdiff(ours(x), ref(x)) < 1e-5


def test_mismatched_checkpoint_raises_clear_error():
    ref = _perturbed_timm(num_classes=10, **{**TINY, 'depths': (2, 2, 4, 2)})
    with pytest.raises(CheckpointMismatchError, match='unexpected keys: .*layers.2.blocks.2'):
        _load('swin_tiny', ref, num_classes=10, **TINY)
    with pytest.raises(CheckpointMismatchError, match='missing keys: .*layers.0.pe.freqs'):
        timm.create_model('swin_rope2d_mixed_tiny', pretrained=True, num_classes=10, **TINY,
                          pretrained_cfg_overlay=dict(state_dict=ref.state_dict()))


# ------------------------------------------------------------------------------------------ windows, masks
def _naive_block(block, x, window, shift, rope=None):
    """Independent reference of one block: loop over windows, real tokens only, explicit region test,
    RoPE as naver's complex multiplication on window-local coordinates."""
    attn = block.attn
    B, H, W, C = x.shape
    (wh, ww), (sh, sw) = window, shift
    h = torch.roll(block.norm1(x), (-sh, -sw), (1, 2))
    qkv = attn.qkv(h).reshape(B, H, W, 3, attn.num_heads, attn.head_dim)
    out = torch.zeros(B, H, W, attn.num_heads * attn.head_dim)
    table = attn.relative_position_bias_table
    for y0 in range(0, H, wh):
        for x0 in range(0, W, ww):
            pts = [(y, xx) for y in range(y0, min(y0 + wh, H)) for xx in range(x0, min(x0 + ww, W))]
            q, k, v = (torch.stack([qkv[:, y, xx, i] for y, xx in pts], 2) for i in range(3))  # (B, heads, n, d)
            if rope is not None:  # rope: (2, heads, d/2) frequencies
                t = torch.tensor([[xx - x0, y - y0] for y, xx in pts], dtype=torch.float32)
                phi = t[:, 0, None, None] * rope[0] + t[:, 1, None, None] * rope[1]  # (n, heads, d/2)
                cis = torch.polar(torch.ones_like(phi), phi).transpose(0, 1)  # (heads, n, d/2)

                def rot(z):
                    zc = torch.view_as_complex(z.float().reshape(*z.shape[:-1], -1, 2).contiguous())
                    return torch.view_as_real(zc * cis).flatten(-2)
                q, k = rot(q), rot(k)
            logits = (q * attn.scale) @ k.transpose(-1, -2)
            if table is not None:
                rows = torch.tensor([[(a[0] - b[0] + wh - 1) * (2 * ww - 1) + (a[1] - b[1] + ww - 1) for b in pts]
                                     for a in pts])
                logits = logits + table[rows].permute(2, 0, 1)
            side = torch.tensor([[(y >= H - sh) if sh else 0, (xx >= W - sw) if sw else 0] for y, xx in pts])
            same = (side[:, None] == side[None]).all(-1)
            logits = logits.masked_fill(~same, float('-inf'))
            o = logits.softmax(-1) @ v  # (B, heads, n, d)
            o = o.permute(0, 2, 1, 3).reshape(B, len(pts), -1)
            for i, (y, xx) in enumerate(pts):
                out[:, y, xx] = o[:, i]
    out = torch.roll(attn.proj(out), (sh, sw), (1, 2))
    x = x + out
    return x + block.mlp(block.norm2(x))


def _axial_freqs(heads, head_dim, theta):
    mag = 1.0 / theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim)
    fx = torch.cat([mag, torch.zeros_like(mag)])
    fy = torch.cat([torch.zeros_like(mag), mag])
    return torch.stack([fx.expand(heads, -1), fy.expand(heads, -1)])


@pytest.mark.parametrize('pe', [None, 'axial', 'mixed'])
@pytest.mark.parametrize('size', [(10, 12), (7, 16), (14, 14)])
def test_stage_matches_naive_window_reference(pe, size):
    """Padded keys get no weight, shifted regions stay apart, RPB / RoPE use window-local offsets."""
    opts = {} if pe is None else dict(pe='rope2d', pe_options=dict(rope_type=pe, theta=100. if pe == 'axial' else 10.),
                                      rel_pos_bias='none')
    stage = SwinTransformerStage(16, 16, size, depth=2, downsample=False, num_heads=2, window_size=(7, 7),
                                 always_partition=True, **opts).eval()
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        out = stage(x)
        ref = x
        for j, blk in enumerate(stage.blocks):
            rope = None
            if pe == 'axial':
                rope = _axial_freqs(2, 8, 100.)
            elif pe == 'mixed':
                rope = stage.pe.freqs[:, j]
            ref = _naive_block(blk, ref, blk.window_size, blk.shift_size, rope)
    assert stage.blocks[1].shift_size == (3, 3)
    assert _maxdiff(out, ref) < 1e-5


def test_padded_keys_get_exactly_zero_weight():
    for shift in [(0, 0), (3, 3)]:
        mask = window_attention_mask((5, 9), (7, 7), shift, pad_mask=True)  # padded to 7 x 14
        q, k, v = torch.randn(3, 2, 2, 49, 8).unbind(0)  # two windows
        _, probs = attend(q, k, v, 8 ** -0.5, bias=mask[:, None], backend='math', need_probs=True)
        valid = torch.zeros(2, 7, 7, dtype=torch.bool)
        valid[0, :5, :] = True
        valid[1, :5, :2] = True
        for w in range(2):
            pad_cols = ~valid[w].reshape(49)
            assert (probs[w][..., pad_cols] == 0).all()
            assert (probs[w][:, valid[w].reshape(49)].sum(-1) - 1).abs().max() < 1e-5
    assert PAD_MASK_VALUE <= -1e4


def test_padding_equals_unpadded_runs_rope():
    """Real tokens of a padded window see exactly what an unpadded run on those tokens sees (RoPE:
    window-local coordinates do not depend on the padding)."""
    stage = SwinTransformerStage(16, 16, (7, 10), depth=1, downsample=False, num_heads=2, window_size=(7, 7),
                                 rel_pos_bias='none', pe='rope2d', pe_options=dict(rope_type='mixed')).eval()
    x = torch.randn(2, 7, 10, 16)
    with torch.no_grad():
        full = stage(x)                                  # 7 x 10 padded to 7 x 14, keys masked
        left = stage(x[:, :, :7], window=(7, 7))        # unpadded 7 x 7 window
        right = stage(x[:, :, 7:], window=(7, 3))       # unpadded 7 x 3 window
        assert _maxdiff(full, torch.cat([left, right], 2)) < 1e-6
        stage.blocks[0].pad_mask = False                 # attending to padding changes the real tokens
        stage._masks.clear()
        assert _maxdiff(stage(x)[:, :, 7:], right) > 1e-3


def test_window_mask_equals_timm_without_padding():
    from timm.models.swin_transformer import SwinTransformerBlock as TimmBlock
    blk = TimmBlock(16, (14, 21), num_heads=2, window_size=7, shift_size=3)
    for pad_mask in (True, False):
        ours = window_attention_mask((14, 21), (7, 7), (3, 3), pad_mask=pad_mask)
        assert torch.equal(ours, blk.attn_mask)
    blk = TimmBlock(16, (10, 12), num_heads=2, window_size=7, shift_size=3, dynamic_mask=False)
    assert torch.equal(window_attention_mask((10, 12), (7, 7), (3, 3), pad_mask=False), blk.attn_mask)


# ------------------------------------------------------------------------------------------ any input size
@pytest.mark.parametrize('name', ['swin_tiny', 'swin_rope2d_tiny', 'swin_rope2d_mixed_tiny', 'swin_cpb_tiny'])
def test_window_policy_scale_equals_set_input_size(name):
    """Option (b): a dynamic call grows the windows exactly as set_input_size does (224x320: (7, 10))."""
    dyn = timm.create_model(name, dynamic_img_size=True, window_policy='scale', num_classes=5, **TINY).eval()
    fixed = timm.create_model(name, num_classes=5, **TINY).eval()
    fixed.load_state_dict(dyn.state_dict())
    fixed.set_input_size(img_size=(224, 320))
    assert fixed.layers[0].blocks[0].window_size == (7, 10)
    x = torch.randn(1, 3, 224, 320)
    with torch.no_grad():
        assert _maxdiff(dyn(x), fixed(x)) < 1e-5
        keep = timm.create_model(name, dynamic_img_size=True, window_policy='keep', num_classes=5, **TINY).eval()
        keep.load_state_dict(dyn.state_dict())
        assert _maxdiff(keep(x), dyn(x)) > 1e-5  # option (a): same weights, 7 x 7 windows + padding


@pytest.mark.parametrize('name', ['swin_rope2d_tiny', 'swin_rope2d_mixed_tiny'])
@pytest.mark.parametrize('policy', ['keep', 'scale'])
def test_rope_non_square_sizes(name, policy):
    model = timm.create_model(name, dynamic_img_size=True, window_policy=policy, num_classes=5, **TINY).eval()
    with torch.no_grad():
        for size in [(160, 224), (224, 320), (96, 160)]:
            out, inter = model.forward_intermediates(torch.randn(1, 3, *size))
            assert torch.isfinite(out).all() and out.shape[1:3] == (size[0] // 32, size[1] // 32)
            assert [t.shape[-2:] for t in inter] == [(size[0] // r, size[1] // r) for r in (4, 8, 16, 32)]


def test_gradients_every_parameter_padded_scaled():
    model = timm.create_model('swin_tiny', dynamic_img_size=True, window_policy='scale', num_classes=5,
                              attn_backend='sdpa', **TINY).train()
    out = model(torch.randn(2, 3, 200, 264))  # grid 50 x 66: windows (6, 8), padded, table resampled
    assert model._call_windows((50, 66))[0] == (6, 8)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_features_only_strides_non_square():
    model = timm.create_model('swin_rope2d_mixed_tiny', features_only=True, dynamic_img_size=True, **TINY).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [32, 64, 128, 256]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 160, 224))
    assert [tuple(o.shape[1:]) for o in outs] == [(32, 40, 56), (64, 20, 28), (128, 10, 14), (256, 5, 7)]


# ------------------------------------------------------------------------------------------ backends
@pytest.mark.parametrize('name', ['swin_tiny', 'swin_rope2d_mixed_tiny'])
def test_backends_agree_math_sdpa(name):
    model = timm.create_model(name, dynamic_img_size=True, window_policy='keep', num_classes=5, **TINY).eval()
    x = torch.randn(2, 3, 160, 224)  # padded windows, shifted windows, folded bias
    with torch.no_grad():
        with use_backend('math'):
            ref = model.forward_features(x)
        with use_backend('sdpa'):
            assert _maxdiff(model.forward_features(x), ref) < 1e-5


@pytest.mark.skipif(not visionpe.attention.flex_available(), reason='FlexAttention not in this torch build')
def test_backend_flex_eval_tiny():
    model = timm.create_model('swin_tiny', embed_dim=16, depths=(2,), num_heads=(2,), window_size=7,
                              dynamic_img_size=True, num_classes=3).eval()
    x = torch.randn(1, 3, 40, 56)  # 10 x 14 grid: padded and shifted windows
    with torch.no_grad():
        with use_backend('math'):
            ref = model.forward_features(x)
        with use_backend('flex'):
            assert _maxdiff(model.forward_features(x), ref) < 1e-5


# ------------------------------------------------------------------------------------------ parts
def test_relative_position_index_matches_timm():
    from timm.models.swin_transformer import get_relative_position_index
    for win in [(7, 7), (5, 9)]:
        assert torch.equal(relative_position_index(*win), get_relative_position_index(*win))


def test_cpb_coords_match_timm_swinv2():
    from timm.models.swin_transformer_v2 import WindowAttention as V2Attention
    v2 = V2Attention(16, (7, 10), num_heads=2, pretrained_window_size=(7, 7))
    assert torch.allclose(log_spaced_coords((7, 10), (7, 7)), v2.relative_coords_table.reshape(-1, 2), atol=1e-6)


def test_rpb_resize_modes():
    table = torch.randn(13 * 13, 3)
    assert resize_rpb_table(table, (7, 7), (7, 7)) is table
    assert resize_rpb_table(table, (7, 10), (7, 7), 'bicubic').shape == (13 * 19, 3)
    assert resize_rpb_table(table, (7, 10), (7, 7), 'beit').shape == (13 * 19, 3)
    # bicubic on a constant table is exact
    const = torch.full((13 * 13, 2), 0.5)
    assert torch.allclose(resize_rpb_table(const, (5, 9), (7, 7)), torch.full((9 * 17, 2), 0.5), atol=1e-6)
    with pytest.raises(ValueError, match='rpb_resize'):
        resize_rpb_table(table, (5, 5), (7, 7), 'nearest')


def test_no_weight_decay_lists_tables_and_freqs():
    m = timm.create_model('swin_tiny', **TINY)
    nwd = m.no_weight_decay()
    assert 'layers.0.blocks.0.attn.relative_position_bias_table' in nwd
    assert len([n for n in nwd if n.endswith('relative_position_bias_table')]) == 8
    m = timm.create_model('swin_rope2d_mixed_tiny', **TINY)
    assert {f'layers.{i}.pe.freqs' for i in range(4)} <= m.no_weight_decay()
    assert tuple(m.layers[2].pe.freqs.shape) == (2, 2, 8, 8)  # (2, depth, heads, d/2)
    assert not any('relative_position_bias_table' in n for n, _ in m.named_parameters())


def test_options_and_errors():
    m = timm.create_model('swin_rope2d_tiny', theta=50., coord_mode='ref', rel_pos_bias='table', **TINY)
    assert m.layers[0].pe.theta == 50. and m.layers[0].pe.coord_mode == 'ref'
    assert m.layers[0].blocks[0].attn.relative_position_bias_table is not None
    with pytest.raises(ValueError, match='window_policy'):
        timm.create_model('swin_tiny', window_policy='grow', **TINY)
    with pytest.raises(ValueError, match="act on q and k only"):
        timm.create_model('swin_tiny', pe='peg', **TINY)
    with pytest.raises(TypeError, match='unknown argument'):
        timm.create_model('swin_tiny', theta=3., **TINY)
    m = timm.create_model('swin_tiny', **TINY).eval()
    with pytest.raises(ValueError, match='set_input_size|dynamic_img_size'):
        m(torch.randn(1, 3, 160, 160))
    with pytest.raises(ValueError, match='not a multiple of the patch size'):
        timm.create_model('swin_tiny', dynamic_img_size=True, **TINY)(torch.randn(1, 3, 162, 160))


def test_pope_widens_qk_in_windows_masked_and_plain(monkeypatch):
    """PoPE turns q, k (d) into (2d) vectors (``keeps_head_dim=False``); Swin's masked path folds windows
    into heads and must keep that width: the folded path equals per-window attention with the mask added."""
    m = timm.create_model('swin_tiny', pe='pope2d', **TINY).eval()
    stage = m.layers[0]
    assert not stage.pe.keeps_head_dim and stage.pe.qk_only
    blk = stage.blocks[1]  # shifted: the masked path
    x = torch.randn(2, 14, 21, 32)
    win, shift = blk.window_shift((14, 21), None)
    assert any(shift)
    from visionpe.grid import Grid
    from visionpe.pos import LayerPos
    pos = LayerPos(stage.pe, 1, stage.pe.prepare(Grid(*win, 0)))
    with torch.no_grad():
        folded = blk(x, win, shift, stage.window_mask((14, 21), win, shift, blk), pos)
        # reference: the same block with the mask expanded per window and batch (no folding into heads)
        attn = blk.attn
        mask = window_attention_mask((14, 21), win, shift, blk.pad_mask)  # (nW, N, N)
        calls = []

        def per_window(t, window, mask_, pos_):
            B_, N, _ = t.shape
            q, k, v = attn.qkv(t).reshape(B_, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = pos_.rotate(q, k)
            calls.append(q.shape[-1])
            bias = attn.position_bias(window).unsqueeze(0) + mask.repeat(B_ // mask.shape[0], 1, 1).unsqueeze(1)
            out, _ = attend(q, k, v, attn.scale, bias, backend='math')
            return attn.proj(out.transpose(1, 2).reshape(B_, N, -1))
        with monkeypatch.context() as mp:
            mp.setattr(attn, 'forward', per_window)
            ref = blk(x, win, shift, None, pos)
    assert calls == [2 * attn.head_dim]
    assert torch.allclose(folded, ref, atol=1e-5)
    y = m(torch.randn(1, 3, 224, 224))
    y.sum().backward()
    assert stage.pe.delta.grad is not None and torch.isfinite(y).all()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        outs = {}
        for backend in ('math', 'sdpa'):
            with use_backend(backend):
                outs[backend] = m(x)
    assert torch.allclose(outs['math'], outs['sdpa'], atol=1e-5)


# ------------------------------------------------------------------------------------------ converters
def _to_original_layout(sd):
    """timm keys -> microsoft Swin keys (patch merging at the end of a stage, plain head, buffers)."""
    import re
    out = {}
    for k, v in sd.items():
        k = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) - 1}.downsample', k)
        out[k.replace('head.fc.', 'head.')] = v
        if k.endswith('relative_position_bias_table'):
            out[k.replace('relative_position_bias_table', 'relative_position_index')] = relative_position_index(7, 7)
    return out


def test_convert_microsoft_layout():
    ref = _perturbed_timm(num_classes=10, **TINY)
    sd = _to_original_layout(ref.state_dict())
    assert 'layers.0.downsample.reduction.weight' in sd
    ours = timm.create_model('swin_tiny', pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd),
                             num_classes=10, **TINY).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _maxdiff(ours(x), ref(x)) < 1e-5


@pytest.mark.parametrize('mixed', [True, False])
def test_convert_naver_rope_swin(mixed, tmp_path):
    """naver's RoPE Swin keeps (2, heads, d/2) frequencies per block (a buffer for axial, theta 50)."""
    name = 'swin_rope2d_mixed_tiny' if mixed else 'swin_rope2d_tiny'
    src = timm.create_model(name, num_classes=10, theta=10. if mixed else 50., **TINY).eval()
    sd = {}
    for k, v in _to_original_layout(src.state_dict()).items():
        if '.pe.freqs' not in k:
            sd[k] = v
    for i, stage in enumerate(src.layers):
        heads, d = stage.blocks[0].attn.num_heads, stage.blocks[0].attn.head_dim
        for j in range(len(stage.blocks)):
            p = f'layers.{i}.blocks.{j}.attn.'
            sd[p + 'rope_freqs'] = stage.pe.freqs[:, j].clone() if mixed else _axial_freqs(heads, d, 50.)
            sd[p + 'rope_t_x'] = torch.zeros(49)
            sd[p + 'rope_t_y'] = torch.zeros(49)
    path = tmp_path / 'rope_swin.pth'
    torch.save({'model': sd}, path)
    ours = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             num_classes=10, **TINY).eval()
    assert ours.layers[0].pe.theta == (10. if mixed else 50.)  # axial theta read from the file
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _maxdiff(ours(x), src(x)) < 1e-5
    if not mixed:
        with pytest.raises(CheckpointMismatchError, match='theta 50.*theta=50'):
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd),
                              num_classes=10, **TINY)


def test_axial_theta_inference():
    from visionpe.convert.swin import axial_theta
    assert math.isclose(axial_theta(_axial_freqs(3, 32, 50.)), 50.)
    assert axial_theta(torch.randn(2, 3, 16)) is None


def test_num_heads_must_divide_each_stage_width():
    """issue 17: (3, 2) heads on stage widths (16, 32) built a head dim of 5 (16 // 3) silently; rejected now."""
    with pytest.raises(ValueError, match=r'stage 0: width 16 is not divisible by num_heads 3'):
        timm.create_model('swin_tiny', embed_dim=16, depths=(1, 1), num_heads=(3, 2), window_size=4, img_size=32)
    timm.create_model('swin_tiny', embed_dim=16, depths=(1, 1), num_heads=(3, 2), head_dim=4, window_size=4,
                      img_size=32)  # an explicit head_dim sets the attention width itself
