"""RoPE-ViT checkpoints: naver-ai/rope-vit ``.pth`` and timm's port in ``timm.models.eva``.

naver (``models/vit_rope.py``): LayerScale ``gamma_1/2``; RoPE-Mixed frequencies ``freqs`` of
shape ``(2, depth, heads * d/2)``; the position buffers ``freqs_t_x/freqs_t_y`` depend on the
training grid and are dropped (as upstream's own loader does). timm's port: ``rope.freqs`` of
shape ``(2, depth, heads, d/2)``, LayerScale ``gamma_1/2``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from ._common import LAYERSCALE_RULES, StateDict, fit_table, rename
from ._core import CheckpointMismatchError, register_converter


def _is_ropevit(sd: Mapping[str, Any], model: nn.Module) -> bool:
    return any(k in sd for k in ('freqs_t_x', 'freqs', 'rope.freqs')) or (
        'blocks.0.gamma_1' in sd and 'pos_embed' not in sd and getattr(model, 'pe', None) is not None
        and type(model.pe).__name__ == 'RoPE2D')


@register_converter('RoPE-ViT (naver rope-vit / timm eva port)', _is_ropevit, priority=10)
def convert_ropevit(sd: StateDict, model: nn.Module) -> StateDict:
    sd = rename(sd, LAYERSCALE_RULES)
    for k in [k for k in sd if k in ('freqs_t_x', 'freqs_t_y') or (k.startswith('rope.') and k != 'rope.freqs')]:
        sd.pop(k)
    freqs = sd.pop('rope.freqs', None)
    if freqs is None:
        freqs = sd.pop('freqs', None)
    pe = getattr(model, 'pe', None)
    if freqs is not None:
        target = getattr(pe, 'freqs', None)
        if target is None:
            raise CheckpointMismatchError(
                'checkpoint has RoPE-Mixed frequencies (freqs) but the model has no learnable RoPE '
                "frequencies: use a vit_rope2d_mixed_* model (or rope_type='mixed')")
        if freqs.numel() != target.numel():
            raise CheckpointMismatchError(
                f'RoPE-Mixed frequencies of shape {tuple(freqs.shape)} do not fit the model\'s '
                f'{tuple(target.shape)} (2, depth, heads, head_dim/2): check depth, heads and width')
        sd['pe.freqs'] = freqs.reshape(target.shape)
    if 'pos_embed' in sd and getattr(model, 'pos_embed', None) is not None:  # RoPE-Mixed + APE variants
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        sd['pos_embed'] = fit_table(sd['pos_embed'], model.pos_embed, prefix, model.pos_embed_interp,
                                    model.pos_embed_antialias, tuple(model.patch_embed.grid_size))
    return sd
