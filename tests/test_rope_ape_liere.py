"""RoPE + APE (naver RoPE-ViT's variants with a learned absolute table) and the LieRE presets; the size
sweep of every issue-19 preset of this branch (DINOv3's own tests: test_dinov3.py).

timm parity of ``vit_rope2d_ape_small`` / ``vit_rope2d_mixed_ape_small`` is in test_parity_timm.py; here:
naver's own ``.pth`` layout converted, and LieRE's preset row against its golden set's configuration
and through upstream's (ComRoPE code base) checkpoint layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import visionpe  # noqa: F401
from test_parity_timm import _perturbed
from visionpe.convert import convert_state_dict

TINY = dict(embed_dim=64, depth=2, num_heads=4)


def _naver_layout(sd: dict, depth: int) -> dict:
    """timm's port -> naver's ``models/vit_rope.py`` keys: ``freqs`` (2, depth, heads * d/2) and the
    training-grid buffers ``freqs_t_x/y`` for RoPE-Mixed; axial keeps no frequencies at all."""
    out = {}
    for k, v in sd.items():
        if k == 'rope.freqs':
            out['freqs'] = v.reshape(2, depth, -1)
            out['freqs_t_x'], out['freqs_t_y'] = torch.arange(196.) % 14, torch.arange(196.) // 14
        else:
            out[k] = v
    return out


@pytest.mark.parametrize('ours,theirs', [('vit_rope2d_ape_small', 'vit_small_patch16_rope_ape_224'),
                                         ('vit_rope2d_mixed_ape_small', 'vit_small_patch16_rope_mixed_ape_224')])
def test_naver_ape_checkpoint_loads(ours, theirs, tmp_path):
    ref = _perturbed(timm.create_model(theirs, dynamic_img_size=True, **TINY))
    sd = _naver_layout(ref.state_dict(), TINY['depth'])
    assert sd['pos_embed'].shape == (1, 196, 64)  # no class-token entry
    torch.save({'model': sd, 'epoch': 399}, tmp_path / 'naver.pth')
    model = timm.create_model(ours, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'naver.pth')),
                              dynamic_img_size=True, **TINY).eval()
    assert convert_state_dict({'model': sd}, model)[1].startswith('RoPE-ViT')
    for size in [(224, 224), (320, 320), (224, 320)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert (ref(x) - model(x)).abs().max().item() < 1e-5, size


def test_ape_table_matters_and_has_no_class_entry():
    model = timm.create_model('vit_rope2d_ape_tiny', **TINY).eval()
    assert model.pos_embed.shape == (1, 196, 64) and model.no_embed_class
    assert type(model.pe).__name__ == 'RoPE2D' and model.pe.rope_type == 'axial'
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model.forward_features(x)
        model.pos_embed.zero_()
        assert (model.forward_features(x) - ref)[:, 1:].abs().max() > 1e-2


def test_liere_preset_is_the_golden_configuration():
    from conftest import golden_dir
    model = timm.create_model('vit_liere_tiny', **TINY)
    pe = model.pe
    assert pe.comrope_type == 'liere' and pe.coord_mode == 'normalized' and model.pos_embed is None
    assert pe.freqs.shape == (TINY['depth'], TINY['num_heads'], 2, 16 // 4, 4, 4)  # per axis, non-commuting
    cfg_path = golden_dir() / 'comrope_baselines' / 'liere_b4_sf1' / 'config.json'
    if not cfg_path.is_file():
        pytest.skip(f'golden set {cfg_path.parent} not found (set VISIONPE_GOLDEN_DIR to the golden folders)')
    c = json.loads(cfg_path.read_text())['config_kwargs']
    assert (pe.block_size, pe.init_std, pe.scale_factor) == (c['block_size'], c['init_std'], c['scale_factor'])


def test_liere_upstream_file_loads_by_model_name(tmp_path):
    from test_comrope import CLIP, _save, to_upstream
    src = timm.create_model('vit_liere_tiny', **CLIP).eval()
    for p in src.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    path = _save(to_upstream(src), tmp_path)
    dst = timm.create_model('vit_liere_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                            img_size=32).eval()
    assert dst.pe.comrope_type == 'liere' and isinstance(dst.fc_norm, torch.nn.LayerNorm)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dst(x), src(x), atol=1e-6)


# every preset row of issue 19 items 3, 4 and 7, at square and non-square sizes from 32 to 512 px
NEW_PRESETS = ['vit_rope2d_ape_tiny', 'vit_rope2d_mixed_ape_tiny', 'vit_liere_tiny', 'vit_rope2d_dinov3_tiny',
               'vit_rope2d_dinov3_small_plus']
SIZES = [(32, 32), (32, 64), (96, 160), (512, 512), (512, 256)]


@pytest.mark.parametrize('name', NEW_PRESETS)
def test_sizes_32_to_512(name):
    from helpers import create_tiny
    model = create_tiny(name, dynamic_img_size=True, num_classes=3).eval()
    for size in SIZES:
        with torch.no_grad():
            out = model.forward_features(torch.randn(1, 3, *size))
        assert out.shape == (1, model.num_prefix_tokens + size[0] // 16 * size[1] // 16, 64), size
        assert torch.isfinite(out).all(), size


def test_new_encodings_are_in_the_fmnist_study():
    from visionpe.study import load_study
    study = load_study(Path(__file__).resolve().parents[1] / 'configs' / 'study' / 'fmnist.yaml')
    assert {'rope2d_ape', 'rope2d_mixed_ape', 'liere', 'rope2d_dinov3'} <= {j.encoding for j in study.jobs()}
