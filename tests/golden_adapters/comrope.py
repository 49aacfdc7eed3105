"""ComRoPE code base (Longin-Yu/ComRoPE): ComRoPE-AP / -LD, vanilla RoPE and LieRE attention layers, and
the tiny CLIP-ViT classifiers (model level, through the converter)."""
from __future__ import annotations

from typing import Dict

import timm
import torch

from . import GoldenSet, golden_adapter
from visionpe.attention import Attention, attend
from visionpe.grid import Grid
from visionpe.pos import EncodingContext, LayerPos, build_encoding

TYPES = {'comrope-ap': 'ap', 'comrope-ld': 'ld', 'liere': 'liere', 'vanilla-rope': 'vanilla'}
# position variant -> our coordinate mode (the class token stays at (0.5, 0.5) in both)
COORD_MODES = {'actual': 'normalized', 'trainrel': 'normalized_ref'}
INPUTS = ('hidden_*', 'pixel_values_*', 'positions_*_perturbed')


def _set_positions(enc, case: dict, gs: GoldenSet, grid: Grid, out: Dict[str, torch.Tensor]):
    """Our positions for a case: from the grid (returned for comparison) or the stored perturbed ones."""
    variant = case['position_variant']
    if variant == 'perturbed':
        return enc.state_for_positions(gs.tensors[case['positions']])
    enc.coord_mode = COORD_MODES[variant]
    out[case['positions']] = enc.positions(grid)
    return enc.prepare(grid)


def _attention_set(gs: GoldenSet) -> Dict[str, torch.Tensor]:
    c, full = gs.config['config_kwargs'], gs.config['config_full']
    kind = TYPES[gs.target]
    dim, heads, g = c['hidden_size'], c['num_attention_heads'], gs.config['train_grid']
    opts = dict(comrope_type=kind, block_size=c['block_size'], init_std=c['init_std'],
                prefix_pos=(full['cls_position'], full['cls_position']))
    if kind == 'vanilla':
        opts['theta_base'] = full['theta_base']
    if kind == 'liere':
        opts['scale_factor'] = c['scale_factor']
    enc = build_encoding('comrope', EncodingContext(dim, 1, heads, (g, g), 1), **opts).eval()
    attn = Attention(dim, heads, qkv_bias=True, attn_backend='math').eval()
    sd = gs.state_dict
    attn.qkv.weight.copy_(torch.cat([sd[f'{n}_proj.weight'] for n in 'qkv']))
    attn.qkv.bias.copy_(torch.cat([sd[f'{n}_proj.bias'] for n in 'qkv']))
    attn.proj.weight.copy_(sd['out_proj.weight'])
    attn.proj.bias.copy_(sd['out_proj.bias'])
    if kind == 'ld':
        enc.multiplier[0].copy_(sd['multiplier'].reshape(2, -1))
    if enc.freqs is not None:
        enc.freqs[0].copy_(sd['freqs'] if kind == 'liere' else sd['freqs'][:, 0])

    out = {'exponent_generators_A': enc.generators(0)}
    d = dim // heads
    for case in gs.config['cases']:
        x = gs.tensors[case['hidden']]
        B, L, _ = x.shape
        state = _set_positions(enc, case, gs, Grid(case['grid'], case['grid'], 1), out)
        pos = LayerPos(enc, 0, state)
        out[case['out']] = attn(x, pos)
        q, k, v = attn.qkv(x).reshape(B, L, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = pos.rotate(q, k)
        out[case['attn_probs']] = attend(q, k, v, attn.scale, backend='math', need_probs=True)[1]
        out[case['rotation_blocks']] = enc.rotation_blocks(0, state).transpose(0, 1)  # (L, H|1, t, b, b)
    return out


def _model_set(gs: GoldenSet) -> Dict[str, torch.Tensor]:
    c = gs.config['config_kwargs']
    kind = TYPES[gs.target]
    model = timm.create_model(
        f'vit_comrope_{kind}_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(gs.state_dict_path)),
        img_size=c['image_size'], patch_size=c['patch_size'], embed_dim=c['hidden_size'],
        depth=c['num_hidden_layers'], num_heads=c['num_attention_heads'],
        mlp_ratio=c['intermediate_size'] / c['hidden_size'], num_classes=c['num_class'],
        block_size=c['block_size'], init_std=c['init_std'], ape=None if c['keep_ape'] else 'rowonly',
        # upstream's HF CLIP vision tower
        pre_norm=True, act_layer='quick_gelu', norm_eps=1e-5, fc_norm=True, global_pool='token',
        patch_bias=False, init_values=0, qkv_bias=True, dynamic_img_size=True, attn_backend='math').eval()
    assert c['mlp_intermediate'] == 0
    embeddings = []
    model.norm_pre.register_forward_hook(lambda m, i, o: embeddings.append(o))
    out = {}
    p = model.patch_embed.patch_size
    for case in gs.config['cases']:
        x = gs.tensors[case['pixel_values']]
        grid = Grid(x.shape[-2] // p[0], x.shape[-1] // p[1], model.num_prefix_tokens)
        model.pe.coord_mode = COORD_MODES[case['position_variant']]
        out[case['positions']] = model.pe.positions(grid)
        embeddings.clear()
        tokens = model.forward_features(x)
        out[case['last_hidden_state']] = tokens
        out[case['embeddings_after_pre_layrnorm']] = embeddings[0]
        out[case['pooler_output']] = model.forward_head(tokens, pre_logits=True)
        out[case['logits']] = model.forward_head(tokens)
    return out


@golden_adapter(*TYPES, inputs=INPUTS)
def comrope(gs: GoldenSet) -> Dict[str, torch.Tensor]:
    return _model_set(gs) if gs.config['level'] == 'model' else _attention_set(gs)
