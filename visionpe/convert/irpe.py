"""iRPE checkpoints (microsoft/Cream ``iRPE/DeiT-with-iRPE``, e.g. ``deit_small_patch16_224_ctx_product_50_shared_k``).

Upstream keys ``blocks.{i}.attn.rpe_{q,k,v}.lookup_table_{weight,bias}`` (cross method:
``rpe_k.rp_rows.lookup_table_weight`` / ``rp_cols``) become ``pe.layers.{i}.rpe_{q,k,v}...``; the rest is a
DeiT checkpoint (the absolute table, with a class-token entry, is resampled plain bicubic without
antialias, as iRPE's own fine-tuning does, when the model's grid differs).

The config reader infers the iRPE options and the DeiT architecture (no LayerScale) from the keys
for ``vit_irpe*`` models, so an official file loads with
``timm.create_model('vit_irpe_small', pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from ._common import LAYERSCALE_RULES, StateDict, fit_table, rename
from ._core import CheckpointMismatchError, register_config_reader, register_converter, unwrap_state_dict

_KEY = re.compile(r'^blocks\.(\d+)\.attn\.rpe_([qkv])\.(.+)$')


def _is_irpe(sd: Mapping[str, Any], model: nn.Module) -> bool:
    return any(_KEY.match(k) for k in sd)


def _describe(sd: Mapping[str, Any]) -> dict[str, Any]:
    """What the upstream keys say about the iRPE options (those that can be read off them)."""
    keys = [m for m in (_KEY.match(k) for k in sd) if m]
    out: dict[str, Any] = dict(rpe_on=''.join(c for c in 'qkv' if any(m.group(2) == c for m in keys)))
    out['mode'] = 'bias' if any(m.group(3).endswith('lookup_table_bias') for m in keys) else 'ctx'
    cross = any(m.group(3).startswith('rp_rows.') for m in keys)
    first = sd[keys[0].string]
    out['shared_head'] = first.shape[0] == 1
    if cross:
        out['method'] = 'cross'
    else:
        buckets = first.shape[-1] if keys[0].group(2) != 'v' else first.shape[-2]
        side = math.isqrt(buckets - 1)
        if side * side == buckets - 1 and side % 2 == 1 and side > 1:
            out['method'] = 'product'  # (2B+1)^2 buckets + the class-token bucket
    return out


@register_converter('iRPE (microsoft/Cream DeiT-with-iRPE)', _is_irpe, priority=20)
def convert_irpe(sd: StateDict, model: nn.Module) -> StateDict:
    from ..pos.irpe import IRPE
    pe = getattr(model, 'pe', None)
    if not isinstance(pe, IRPE):
        raise CheckpointMismatchError(
            'checkpoint holds iRPE tables (blocks.N.attn.rpe_*) but the model has no iRPE encoding: '
            'use a vit_irpe_* model (or pe="irpe")')
    found = _describe(sd)
    mine = dict(rpe_on=pe.rpe_on, mode=pe.mode, shared_head=pe.shared_head)
    wrong = {k: (v, mine[k]) for k, v in found.items() if k in mine and v != mine[k]}
    if 'method' in found and found['method'] != pe.method:
        wrong['method'] = (found['method'], pe.method)
    if wrong:
        raise CheckpointMismatchError(
            'iRPE checkpoint does not fit the model\'s iRPE options: ' + ', '.join(
                f'{k}: checkpoint {c!r} vs model {m!r}' for k, (c, m) in wrong.items())
            + '; create the model with the checkpoint\'s values (e.g. timm.create_model(name, '
            + ', '.join(f'{k}={c!r}' for k, (c, m) in wrong.items()) + '))')
    sd = rename(sd, LAYERSCALE_RULES + ((r'^blocks\.(\d+)\.attn\.rpe_', r'pe.layers.\1.rpe_'),))
    own = model.state_dict()
    bad = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
           for k, v in sd.items() if k.startswith('pe.') and k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointMismatchError(
            'iRPE tables have another number of buckets or heads: ' + '; '.join(bad[:4])
            + f' (the model has method={pe.method!r}, ratio={pe.ratio}, shared_head={pe.shared_head}, '
              f'{pe.num_buckets} buckets + {int(pe.has_prefix_bucket)} prefix bucket); pass the checkpoint\'s '
              f'ratio / method to timm.create_model')
    if 'pos_embed' in sd and getattr(model, 'pos_embed', None) is not None:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        sd['pos_embed'] = fit_table(sd['pos_embed'], model.pos_embed, prefix, model.pos_embed_interp,
                                    model.pos_embed_antialias, tuple(model.patch_embed.grid_size))
    return sd


@register_config_reader
def irpe_config(obj: Any, model_name: str) -> dict[str, Any] | None:
    """iRPE options and DeiT architecture read off an upstream iRPE checkpoint (``vit_irpe*`` models only)."""
    if not model_name.startswith('vit_irpe'):
        return None
    try:
        sd = unwrap_state_dict(obj)
    except CheckpointMismatchError:
        return None
    if not _is_irpe(sd, None):
        return None
    kw = _describe(sd)
    if not any(k.endswith(('.ls1.gamma', '.gamma_1')) for k in sd):
        kw['init_values'] = 0  # DeiT: no LayerScale (0, as timm drops None keywords)
    if 'pos_embed' in sd:
        n = sd['pos_embed'].shape[1]
        kw['no_embed_class'] = math.isqrt(n) ** 2 == n  # no class-token entry in the table
    return kw
