"""CSWin (microsoft/CSWin-Transformer): logits, pooled features, stem / stage / merge outputs and the
LePE-attention branch inputs and outputs, all from the upstream state dict through the converter.

Every tensor is held to 1e-5 except ``stage4_block0_attn0_out`` (values up to 12, behind the qkv x 8
peaked global attention): the golden file itself is 2.1e-5 away from a float64 evaluation of the same
math there (the golden's stem conv already differs by 1.1e-6 from upstream's own op sequence run on
this CPU: another machine's conv rounding, amplified through four stages). Fed the golden
``stage4_block0_attn0_in``, our branch reproduces that output to 3.6e-6.
"""
from __future__ import annotations

import timm
import torch

from . import GoldenSet, cases, golden_adapter


def build_cswin(gs: GoldenSet, **overrides):
    c = gs.config['constructor_kwargs']
    assert c['norm_layer'] == 'torch.nn.LayerNorm' and c['qk_scale'] is None and c['hybrid_backbone'] is None
    kw = dict(img_size=c['img_size'], in_chans=c['in_chans'], num_classes=c['num_classes'],
              embed_dim=c['embed_dim'], depth=c['depth'], split_size=c['split_size'], num_heads=c['num_heads'],
              mlp_ratio=c['mlp_ratio'], qkv_bias=c['qkv_bias'], drop_rate=c['drop_rate'],
              attn_drop_rate=c['attn_drop_rate'], drop_path_rate=c['drop_path_rate'], norm_eps=1e-5,
              dynamic_img_size=True)
    kw.update(overrides)
    return timm.create_model('cswin_tiny', pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(gs.state_dict_path)), **kw).eval()


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])


@golden_adapter('cswin', atol_for=[('stage4_block0_attn0_out_*', 5e-5)])
def cswin(gs: GoldenSet):
    model = build_cswin(gs)
    train_res = gs.config['train_resolution']
    out = {}
    for s, H, W in cases(gs.tensors):
        x = gs.tensors[f'input_{s}']
        captured = {}
        hooks = []
        if (H, W) == (train_res, train_res):
            hooks.append(model.stem.register_forward_hook(
                lambda m, i, o: captured.__setitem__('stem', _tokens(o))))
            for si, stage in enumerate(model.stages):
                hooks.append(stage.register_forward_hook(
                    lambda m, i, o, si=si: captured.__setitem__(f'stage{si + 1}', _tokens(o))))
                if si:
                    hooks.append(stage.downsample.register_forward_hook(
                        lambda m, i, o, si=si: captured.__setitem__(f'merge{si}', _tokens(o))))
                for a, branch in enumerate(stage.blocks[0].attn.branches):
                    def hook(m, inp, o, name=f'stage{si + 1}_block0_attn{a}'):
                        qkv = inp[0]  # (B, H, W, 3, C)
                        captured[f'{name}_in'] = qkv.permute(3, 0, 1, 2, 4).reshape(3, qkv.shape[0], -1, qkv.shape[-1])
                        captured[f'{name}_out'] = _tokens(o)
                    hooks.append(branch.register_forward_hook(hook))
        feats = model.forward_features(x)
        out[f'features_{s}'] = model.forward_head(feats, pre_logits=True)
        out[f'logits_{s}'] = model.forward_head(feats)
        for h in hooks:
            h.remove()
        out.update({f'{k}_{s}': v for k, v in captured.items()})
    return out
