"""DINOv3 RoPE and DINOv3 weights: parity with timm's DINOv3 ViTs and ``RotaryEmbeddingDinoV3`` (fp32, < 1e-5),
the training-time coordinate augmentation under the same seed, and both checkpoint layouts (timm's and
facebookresearch/dinov3's) through ``checkpoint_filter_fn``."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

import visionpe  # noqa: F401
from test_parity_timm import _perturbed
from visionpe.convert import CheckpointMismatchError, convert_state_dict
from visionpe.grid import Grid
from visionpe.pos import EncodingContext, build_encoding

SIZES = [(256, 256), (384, 384), (256, 384)]
PAIRS = [  # ours, timm's, our keywords
    ('vit_rope2d_dinov3_small', 'vit_small_patch16_dinov3', {}),
    ('vit_rope2d_dinov3_small', 'vit_small_patch16_dinov3_qkvb', dict(qkv_bias=True)),
    ('vit_rope2d_dinov3_tiny', 'vit_tiny_patch16_dinov3_qkvb', dict(qkv_bias=True)),
]


def _ref(theirs: str, **kw) -> torch.nn.Module:
    return _perturbed(timm.create_model(theirs, depth=3, num_classes=10, **{'global_pool': 'token', **kw}))


def _ours(name: str, sd: dict, **kw) -> torch.nn.Module:
    return timm.create_model(name, depth=3, dynamic_img_size=True, pretrained=True,
                             pretrained_cfg_overlay=dict(state_dict=sd), **{'num_classes': 10, **kw}).eval()


def _max_diffs(ref, model, size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fr, fo = ref.forward_features(x), model.forward_features(x)
        return (fr - fo).abs().max().item(), (ref.forward_head(fr) - model.forward_head(fo)).abs().max().item()


@pytest.mark.parametrize('ours,theirs,kw', PAIRS)
def test_matches_timm_dinov3(ours, theirs, kw):
    ref = _ref(theirs)
    model = _ours(ours, ref.state_dict(), **kw)
    for size in SIZES:
        diff_feat, diff_logit = _max_diffs(ref, model, size)
        assert diff_feat < 1e-5 and diff_logit < 1e-5, (size, diff_feat, diff_logit)


def test_matches_timm_dinov3_avg_pool_and_full_size():
    """timm's default head (mean of the patch tokens after the final norm, no fc_norm), and one real-size
    ViT-S/16 (12 blocks) at 256 px."""
    ref = _ref('vit_small_patch16_dinov3', global_pool='avg')
    model = _ours('vit_rope2d_dinov3_small', ref.state_dict(), global_pool='avg', fc_norm=False)
    assert max(_max_diffs(ref, model, (256, 384))) < 1e-5
    ref = _perturbed(timm.create_model('vit_small_patch16_dinov3', global_pool='token', num_classes=10))
    model = timm.create_model('vit_rope2d_dinov3_small', num_classes=10, img_size=256, pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=ref.state_dict())).eval()
    assert max(_max_diffs(ref, model, (256, 256))) < 1e-5


def test_parity_is_sensitive_to_the_encoding():
    ref = _ref('vit_small_patch16_dinov3')
    for kw in (dict(base=50.), dict(normalize_coords='max')):
        model = _ours('vit_rope2d_dinov3_small', ref.state_dict(), **kw)
        assert _max_diffs(ref, model, (256, 384))[0] > 1e-3, kw


CTX = EncodingContext(dim=128, depth=1, num_heads=2, grid_size=(16, 16), num_prefix_tokens=5)
ENC_CASES = [dict(), dict(normalize_coords='min'), dict(normalize_coords='max'),
             dict(min_period=0.5, max_period=40.), dict(base=1000.)]


def _timm_rope(kw: dict, **aug) -> RotaryEmbeddingDinoV3:
    kw = dict(kw)
    return RotaryEmbeddingDinoV3(64, temperature=kw.pop('base', 100.), **kw, **aug)


@pytest.mark.parametrize('kw', ENC_CASES)
@pytest.mark.parametrize('hw', [(7, 11), (16, 16)])
def test_tables_equal_timm_rotary_embedding(kw, hw):
    enc = build_encoding('rope2d_dinov3', CTX, **kw).eval()
    sin, cos = enc.prepare(Grid(*hw, 5))
    emb = _timm_rope(kw).eval().get_embed(hw)
    assert torch.all(sin[:5] == 0) and torch.all(cos[:5] == 1)  # class and register tokens: not rotated
    # (float32 rounding: 'min' / 'max' rescale grid.py's centred coordinates; angles reach ~13 rad)
    assert (sin[5:] - emb[:, :64]).abs().max() < 1e-5 and (cos[5:] - emb[:, 64:]).abs().max() < 1e-5


@pytest.mark.parametrize('aug', [dict(shift_coords=0.5), dict(jitter_coords=1.5), dict(rescale_coords=2.),
                                 dict(shift_coords=0.2, jitter_coords=1.3, rescale_coords=2.)])
def test_augmentation_equals_timm_with_the_same_seed(aug):
    enc = build_encoding('rope2d_dinov3', CTX, **aug).train()
    ref = _timm_rope({}, **aug).train()
    hw = (6, 9)
    draws = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        sin, cos = enc.prepare(Grid(*hw, 5))
        torch.manual_seed(seed)
        emb = ref.get_embed(hw)
        assert (sin[5:] - emb[:, :64]).abs().max() < 1e-5 and (cos[5:] - emb[:, 64:]).abs().max() < 1e-5
        draws.append(sin)
    assert (draws[0] - draws[1]).abs().max() > 1e-3  # a new draw per forward
    enc.eval()  # no augmentation at test time
    plain = build_encoding('rope2d_dinov3', CTX).eval().prepare(Grid(*hw, 5))
    assert torch.equal(enc.prepare(Grid(*hw, 5))[0], plain[0])


def test_training_extent_and_bad_options():
    assert build_encoding('rope2d_dinov3', CTX).train_extent() == pytest.approx((2.0, 2.0))
    index = build_encoding('rope2d_dinov3', CTX, coord_mode='index')  # any Cartesian mode: extrapolating coordinates
    assert index.train_extent() == pytest.approx((16.0, 16.0))
    sin, _ = index.prepare(Grid(2, 3, 5))
    assert sin[5 + 4, 64 // 4 + 1].item() == pytest.approx(math.sin(2 * math.pi * 1 / 100 ** (4 / 64)), abs=1e-6)
    for kw, match in [(dict(normalize_coords='mean'), 'normalize_coords must be'),
                      (dict(normalize_coords='max', coord_mode='index'), "needs coord_mode='centered'"),
                      (dict(min_period=1.), 'both min_period and max_period'),
                      (dict(jitter_coords=0.5), 'jitter_coords must be'),
                      (dict(coord_mode='polar'), 'vit_rope2d_polar')]:
        with pytest.raises(ValueError, match=match):
            build_encoding('rope2d_dinov3', CTX, **kw)
    with pytest.raises(ValueError, match='ntk_scale'):
        build_encoding('rope2d_dinov3', CTX, min_period=1., max_period=10., ntk_scale=2.).prepare(Grid(4, 4, 5))


def _official_layout(sd: dict, base: float = 100.) -> dict:
    """timm's DINOv3 keys -> facebookresearch/dinov3's: storage_tokens, ls{1,2}.gamma, one qkv bias with a
    bias_mask that zeroes the key third (whose stored values are arbitrary), mask_token, rope periods."""
    out, g = {}, torch.Generator().manual_seed(7)
    for k, v in sd.items():
        if k.endswith('attn.q_bias'):
            pre = k[:-len('q_bias')]
            k_part = torch.randn(v.shape, generator=g)  # masked out upstream: must not reach the model
            out[pre + 'qkv.bias'] = torch.cat([v, k_part, sd[pre + 'v_bias']])
            out[pre + 'qkv.bias_mask'] = torch.cat([torch.ones_like(v), torch.zeros_like(v), torch.ones_like(v)])
        elif not k.endswith('attn.v_bias'):
            k = k.replace('reg_token', 'storage_tokens')
            out[k.replace('gamma_1', 'ls1.gamma').replace('gamma_2', 'ls2.gamma')] = v
    dim = sd['cls_token'].shape[-1]
    out['mask_token'] = torch.zeros(1, dim)
    head_dim = 64
    out['rope_embed.periods'] = base ** (4 * torch.arange(head_dim // 4) / head_dim)
    out['local_cls_norm.weight'], out['local_cls_norm.bias'] = torch.ones(dim), torch.zeros(dim)
    return out


def test_official_checkpoint_layout(tmp_path):
    ref = _perturbed(timm.create_model('vit_small_patch16_dinov3_qkvb', depth=3, global_pool='token'))
    sd = _official_layout(ref.state_dict())
    torch.save(sd, tmp_path / 'dinov3_vits16_pretrain_lvd1689m-08c60483.pth')
    path = str(tmp_path / 'dinov3_vits16_pretrain_lvd1689m-08c60483.pth')
    model = timm.create_model('vit_rope2d_dinov3_small', depth=3, num_classes=0, qkv_bias=True, dynamic_img_size=True,
                              pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    assert convert_state_dict(sd, model)[1].startswith('DINOv3')
    assert torch.all(model.blocks[0].attn.qkv.bias[384:768] == 0)
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert (ref.forward_features(x) - model.forward_features(x)).abs().max() < 1e-5, size
    # a classifier-less backbone into a model with a head: the head stays freshly initialised
    headed = timm.create_model('vit_rope2d_dinov3_small', depth=3, num_classes=5, qkv_bias=True,
                               pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    assert headed.head.weight.shape == (5, 384)


def test_checkpoint_mismatches_name_the_fix():
    ref = _perturbed(timm.create_model('vit_small_patch16_dinov3_qkvb', depth=2))
    official = _official_layout(ref.state_dict())
    no_bias = timm.create_model('vit_rope2d_dinov3_small', depth=2, num_classes=0)
    with pytest.raises(CheckpointMismatchError, match='qkv_bias=True'):
        convert_state_dict(ref.state_dict(), no_bias)
    with pytest.raises(CheckpointMismatchError, match='periods'):
        convert_state_dict(official, timm.create_model('vit_rope2d_dinov3_small', depth=2, num_classes=0,
                                                       qkv_bias=True, base=50.))
    with pytest.raises(CheckpointMismatchError, match='vit_rope2d_dinov3'):
        convert_state_dict(official, timm.create_model('vit_rope2d_small', depth=2, num_classes=0))
    with pytest.raises(CheckpointMismatchError, match='cls_norm'):
        convert_state_dict({**official, 'cls_norm.weight': torch.ones(384)},
                           timm.create_model('vit_rope2d_dinov3_small', depth=2, num_classes=0, qkv_bias=True))
    # timm's distilled models carry all-zero q/v biases: they load into the bias-free preset
    zero = {k: (torch.zeros_like(v) if k.endswith(('q_bias', 'v_bias')) else v) for k, v in ref.state_dict().items()}
    assert 'blocks.0.attn.qkv.bias' not in convert_state_dict(zero, no_bias)[0]


@pytest.mark.parametrize('size', ['tiny', 'small', 'base', 'large'])
def test_every_size_takes_timm_weights(size):
    """Key names and shapes of timm's DINOv3 ViT of each size fit the preset (built on the meta device)."""
    theirs = {'tiny': 'vit_tiny_patch16_dinov3_qkvb'}.get(size, f'vit_{size}_patch16_dinov3_qkvb')
    with torch.device('meta'):
        ref = timm.create_model(theirs)
        model = timm.create_model(f'vit_rope2d_dinov3_{size}', num_classes=0, qkv_bias=True)
    convert_state_dict(ref.state_dict(), model)  # raises on any missing, unexpected or misshapen key


