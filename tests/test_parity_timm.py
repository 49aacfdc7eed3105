"""Parity with timm's own reference models (fp32, max abs diff < 1e-5).

RoPE-Axial / RoPE-Mixed (also with a learned APE table) against timm's naver ports (timm.models.eva),
the DeiT-III-style APE ViT against timm's deit3, and the PEG against timm's Twins PosConv. Reference
weights are timm's random init plus a perturbation (so that LayerScale, biases and frequencies all
matter); our model loads them through the converters (pretrained=True with the state dict), at several
sizes with dynamic image size on both sides.
"""
from __future__ import annotations

import pytest
import timm
import torch

import visionpe  # noqa: F401
from visionpe.grid import Grid
from visionpe.pos import EncodingContext, build_encoding

PAIRS = [
    ('vit_rope2d_small', 'vit_small_patch16_rope_224'),
    ('vit_rope2d_mixed_small', 'vit_small_patch16_rope_mixed_224'),
    ('vit_ape_small', 'deit3_small_patch16_224'),
    ('vit_rope2d_ape_small', 'vit_small_patch16_rope_ape_224'),
    ('vit_rope2d_mixed_ape_small', 'vit_small_patch16_rope_mixed_ape_224'),
]
SIZES = [(224, 224), (320, 320), (448, 448), (224, 320)]


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


@pytest.mark.parametrize('ours,theirs', PAIRS)
def test_matches_timm_reference(ours, theirs):
    ref = _perturbed(timm.create_model(theirs, depth=3, dynamic_img_size=True))
    model = timm.create_model(ours, depth=3, dynamic_img_size=True, pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=ref.state_dict())).eval()
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            feat_ref, feat = ref.forward_features(x), model.forward_features(x)
            diff_feat = (feat_ref - feat).abs().max().item()
            diff_logit = (ref.forward_head(feat_ref) - model.forward_head(feat)).abs().max().item()
        assert diff_feat < 1e-5 and diff_logit < 1e-5, (size, diff_feat, diff_logit)


def test_full_size_rope_small_matches_timm():
    """One real-size check (ViT-S/16, 12 blocks, 224): not only the shallow test configs."""
    ref = _perturbed(timm.create_model('vit_small_patch16_rope_224'))
    model = timm.create_model('vit_rope2d_small', pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=ref.state_dict())).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ref(x) - model(x)).abs().max().item() < 1e-5


def test_parity_test_is_sensitive():
    """The comparison above fails when the encoding differs (theta), so it can catch mistakes."""
    ref = _perturbed(timm.create_model('vit_small_patch16_rope_224', depth=2, dynamic_img_size=True))
    model = timm.create_model('vit_rope2d_small', depth=2, dynamic_img_size=True, theta=50., pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=ref.state_dict())).eval()
    x = torch.randn(1, 3, 320, 224)
    with torch.no_grad():
        assert (ref.forward_features(x) - model.forward_features(x)).abs().max().item() > 1e-3


@pytest.mark.parametrize('hw', [(14, 14), (10, 17)])
def test_peg_matches_timm_twins_posconv(hw):
    from timm.models.twins import PosConv
    dim = 32
    ref = PosConv(dim, dim, stride=1)
    ctx = EncodingContext(dim=dim, depth=2, num_heads=4, grid_size=(14, 14), num_prefix_tokens=1)
    peg = build_encoding('peg', ctx, layers=[0])
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
        peg.convs['0'].weight.copy_(ref.proj[0].weight)
        peg.convs['0'].bias.copy_(ref.proj[0].bias)
        h, w = hw
        x = torch.randn(2, 1 + h * w, dim)
        out = peg.after_block(x, 0, Grid(h, w, 1), None)
        assert torch.equal(out[:, :1], x[:, :1]), 'prefix token must pass through'
        assert (out[:, 1:] - ref(x[:, 1:], (h, w))).abs().max().item() < 1e-5
        assert torch.equal(peg.after_block(x, 1, Grid(h, w, 1), None), x), 'no PEG after block 1'
