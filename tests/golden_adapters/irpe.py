"""iRPE on DeiT (microsoft/Cream DeiT-with-iRPE): contextual on k / q,k,v, and bias mode.

The model is built from ``config.json`` through ``timm.create_model(..., pretrained=True)`` so the
iRPE converter runs on the upstream ``state_dict.safetensors``. Besides logits and features it
returns every block output, the bucket matrices, the resampled absolute tables and the inputs
and outputs of the reference's ``rpe_q`` / ``rpe_k`` / ``rpe_v`` modules (recorded from our
encoding's ``term_qk`` / ``term_v``, the same quantities).
"""
from __future__ import annotations

import timm
import torch

from . import GoldenSet, cases, golden_adapter
from visionpe.attention import use_backend
from visionpe.grid import Grid


def build_irpe(gs: GoldenSet):
    c, rpe = gs.config['constructor_kwargs'], gs.config['rpe_config_kwargs']
    assert c['qk_scale'] is None and c['hybrid_backbone'] is None and 'eps=1e-06' in c['norm_layer']
    assert rpe['skip'] == 1
    name = 'vit_irpe_bias_tiny' if rpe['mode'] == 'bias' else 'vit_irpe_tiny'
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(gs.state_dict_path)),
        img_size=c['img_size'], patch_size=c['patch_size'], in_chans=c['in_chans'], num_classes=c['num_classes'],
        embed_dim=c['embed_dim'], depth=c['depth'], num_heads=c['num_heads'], mlp_ratio=c['mlp_ratio'],
        qkv_bias=c['qkv_bias'], drop_rate=c['drop_rate'], attn_drop_rate=c['attn_drop_rate'],
        drop_path_rate=c['drop_path_rate'], norm_eps=1e-6, init_values=0, no_embed_class=False,
        pos_embed_antialias=False, dynamic_img_size=True,
        mode=rpe['mode'], method=rpe['method'], ratio=rpe['ratio'], shared_head=rpe['shared_head'],
        rpe_on=rpe['rpe_on'], prefix_bucket=True,
    ).eval()


def _record(enc, store):
    """Wrap the encoding's reference-module outputs to record their inputs and outputs per layer."""
    term_qk, term_v = enc.term_qk, enc.term_v

    def rec_qk(which, x, layer, state, **kw):
        out = term_qk(which, x, layer, state, **kw)
        store[f'rpe_{which}_in_block{layer}'], store[f'rpe_{which}_out_block{layer}'] = x, out
        return out

    def rec_v(probs, layer, state):
        out = term_v(probs, layer, state)
        store[f'rpe_v_in_block{layer}'], store[f'rpe_v_out_block{layer}'] = probs, out
        return out
    enc.term_qk, enc.term_v = rec_qk, rec_v


@golden_adapter('irpe_ctx_k', 'irpe_ctx_qkv', 'irpe_bias')
def irpe(gs: GoldenSet):
    model = build_irpe(gs)
    train = gs.config['train_resolution']
    p = model.patch_embed.patch_size[0]
    out = {}
    for s, H, W in cases(gs.tensors):
        x = gs.tensors[f'input_{s}']
        grid = Grid(H // p, W // p, model.num_prefix_tokens)
        rec = {}
        if (H, W) == (train, train):
            # the reference modules' inputs and outputs: through term_qk (not the factorized product bias),
            # with autograd on so that the q-side term is term_qk's output transposed
            _record(model.pe, rec)
            model.pe.factorized = False
            with use_backend('math'), torch.enable_grad():
                model(x)
            model.pe.factorized = True
            del model.pe.term_qk, model.pe.term_v  # back to the class methods
        with use_backend('math'), torch.enable_grad():
            final, inter = model.forward_intermediates(x, output_fmt='NLC', return_prefix_tokens=True)
        for i, (patches, prefix) in enumerate(inter):
            out[f'block{i}_out_{s}'] = torch.cat([prefix, patches], dim=1)
        out[f'features_{s}'] = final[:, 0]
        out[f'logits_{s}'] = model.forward_head(final)
        out[f'rp_bucket_{s}'] = model.pe.bucket_ids(grid)[0]
        if (H, W) != (train, train):
            out[f'pos_embed_{s}'] = model._abs_pos(grid, x.device)
        else:
            out.update({f'{k}_{s}': v for k, v in rec.items()})
    return out
