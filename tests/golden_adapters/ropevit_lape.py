"""LaPE and RoPE-ViT (axial, mixed): DeiT-style models in the `features/tokens/logits` format."""
from __future__ import annotations

import timm
import torch

from . import GoldenSet, cases, golden_adapter
from visionpe.grid import Grid


def _build(gs: GoldenSet, name: str, **overrides):
    c = gs.config['constructor']
    kw = dict(img_size=c['img_size'], patch_size=c['patch_size'], embed_dim=c['embed_dim'], depth=c['depth'],
              num_heads=c['num_heads'], mlp_ratio=c['mlp_ratio'], qkv_bias=c['qkv_bias'],
              num_classes=c['num_classes'], dynamic_img_size=True, norm_eps=1e-6)
    kw.update(overrides)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(gs.state_dict_path)),
                             **kw).eval()


def _run(model, gs: GoldenSet, extra):
    out = {}
    for s, H, W in cases(gs.tensors):
        x = gs.tensors[f'input_{s}']
        tokens = model.forward_features(x)
        out[f'tokens_{s}'] = tokens
        out[f'features_{s}'] = tokens[:, 0]
        out[f'logits_{s}'] = model.forward_head(tokens)
        grid = Grid(H // model.patch_embed.patch_size[0], W // model.patch_embed.patch_size[1], model.num_prefix_tokens)
        extra(model, grid, s, out)
    return out


@golden_adapter('lape')
def lape(gs: GoldenSet):
    model = _build(gs, 'vit_lape_tiny', init_values=0, antialias=False)  # 0: no LayerScale

    def extra(m, grid, s, out):
        out[f'pos_embed_{s}'] = m.pe._p0(grid)
        out[f'lape_pe_{s}'] = torch.cat(list(m.pe.prepare(grid)), dim=0)
    return _run(model, gs, extra)


def _rope_tables(m, grid, s, out):
    sin, cos = m.pe.tables(grid)
    out[f'rope_cos_{s}'] = cos[..., grid.num_prefix:, 0::2]
    out[f'rope_sin_{s}'] = sin[..., grid.num_prefix:, 0::2]


@golden_adapter('ropevit_axial')
def ropevit_axial(gs: GoldenSet):
    c = gs.config['constructor']
    assert not c['rope_mixed'] and not c['use_ape']
    model = _build(gs, 'vit_rope2d_tiny', init_values=c['init_scale'], theta=c['rope_theta'])
    return _run(model, gs, _rope_tables)


@golden_adapter('ropevit_mixed')
def ropevit_mixed(gs: GoldenSet):
    c = gs.config['constructor']
    assert c['rope_mixed'] and not c['use_ape']
    model = _build(gs, 'vit_rope2d_mixed_tiny', init_values=c['init_scale'], theta=c['rope_theta'])
    return _run(model, gs, _rope_tables)
