"""CSWin + LePE beyond the golden set: padding with key masks, any H x W, backends, checkpoints."""
from __future__ import annotations


import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import golden_dir
from helpers import create_tiny
from visionpe.attention import attend, run_backend, use_backend, xformers_available
from visionpe.convert import CheckpointMismatchError
from visionpe.models.cswin import StripeAttention

GOLDEN = golden_dir() / 'cswin'


def _branch(orientation: str, dim: int = 8, heads: int = 2, sw: int = 3) -> StripeAttention:
    br = StripeAttention(dim, heads, sw, orientation).eval()
    with torch.no_grad():
        br.lepe.conv.weight.normal_()
        br.lepe.conv.bias.normal_()
    return br


def _reference_branch(br: StripeAttention, qkv: torch.Tensor) -> torch.Tensor:
    """Loop over the stripes at their true (possibly narrower) size: no padding, no mask."""
    B, H, W, _, C = qkv.shape
    Hs, Ws = br.window_size(H, W)
    out = torch.zeros(B, H, W, C)
    for r0 in range(0, H, Hs):
        for c0 in range(0, W, Ws):
            t = qkv[:, r0:r0 + Hs, c0:c0 + Ws]  # (B, h, w, 3, C)
            h, w = t.shape[1:3]
            q, k, v = (t[..., i, :].reshape(B, h * w, br.num_heads, br.head_dim).transpose(1, 2) for i in range(3))
            a = ((q * br.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
            img = t[..., 2, :].permute(0, 3, 1, 2)
            lepe = F.conv2d(img, br.lepe.conv.weight, br.lepe.conv.bias, padding=1, groups=C)
            o = a.transpose(1, 2).reshape(B, h, w, C) + lepe.permute(0, 2, 3, 1)
            out[:, r0:r0 + h, c0:c0 + w] = o
    return out


@pytest.mark.parametrize('orientation,hw', [('vertical', (5, 8)), ('horizontal', (7, 4)), ('vertical', (6, 9)),
                                            ('full', (5, 7))])
def test_padded_stripes_equal_unpadded_reference(orientation, hw):
    br = _branch(orientation)
    qkv = torch.randn(2, *hw, 3, 8)
    with torch.no_grad():
        ref = _reference_branch(br, qkv)
        for backend in ('math', 'sdpa'):
            with use_backend(backend):
                assert torch.allclose(br(qkv), ref, atol=1e-5), backend


def test_padded_keys_get_zero_probability():
    br = _branch('vertical', sw=3)
    qkv = torch.randn(1, 4, 7, 3, 8)  # 7 columns -> stripes of 3, 3, 1 (+2 padded)
    q, k, v, mask, meta = br.partition(qkv)
    assert mask is not None and meta[-1] == 3
    _, probs = attend(q, k, v, br.scale, bias=mask, backend='math', need_probs=True)
    probs = probs.reshape(1, 3, br.num_heads, 4, 3, 4, 3)  # (B, stripe, head, query r, c, key r, c)
    assert torch.equal(probs[:, 2, :, :, :, :, 1:], torch.zeros_like(probs[:, 2, :, :, :, :, 1:]))
    assert torch.allclose(probs.sum((-2, -1)), torch.ones(1, 3, br.num_heads, 4, 3))
    assert mask.shape == (1, 3 * br.num_heads, 12, 12)


def test_every_backend_equals_math():
    br = _branch('horizontal', sw=2)
    qkv = torch.randn(2, 5, 6, 3, 8)  # 5 rows -> padded
    with torch.no_grad():
        q, k, v, mask, _ = br.partition(qkv)
        ref, _ = run_backend('math', q, k, v, br.scale, mask)
        for name in ('sdpa', 'flex'):
            out, _ = run_backend(name, q, k, v, br.scale, mask)
            assert torch.allclose(out, ref, atol=1e-5), name
        if torch.cuda.is_available() and xformers_available():
            dev = [t.cuda() for t in (q, k, v, mask)]
            out, _ = run_backend('xformers', *dev[:3], br.scale, dev[3])
            assert torch.allclose(out.cpu(), ref, atol=1e-4)


def test_model_backends_agree_non_square():
    model = create_tiny('cswin_tiny', dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 100, 164)  # stage sides 25x41, 13x21, 7x11, 4x6: every stripe branch pads
    with torch.no_grad():
        with use_backend('math'):
            ref = model(x)
        with use_backend('sdpa'):
            assert torch.allclose(model(x), ref, atol=1e-5)


@pytest.mark.parametrize('hw', [(100, 164), (230, 224), (33, 65)])
def test_any_size(hw):
    model = create_tiny('cswin_tiny', dynamic_img_size=True, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
        feats = model.forward_intermediates(torch.randn(1, 3, *hw), intermediates_only=True)
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    h, w = (hw[0] + 1) // 4, (hw[1] + 1) // 4  # 7x7 / stride 4 / padding 2 stem
    for f in feats:
        assert f.shape[-2:] == (h, w)
        h, w = -(-h // 2), -(-w // 2)


def test_strict_size_error_names_the_fix():
    model = create_tiny('cswin_tiny').eval()
    with pytest.raises(ValueError, match='dynamic_img_size=True.*set_input_size'):
        model(torch.randn(1, 3, 160, 160))


def test_upstream_full_attention_switch():
    # upstream: a stage whose side at img_size equals its stripe width becomes one full-attention branch
    model = timm.create_model('cswin_tiny', img_size=112, embed_dim=32, depth=(1, 1, 1, 1), num_heads=(2, 2, 4, 4))
    branches = [len(s.blocks[0].attn.branches) for s in model.stages]
    assert branches == [2, 2, 1, 1]  # stage 3: 112 // 16 == 7 == split_size[2]
    assert model.stages[2].blocks[0].attn.branches[0].lepe.conv.weight.shape[0] == 128


@pytest.mark.skipif(not (GOLDEN / 'config.json').is_file(), reason=f'golden vectors not found at {GOLDEN}')
def test_official_pth_container_loads(tmp_path):
    """An upstream .pth (EMA weights in a training container) loads through pretrained_cfg_overlay."""
    import json
    from safetensors.torch import load_file
    cfg = json.loads((GOLDEN / 'config.json').read_text())
    c = cfg['constructor_kwargs']
    sd = load_file(str(GOLDEN / 'state_dict.safetensors'))
    expected = load_file(str(GOLDEN / 'tensors.safetensors'))
    kw = dict(img_size=c['img_size'], num_classes=c['num_classes'], embed_dim=c['embed_dim'], depth=c['depth'],
              split_size=c['split_size'], num_heads=c['num_heads'])
    path = tmp_path / 'cswin_upstream.pth'
    torch.save({'epoch': 299, 'arch': 'CSWin_64_12211_tiny_224', 'version': 2,
                'state_dict': {k: torch.zeros_like(v) for k, v in sd.items()},
                'state_dict_ema': {f'module.{k}': v for k, v in sd.items()}}, path)
    model = timm.create_model('cswin_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()
    with torch.no_grad():
        assert torch.allclose(model(expected['input_64x64']), expected['logits_64x64'], atol=1e-5)
    # a checkpoint that does not fit names the keys
    bad = dict(sd)
    bad.pop('stage2.0.attns.1.get_v.weight')
    torch.save({'state_dict_ema': bad}, path)
    with pytest.raises(CheckpointMismatchError, match=r'stages\.1\.blocks\.0\.attn\.branches\.1\.lepe\.conv\.weight'):
        timm.create_model('cswin_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)


def test_lepe_encoding_in_vit():
    """LePE as a value-hook encoding of the plain ViT: conv of V over the patch grid, nothing on the class token."""
    # mean pooling: with class-token pooling the last block's LePE (patch tokens only) cannot reach the output
    model = timm.create_model('vit_nope_tiny', pe='lepe', embed_dim=32, depth=2, num_heads=2, img_size=32,
                              patch_size=8, num_classes=3, global_pool='avg')
    enc = model.pe
    with torch.no_grad():
        for m in enc.lepe:
            m.conv.weight.normal_()
    from visionpe.grid import Grid
    grid = Grid(4, 4, 1)
    v = torch.randn(2, 2, 17, 16)
    out = torch.randn(2, 2, 17, 16)
    got = enc.value(out, v, None, 1, enc.prepare(grid))
    img = v[:, :, 1:].permute(0, 1, 3, 2).reshape(2, 32, 4, 4)
    term = enc.lepe[1].conv(img).reshape(2, 2, 16, 16).permute(0, 1, 3, 2)
    assert torch.allclose(got[:, :, 1:], out[:, :, 1:] + term, atol=1e-6)
    assert torch.equal(got[:, :, :1], out[:, :, :1])
    y = model(torch.randn(2, 3, 32, 32))
    y.square().mean().backward()
    assert all(m.conv.weight.grad is not None and m.conv.weight.grad.abs().sum() > 0 for m in enc.lepe)