def test_key_bias_stays_zero_and_gets_no_gradient():
    model = timm.create_model('vit_rope2d_dinov3_tiny', embed_dim=64, depth=2, num_heads=4, qkv_bias=True)
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias.normal_()
    model(torch.randn(1, 3, 224, 224)).sum().backward()
    grad = model.blocks[0].attn.qkv.bias.grad
    assert torch.all(grad[64:128] == 0) and grad[:64].abs().sum() > 0 and grad[128:].abs().sum() > 0
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model.forward_features(x)
        model.blocks[0].attn.qkv.bias[64:128] = 5.0  # the key third is ignored
        assert torch.equal(model.forward_features(x), ref)


@pytest.mark.parametrize('official', [False, True])
def test_swiglu_plus_size_matches_timm(official, tmp_path):
    """vit_rope2d_dinov3_small_plus (SwiGLU MLP) against timm's vit_small_plus_patch16_dinov3_qkvb, from timm's
    keys and from the official layout (mlp.w1 / w2 / w3)."""
    ref = _ref('vit_small_plus_patch16_dinov3_qkvb')
    sd = ref.state_dict()
    if official:
        sd = {k.replace('mlp.fc1_g', 'mlp.w1').replace('mlp.fc1_x', 'mlp.w2').replace('mlp.fc2', 'mlp.w3'): v
              for k, v in _official_layout(sd).items()}
        sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
        assert 'blocks.0.mlp.w1.weight' in sd
    model = _ours('vit_rope2d_dinov3_small_plus', sd, qkv_bias=True, num_classes=0 if official else 10)
    assert model.blocks[0].mlp.fc1_g.out_features == 1536
    for size in SIZES[1:]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert (ref.forward_features(x) - model.forward_features(x)).abs().max() < 1e-5, size


@pytest.mark.parametrize('size', ['small_plus', 'huge_plus'])
def test_plus_sizes_take_timm_weights(size):
    with torch.device('meta'):
        ref = timm.create_model(f'vit_{size}_patch16_dinov3_qkvb')
        model = timm.create_model(f'vit_rope2d_dinov3_{size}', num_classes=0, qkv_bias=True)
    convert_state_dict(ref.state_dict(), model)


def test_plus_size_gradients_reach_every_parameter():
    """The contract tests run the *_tiny presets; the SwiGLU preset gets its own forward/backward check."""
    from helpers import create_tiny
    model = create_tiny('vit_rope2d_dinov3_small_plus', qkv_bias=True, num_classes=7).train()
    out = model(torch.randn(2, 3, 224, 224))
    (out.square().mean() + out.mean()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
