"""PaPE and PaPE-RI (DTU-PAS/parabolic-position-encoding ``ImageClassifier``): the upstream state dict through
visionpe's converter into ``vit_pape_*`` / ``vit_pape_ri_*`` with the upstream architecture keywords.

Widened q/k and the logits hold squared positions (up to ~560 at the 2x grid): like every golden tensor they are
compared scale-relative, ``max|diff| <= 1e-5 * max(1, max|reference|)``, as the golden NOTES prescribe.
PaPE: the widened q/k and logits come from ``layout='upstream'`` (upstream's channels), every other tensor from
the default ``layout='compact'`` (the J parabolas summed into one 2-D quadratic), so both layouts are checked.
"""
from __future__ import annotations

import fnmatch
from typing import Dict

import timm
import torch

from . import GoldenSet, golden_adapter
from visionpe.convert import convert_state_dict
from visionpe.convert.pape import UPSTREAM_KWARGS
from visionpe.grid import Grid



def build(gs: GoldenSet, normalize: bool, class_token: bool = True, layout: str = 'compact') -> torch.nn.Module:
    c = gs.config['constructor']
    m = c['model']
    assert m['head_size'] * m['num_heads'] == m['hidden_size']
    kw = dict(UPSTREAM_KWARGS, img_size=gs.config['derived']['train_hw'], patch_size=c['patch_size'],
              num_classes=c['num_classes'], embed_dim=m['hidden_size'], depth=m['num_layers'],
              num_heads=m['num_heads'], mlp_ratio=m['intermediate_size'] / m['hidden_size'],
              dynamic_img_size=True, normalize=normalize)
    if gs.target == 'pape':
        kw.update(parabolas=c['pape']['parabolas'], layout=layout)
    name = 'vit_pape_tiny' if gs.target == 'pape' else 'vit_pape_ri_tiny'
    sd = dict(gs.state_dict)
    if not class_token:
        kw.update(class_token=False, global_pool='avg', fc_norm=False)
        sd.pop('cls')
    model = timm.create_model(name, **kw).eval()
    model.load_state_dict(convert_state_dict(sd, model)[0])
    return model


def run_case(model: torch.nn.Module, x: torch.Tensor, suffix: str) -> Dict[str, torch.Tensor]:
    """Every stored tensor kind of one case, recorded with hooks around the visionpe model."""
    out: Dict[str, torch.Tensor] = {}
    hooks = [model.norm_pre.register_forward_pre_hook(lambda m, a: out.__setitem__('embeddings', a[0]))]
    for i, blk in enumerate(model.blocks):
        hooks += [
            blk.norm1.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(f'attn_in_l{i}', o)),
            blk.attn.proj.register_forward_pre_hook(lambda m, a, i=i: out.__setitem__(f'attn_ctx_l{i}', a[0])),
            blk.attn.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(f'attn_out_l{i}', o)),
            blk.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(f'layer_out_l{i}', o)),
        ]
    pe = model.pe
    real_rotate = pe.rotate

    def rotate(q, k, layer, state):
        qw, kw = real_rotate(q, k, layer, state)
        out[f'q_wide_l{layer}'], out[f'k_wide_l{layer}'] = qw, kw
        return qw, kw
    pe.rotate = rotate
    try:
        tokens = model.forward_features(x)
    finally:
        del pe.rotate
        for h in hooks:
            h.remove()
    p = model.patch_embed.patch_size[0]
    grid = Grid(x.shape[-2] // p, x.shape[-1] // p, model.num_prefix_tokens)
    out['positions'] = pe.positions(grid).unsqueeze(0)
    out['tokens'] = tokens
    blk = model.blocks[0].attn
    B, N, C = out['attn_in_l0'].shape
    out['v_l0'] = blk.qkv(out['attn_in_l0']).view(B, N, 3, blk.num_heads, -1)[:, :, 2].transpose(1, 2)
    out['attn_logits_l0'] = out['q_wide_l0'] @ out['k_wide_l0'].transpose(-1, -2) * blk.scale
    if model.num_prefix_tokens:
        out['features'] = model.forward_head(tokens, pre_logits=True)
        out['logits'] = model.forward_head(tokens)
    return {f'{k}_{suffix}': v for k, v in out.items()}


@golden_adapter('pape', 'pape_ri')
def pape(gs: GoldenSet) -> Dict[str, torch.Tensor]:
    models = {}
    out: Dict[str, torch.Tensor] = {}
    layouts = ('compact', 'upstream') if gs.target == 'pape' else ('compact',)
    for name in gs.tensors:
        if not name.startswith('input_'):
            continue
        suffix = name[len('input_'):]
        for layout in layouts:
            key = ('norm_' in suffix, not suffix.startswith('nocls_'), layout)
            if key not in models:
                models[key] = build(gs, normalize=key[0], class_token=key[1], layout=layout)
            got = run_case(models[key], gs.tensors[name], suffix)
            widened = {k for k in got if fnmatch.fnmatch(k, 'q_wide_*') or fnmatch.fnmatch(k, 'k_wide_*')
                       or fnmatch.fnmatch(k, 'attn_logits_*')}
            out.update({k: v for k, v in got.items() if (k in widened) == (layout == layouts[-1])
                        or len(layouts) == 1})
    return out
