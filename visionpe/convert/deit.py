"""timm ViT / DeiT / DeiT-III checkpoints (timm state dicts, facebookresearch/deit ``.pth``).

Keys already follow timm's ViT; DeiT-III's ``models_v2`` names LayerScale ``gamma_1/2``. A table
trained at another grid is resampled to the model's (timm semantics: bicubic, antialias).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from ._common import LAYERSCALE_RULES, StateDict, fit_table, rename
from ._core import register_converter


def _is_deit(sd: Mapping[str, Any], model: nn.Module) -> bool:
    return 'blocks.0.attn.qkv.weight' in sd and 'cls_token' in sd and not any(
        k.startswith('pe.') for k in sd) and ('pos_embed' in sd or 'blocks.0.gamma_1' in sd)


@register_converter('timm ViT / DeiT / DeiT-III', _is_deit, priority=0)
def convert_deit(sd: StateDict, model: nn.Module) -> StateDict:
    sd = rename(sd, LAYERSCALE_RULES)
    sd.pop('dist_token', None)  # DeiT distillation token/head: not part of a plain ViT
    for k in ('head_dist.weight', 'head_dist.bias'):
        sd.pop(k, None)
    own_table = getattr(model, 'pos_embed', None)
    if 'pos_embed' in sd and own_table is not None:
        prefix = 0 if getattr(model, 'no_embed_class', False) else getattr(model, 'num_prefix_tokens', 1)
        sd['pos_embed'] = fit_table(sd['pos_embed'], own_table, prefix, model.pos_embed_interp,
                                    model.pos_embed_antialias, tuple(model.patch_embed.grid_size))
    return sd
