"""LookHere (GreenCUBIC/lookhere): directed biases rounded to bfloat16, tanh MLP head, LN eps 1e-5.

Tolerance 1e-6: omitting the bf16 rounding of the per-layer bias (or rounding before the layer
slope) moves the features by 1.5-3e-6 (golden NOTES, quirk 1), so a looser test would not see it.
"""
from __future__ import annotations

import timm
import torch

from . import GoldenSet, cases, golden_adapter
from visionpe.grid import Grid


def build_lookhere(gs: GoldenSet, **overrides):
    c = gs.config['constructor']
    lh = c['lh_config']
    kw = dict(
        img_size=c['img_size'], patch_size=c['patch_size'], in_chans=c['in_chans'], num_classes=c['num_classes'],
        embed_dim=c['embed_dim'], depth=c['depth'], num_heads=c['num_heads'], mlp_ratio=c['mlp_ratio'],
        drop_path_rate=c['drop_path_rate'], proj_drop_rate=c['mlp_dropout'], init_values=c['init_values'],
        qkv_bias=True, norm_eps=1e-5, head='mlp_tanh', dynamic_img_size=True,
        layout=lh['head_directions'], global_slope=lh['global_slope'], layer_slopes=tuple(lh['layer_slopes']),
        distance=lh.get('distance', 'linear'), fill_with=lh.get('fill_with', 'inf'))
    kw.update(overrides)
    return timm.create_model('vit_lookhere_tiny', pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(gs.state_dict_path)), **kw).eval()


@golden_adapter('lookhere', atol=1e-6)
def lookhere(gs: GoldenSet):
    model = build_lookhere(gs)
    p = model.patch_embed.patch_size[0]
    out = {}
    for s, H, W in cases(gs.tensors):
        x = gs.tensors[f'input_{s}']
        tokens = model.forward_features(x)  # the reference uses SDPA with the float bias, so do we
        out[f'features_{s}'] = tokens
        out[f'logits_{s}'] = model.forward_head(tokens)
        grid = Grid(H // p, W // p, model.num_prefix_tokens)
        out[f'lh_bias_{s}'] = torch.stack([model.pe.layer_bias(grid, i) for i in range(len(model.blocks))])
    return out
