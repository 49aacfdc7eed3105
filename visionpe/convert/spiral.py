"""Spiral RoPE checkpoints (huajianduzhuo-code/Spiral_RoPE, ``RoPE_DeiT/models_v2.py`` ``vit_models`` with
``rope=True``, e.g. ``deit_base_patch16_LS_rms_rope``).

Upstream keys are timm/DeiT-III ones except: LayerScale ``blocks.{i}.gamma_1/2``; RMSNorm weights called
``scale`` (``norm1``, ``norm2``, final ``norm``; eps added to the RMS outside the square root); every attention layer
carries the same frequency buffer ``blocks.{i}.attn.rope.freqs`` (here one ``pe.freqs``); ``pos_embed`` holds the
patch tokens only. Build the model with :data:`UPSTREAM_KWARGS` (and the upstream sizes and rope options), e.g.
``timm.create_model('vit_spiral_base', pretrained=True, pretrained_cfg_overlay=dict(file=PATH), **UPSTREAM_KWARGS)``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
import torch.nn as nn

from ._common import LAYERSCALE_RULES, StateDict, fit_table, rename
from ._core import CheckpointMismatchError, register_converter

#: model keywords of upstream's DeiT-III RMSNorm ViT (sizes and rope options come from the checkpoint's run)
UPSTREAM_KWARGS: Dict[str, Any] = dict(pos_embed='learn', no_embed_class=True, pos_embed_antialias=False,
                                       norm_layer='rmsnorm_eps_outside', norm_eps=1e-6, init_values=1e-4,
                                       qkv_bias=True, class_token=True, global_pool='token')

RULES = LAYERSCALE_RULES + ((r'^(blocks\.\d+\.norm[12]|norm)\.scale$', r'\1.weight'),)


def _detect(sd: Mapping[str, Any], model: nn.Module) -> bool:
    return any(k.startswith('blocks.') and k.endswith('.attn.rope.freqs') for k in sd)


@register_converter('Spiral RoPE (huajianduzhuo-code/Spiral_RoPE)', _detect, priority=15)
def convert_spiral(sd: StateDict, model: nn.Module) -> StateDict:
    from ..layers import RmsNormEpsOutside
    from ..pos.spiral import SpiralRoPE
    pe = getattr(model, 'pe', None)
    if not isinstance(pe, SpiralRoPE):
        raise CheckpointMismatchError('checkpoint is a Spiral RoPE model (blocks.*.attn.rope.freqs) but the model has '
                                      f'{type(pe).__name__ if pe is not None else "no encoding"}: use vit_spiral_*')
    freqs = [sd.pop(k) for k in sorted(k for k in list(sd) if k.endswith('.attn.rope.freqs'))]
    if any(not torch.equal(f, freqs[0]) for f in freqs):
        raise CheckpointMismatchError('Spiral RoPE checkpoint has different frequency buffers per layer; visionpe '
                                      'shares one (upstream builds them identically)')
    if freqs[0].shape != pe.freqs.shape:
        raise CheckpointMismatchError(
            f'Spiral RoPE frequencies of shape {tuple(freqs[0].shape)} do not fit the model\'s '
            f'{tuple(pe.freqs.shape)}: check the head dim, rotate and same_theta')
    sd['pe.freqs'] = freqs[0]
    if any(k.endswith('.scale') for k in sd) and not isinstance(getattr(model, 'norm', None), RmsNormEpsOutside):
        raise CheckpointMismatchError("Spiral RoPE checkpoints use RMSNorm with eps outside the square root: create "
                                      "the model with norm_layer='rmsnorm_eps_outside' (see "
                                      "visionpe.convert.spiral.UPSTREAM_KWARGS)")
    if 'pos_embed' in sd:
        if getattr(model, 'pos_embed', None) is None or not model.no_embed_class:
            raise CheckpointMismatchError("Spiral RoPE checkpoints carry a learned table of the patch tokens "
                                          "(pos_embed): create the model with pos_embed='learn', no_embed_class=True")
        sd['pos_embed'] = fit_table(sd['pos_embed'], model.pos_embed, 0, model.pos_embed_interp,
                                    model.pos_embed_antialias, tuple(model.patch_embed.grid_size))
    return rename(sd, RULES)
