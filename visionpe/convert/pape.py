"""PaPE / PaPE-RI checkpoints (DTU-PAS/parabolic-position-encoding ``ImageClassifier.state_dict()``).

Upstream keys: ``embedding`` (patch Conv2d), ``cls``, ``encoder.norm_pre``, ``encoder.layers.{l}.{norm1, norm2}``,
``encoder.layers.{l}.attention.{qkv_proj, out_proj}``, ``encoder.layers.{l}.ffn.{fc1, fc2}``,
``encoder.layers.{l}.attention.position_encoder.*`` (PaPE ``ab``, ``position``; PaPE-RI ``a``, ``position_scales``),
``encoder.norm_post``, ``classifier``. The architecture is a pre-norm ViT without LayerScale: a LayerNorm
(eps 1e-5) on ``[cls, patches]`` before the first block, patch embedding with bias, no absolute table. Build the
model with :data:`UPSTREAM_KWARGS` (and the upstream sizes), e.g.
``timm.create_model('vit_pape_base', pretrained=True, pretrained_cfg_overlay=dict(file=PATH), **UPSTREAM_KWARGS)``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch.nn as nn

from ._common import StateDict, rename
from ._core import CheckpointMismatchError, register_converter

#: model keywords of the upstream architecture (sizes come from the checkpoint); ``init_values=0`` means no
#: LayerScale (timm.create_model drops keywords set to None)
UPSTREAM_KWARGS: Dict[str, Any] = dict(pre_norm=True, patch_bias=True, init_values=0., norm_eps=1e-5,
                                       pos_embed='none', qkv_bias=True, class_token=True, global_pool='token')

RULES = (
    (r'^embedding\.', 'patch_embed.proj.'),
    (r'^cls$', 'cls_token'),
    (r'^encoder\.norm_pre\.', 'norm_pre.'),
    (r'^encoder\.norm_post\.', 'norm.'),
    (r'^encoder\.layers\.(\d+)\.attention\.position_encoder\.', r'pe.layers.\1.'),
    (r'^encoder\.layers\.(\d+)\.attention\.qkv_proj\.', r'blocks.\1.attn.qkv.'),
    (r'^encoder\.layers\.(\d+)\.attention\.out_proj\.', r'blocks.\1.attn.proj.'),
    (r'^encoder\.layers\.(\d+)\.ffn\.', r'blocks.\1.mlp.'),
    (r'^encoder\.layers\.(\d+)\.(norm[12])\.', r'blocks.\1.\2.'),
    (r'^classifier\.', 'head.'),
)


def _detect(sd: Mapping[str, Any], model: nn.Module) -> bool:
    return any(k.startswith('encoder.layers.') and '.attention.qkv_proj.' in k for k in sd)


@register_converter('PaPE / PaPE-RI (DTU-PAS/parabolic-position-encoding)', _detect, priority=15)
def convert_pape(sd: StateDict, model: nn.Module) -> StateDict:
    from ..pos.pape import PaPE, PaPERI
    pe = getattr(model, 'pe', None)
    ckpt_ri = any(k.endswith('position_encoder.a.weight') for k in sd)
    ckpt_pape = any(k.endswith('position_encoder.ab.weight') for k in sd)
    want = PaPERI if ckpt_ri else PaPE if ckpt_pape else None
    if want is not None and not isinstance(pe, want):
        raise CheckpointMismatchError(
            f"checkpoint is a {'PaPE-RI' if ckpt_ri else 'PaPE'} model (upstream position_encoder keys) but the "
            f"model's encoding is {type(pe).__name__ if pe is not None else None}: use "
            f"{'vit_pape_ri_*' if ckpt_ri else 'vit_pape_*'}")
    if 'encoder.norm_pre.weight' in sd and isinstance(getattr(model, 'norm_pre', None), nn.Identity):
        raise CheckpointMismatchError('PaPE checkpoints have a LayerNorm before the first block (encoder.norm_pre): '
                                      'create the model with pre_norm=True (see visionpe.convert.pape.UPSTREAM_KWARGS)')
    if 'embedding.bias' in sd and getattr(model.patch_embed.proj, 'bias', None) is None:
        raise CheckpointMismatchError('PaPE checkpoints have a patch-embedding bias: create the model with '
                                      'patch_bias=True (see visionpe.convert.pape.UPSTREAM_KWARGS)')
    if isinstance(pe, PaPE):
        J = sd.get('encoder.layers.0.attention.position_encoder.position.weight')
        if J is not None and J.shape[0] != pe.ctx.num_heads * pe.parabolas:
            raise CheckpointMismatchError(
                f'checkpoint has {J.shape[0]} parabolas in all ({J.shape[0] // pe.ctx.num_heads} per head for '
                f'{pe.ctx.num_heads} heads) but the model has parabolas={pe.parabolas}: pass '
                f'parabolas={J.shape[0] // pe.ctx.num_heads}')
    return rename(sd, RULES)
