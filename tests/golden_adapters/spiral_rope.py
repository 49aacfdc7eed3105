"""Spiral RoPE (huajianduzhuo-code/Spiral_RoPE, ``models_v2.vit_models`` with ``rope=True``): the upstream state dict
through visionpe's converter into ``vit_spiral_*`` with the upstream architecture keywords.

Model cases: upstream rebuilds the model at each size (integer positions, clamped to the new grid), which is
``coord_mode='index', border_clamp=True`` on a dynamic-size model. Attention cases: the training model's first
attention at another grid (positions squeezed into the 8 x 8 training extent), ``coord_mode='ref'``.
"""
from __future__ import annotations

from typing import Dict

import timm
import torch

from . import GoldenSet, golden_adapter
from visionpe.convert import convert_state_dict
from visionpe.convert.spiral import UPSTREAM_KWARGS
from visionpe.grid import Grid
from visionpe.pos import EncodingContext, LayerPos, build_encoding

INPUTS = ('input_*', 'attn_x_*')


def build(gs: GoldenSet) -> torch.nn.Module:
    c = gs.config['constructor']
    kw = dict(UPSTREAM_KWARGS, img_size=c['img_size'], patch_size=c['patch_size'], num_classes=c['num_classes'],
              embed_dim=c['embed_dim'], depth=c['depth'], num_heads=c['num_heads'], mlp_ratio=c['mlp_ratio'],
              init_values=c['init_scale'], rotate=c['rotate'], max_freq=c['max_freq_lang'],
              min_freq=c['min_freq_lang'], same_theta=c['same_theta'], dynamic_img_size=True)
    assert c['truncate_percentage'] == 0
    model = timm.create_model('vit_spiral_tiny', **kw).eval()
    model.load_state_dict(convert_state_dict(dict(gs.state_dict), model)[0])
    return model


def _record_attention(attn, pe, out: Dict[str, torch.Tensor], tag: str):
    """Hooks that store q, k, v (before the rope), q/k after it, the context and the output of ``attn``,
    in upstream's token-major layout (B, T, heads, D)."""
    def on_qkv(m, a, o):
        B, T, _ = o.shape
        q, k, v = o.view(B, T, 3, attn.num_heads, -1).unbind(2)
        out[f'q{tag}'], out[f'k{tag}'], out[f'v{tag}'] = q, k, v

    def on_ctx(m, a):
        B, T, _ = a[0].shape
        out[f'attn_ctx{tag}'] = a[0].view(B, T, attn.num_heads, -1)
    real = pe.rotate

    def rotate(q, k, layer, state):
        qr, kr = real(q, k, layer, state)
        if f'q_rot{tag}' not in out:
            out[f'q_rot{tag}'], out[f'k_rot{tag}'] = qr.transpose(1, 2), kr.transpose(1, 2)
            out[f'attn_logits{tag}'] = qr @ kr.transpose(-1, -2) * attn.scale
        return qr, kr
    return [attn.qkv.register_forward_hook(on_qkv), attn.proj.register_forward_pre_hook(on_ctx),
            attn.register_forward_hook(lambda m, a, o: out.__setitem__(f'attn_out{tag}', o))], rotate


def model_case(model, x) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: out.__setitem__('x0', a[0]))]
    rotates = []
    for i, blk in enumerate(model.blocks):
        h, rot = _record_attention(blk.attn, model.pe, out, f'_l{i}')
        hooks += h + [blk.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(f'block_out_l{i}', o))]
        rotates.append(rot)
    model.pe.rotate = lambda q, k, layer, state: rotates[layer](q, k, layer, state)
    try:
        tokens = model.forward_features(x)
    finally:
        del model.pe.rotate
        for h in hooks:
            h.remove()
    p = model.patch_embed.patch_size[0]
    grid = Grid(x.shape[-2] // p, x.shape[-1] // p, 1)
    out['pos_embed'] = model._abs_pos(grid, x.device)
    out['rope_freqs'] = model.pe.angles(grid).repeat_interleave(2, dim=-1)
    out['tokens'] = tokens
    out['features'] = model.forward_head(tokens, pre_logits=True)
    out['logits'] = model.forward_head(tokens)
    return out


def attention_case(model, x) -> Dict[str, torch.Tensor]:
    """The training model's first attention on ``x`` at a g x g grid, upstream's in-model resolution change."""
    g = int(round((x.shape[1] - 1) ** 0.5))
    pe = model.pe
    enc = build_encoding('spiral', EncodingContext(pe.ctx.dim, pe.ctx.depth, pe.ctx.num_heads, pe.ctx.grid_size, 1),
                         rotate=pe.rotations, max_freq=pe.max_freq, min_freq=pe.min_freq, same_theta=pe.same_theta,
                         coord_mode='ref', border_clamp=True)
    enc.load_state_dict(pe.state_dict())
    out: Dict[str, torch.Tensor] = {}
    hooks, rot = _record_attention(model.blocks[0].attn, enc, out, '')
    enc.rotate = rot
    grid = Grid(g, g, 1)
    try:
        model.blocks[0].attn(x, LayerPos(enc, 0, enc.prepare(grid)))
    finally:
        for h in hooks:
            h.remove()
    out['rope_freqs'] = enc.angles(grid).repeat_interleave(2, dim=-1)
    return {f'attn_{k}' if not k.startswith('attn_') else k: v for k, v in out.items()}


@golden_adapter('spiral_rope', inputs=INPUTS)
def spiral_rope(gs: GoldenSet) -> Dict[str, torch.Tensor]:
    model = build(gs)
    out: Dict[str, torch.Tensor] = {}
    for case in gs.config['cases']:
        name = case['name']
        if case['kind'] == 'model':
            got = model_case(model, gs.tensors[f'input_{name}'])
            out.update({f'{k}_{name}': v for k, v in got.items()})
        else:
            suffix = name[len('attn_'):]
            got = attention_case(model, gs.tensors[f'attn_x_{suffix}'])
            out.update({f'{k}_{suffix}': v for k, v in got.items()})
    return out
