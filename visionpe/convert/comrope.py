"""ComRoPE checkpoints (Longin-Yu/ComRoPE ``model.py``: HF ``CLIPVisionModel`` with custom embeddings and
attention, ``CustomVITForClassification``).

Upstream key                                          ours
``vision_model.embeddings.class_embedding`` (C)       ``cls_token`` (1, 1, C)
``vision_model.embeddings.patch_embedding.weight``    ``patch_embed.proj.weight`` (conv without bias)
``vision_model.embeddings.position_embedding``        ``pe.pos_embed`` (1, h, w, C); needs ``ape='rowonly'``
                                                      (upstream ``keep_ape=False``; see visionpe.pos.comrope)
``vision_model.pre_layrnorm.*``                       ``norm_pre.*``
``vision_model.encoder.layers.{i}.``
    ``self_attn.{q,k,v}_proj.*``                      ``blocks.{i}.attn.qkv.*`` (concatenated q, k, v)
    ``self_attn.out_proj.*``                          ``blocks.{i}.attn.proj.*``
    ``self_attn.freqs`` (H, 1 | 2, t, b, b)           ``pe.freqs[i]`` (AP / LD: (H, t, b, b); LieRE: (H, 2, t, b, b))
    ``self_attn.multiplier`` (1, 2, t, 1, 1)          ``pe.multiplier[i]`` (2, t) (LD)
    ``layer_norm1/2.*``, ``mlp.fc1/2.*``              ``blocks.{i}.norm1/2.*``, ``blocks.{i}.mlp.fc1/2.*``
``vision_model.post_layernorm.*``                     ``fc_norm.*`` (applied to the pooled token, as CLIP),
                                                      or ``norm.*`` when the model has no fc_norm
``classification_head.*``                             ``head.*``

The config reader gives ``vit_comrope*`` models upstream's architecture (pre-LN ``norm_pre``, quick-GELU,
LayerNorm eps 1e-5, post-LN on the pooled class token, patch conv without bias, no LayerScale) and the
sizes read off the keys, so an upstream file loads with
``timm.create_model('vit_comrope_ap_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.
The encoding type (AP / LD / LieRE / vanilla) is not guessed: a file of another type fails with the fix.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ._common import StateDict, rename
from ._core import CheckpointMismatchError, register_config_reader, register_converter, unwrap_state_dict

_LAYER = re.compile(r'^vision_model\.encoder\.layers\.(\d+)\.')
_RULES = (
    (r'^vision_model\.embeddings\.patch_embedding\.', 'patch_embed.proj.'),
    (r'^vision_model\.pre_layrnorm\.', 'norm_pre.'),
    (r'^vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.', r'blocks.\1.attn.proj.'),
    (r'^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.', r'blocks.\1.norm1.'),
    (r'^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.', r'blocks.\1.norm2.'),
    (r'^vision_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.', r'blocks.\1.mlp.fc1.'),
    (r'^vision_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.', r'blocks.\1.mlp.fc2.'),
    (r'^classification_head\.', 'head.'),
)


def _is_comrope(sd: Mapping[str, Any], model: nn.Module) -> bool:
    return 'vision_model.embeddings.class_embedding' in sd or any(
        k.startswith('vision_model.encoder.layers.') for k in sd)


def _upstream_type(sd: Mapping[str, Any]) -> str:
    freqs = sd.get('vision_model.encoder.layers.0.self_attn.freqs')
    if freqs is None:
        return 'vanilla'
    if 'vision_model.encoder.layers.0.self_attn.multiplier' in sd:
        return 'ld'
    return 'liere' if freqs.shape[1] > 1 else 'ap'


def _stack(sd: StateDict, suffix: str, depth: int) -> torch.Tensor:
    keys = [f'vision_model.encoder.layers.{i}.self_attn.{suffix}' for i in range(depth)]
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointMismatchError(f'ComRoPE checkpoint lacks {", ".join(missing)}')
    return torch.stack([sd.pop(k) for k in keys])


@register_converter('ComRoPE (Longin-Yu/ComRoPE, HF CLIP vision model)', _is_comrope, priority=20)
def convert_comrope(sd: StateDict, model: nn.Module) -> StateDict:
    from ..pos.comrope import ComRoPE
    pe = getattr(model, 'pe', None)
    if not isinstance(pe, ComRoPE):
        raise CheckpointMismatchError(
            'checkpoint is a ComRoPE CLIP vision model (vision_model.*) but the model has no ComRoPE encoding: '
            'use a vit_comrope_* model (or pe="comrope")')
    kind = _upstream_type(sd)
    if kind != pe.comrope_type:
        raise CheckpointMismatchError(
            f"checkpoint holds ComRoPE type {kind!r} generators but the model has comrope_type="
            f"{pe.comrope_type!r}: pass comrope_type={kind!r} (vit_comrope_{kind}_* presets for ap / ld)")
    freqs0 = sd.get('vision_model.encoder.layers.0.self_attn.freqs')
    if freqs0 is not None and freqs0.shape[-1] != pe.block_size:
        raise CheckpointMismatchError(
            f'checkpoint uses ComRoPE blocks of size {freqs0.shape[-1]} but the model has block_size='
            f'{pe.block_size}: pass block_size={freqs0.shape[-1]}')
    has_ape = 'vision_model.embeddings.position_embedding' in sd
    if has_ape != (pe.ape is not None):
        fix = ("create the model with ape='rowonly' (upstream keep_ape=False, its default)" if has_ape else
               'create the model with ape=None (the checkpoint has no absolute table: upstream keep_ape=True)')
        raise CheckpointMismatchError(
            f"checkpoint {'has' if has_ape else 'has no'} upstream's absolute position table "
            f"(vision_model.embeddings.position_embedding) but the model {'has none' if has_ape else 'has one'}: "
            + fix)
    if any(k.startswith('classification_head.') and not k.startswith(('classification_head.weight',
                                                                       'classification_head.bias')) for k in sd):
        raise CheckpointMismatchError(
            'checkpoint has an MLP classification head (mlp_intermediate > 0), which visionpe ViTs do not '
            'offer; drop the classification_head.* keys and fine-tune a linear head (num_classes=...)')

    depth = 1 + max((int(m.group(1)) for m in map(_LAYER.match, sd) if m), default=-1)
    out: StateDict = {}
    if pe.freqs is not None:
        freqs = _stack(sd, 'freqs', depth)  # (depth, H, 1 | 2, t, b, b)
        out['pe.freqs'] = freqs if kind == 'liere' else freqs.squeeze(2)
    if kind == 'ld':
        out['pe.multiplier'] = _stack(sd, 'multiplier', depth).reshape(depth, 2, -1)
    for i in range(depth):
        pre = f'vision_model.encoder.layers.{i}.self_attn.'
        for p in ('weight', 'bias'):
            parts = [sd.pop(f'{pre}{n}_proj.{p}', None) for n in 'qkv']
            if all(t is not None for t in parts):
                out[f'blocks.{i}.attn.qkv.{p}'] = torch.cat(parts, dim=0)
            elif any(t is not None for t in parts):
                raise CheckpointMismatchError(f'layer {i}: q/k/v projection {p}s are incomplete in the checkpoint')
    cls = sd.pop('vision_model.embeddings.class_embedding', None)
    if cls is not None:
        out['cls_token'] = cls.reshape(1, 1, -1)
    ape = sd.pop('vision_model.embeddings.position_embedding', None)
    if ape is not None:
        out['pe.pos_embed'] = ape
    post = 'fc_norm.' if isinstance(getattr(model, 'fc_norm', None), nn.LayerNorm) else 'norm.'
    rest = rename(sd, _RULES + ((r'^vision_model\.post_layernorm\.', post),))
    out.update(rest)
    return out


@register_config_reader
def comrope_config(obj: Any, model_name: str) -> dict[str, Any] | None:
    """Architecture keywords of an upstream ComRoPE file (``vit_comrope*`` models only)."""
    if not model_name.startswith('vit_comrope') or not isinstance(obj, Mapping):
        return None
    try:
        sd = unwrap_state_dict(obj)
    except CheckpointMismatchError:
        return None
    if not _is_comrope(sd, None):
        return None
    kw: dict[str, Any] = dict(pre_norm=True, act_layer='quick_gelu', norm_eps=1e-5, fc_norm=True,
                              patch_bias=False, init_values=0, qkv_bias=True, class_token=True,
                              global_pool='token', pos_embed='none')
    cls = sd.get('vision_model.embeddings.class_embedding')
    conv = sd.get('vision_model.embeddings.patch_embedding.weight')
    if cls is not None:
        kw['embed_dim'] = cls.shape[-1]
    if conv is not None:
        kw['patch_size'] = conv.shape[-1]
    kw['depth'] = 1 + max((int(m.group(1)) for m in map(_LAYER.match, sd) if m), default=-1)
    fc1 = sd.get('vision_model.encoder.layers.0.mlp.fc1.weight')
    if fc1 is not None:
        kw['mlp_ratio'] = fc1.shape[0] / fc1.shape[1]
    freqs = sd.get('vision_model.encoder.layers.0.self_attn.freqs')
    if freqs is not None:
        kw['num_heads'] = freqs.shape[0]
        kw['block_size'] = freqs.shape[-1]
    ape = sd.get('vision_model.embeddings.position_embedding')
    kw['ape'] = 'rowonly' if ape is not None else None
    if ape is not None and conv is not None:
        kw['img_size'] = (ape.shape[1] * conv.shape[-2], ape.shape[2] * conv.shape[-1])
    head = sd.get('classification_head.weight')
    if head is not None:
        kw['num_classes'] = head.shape[0]
    return kw
