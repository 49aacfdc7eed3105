"""LookHere (GreenCUBIC/lookhere): directed biases rounded to bfloat16, tanh MLP head, LN eps 1e-5.

The stored per-layer biases (``lh_bias_*``) are compared exactly (1e-7 relative): omitting the bf16
rounding of the bias, or rounding before the layer slope (golden NOTES, quirk 1), changes them by up
to 2^-9 relative, while it moves the features by only 1.5-3e-6, which a tolerance that also has to
absorb float32 rounding on wider configurations cannot tell from noise. Features and logits take the
default scaled tolerance (1e-5).
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


@golden_adapter('lookhere', exact=('lh_bias_*',))
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
