"""DINOv3 checkpoints: facebookresearch/dinov3 ``.pth`` files and timm's DINOv3 ViTs (``timm.models.eva``).

Official key (``DinoVisionTransformer``)       timm (``vit_*_patch16_dinov3*``)  ours
``storage_tokens`` (1, 4, C)                   ``reg_token``                     ``reg_token``
``blocks.{i}.ls{1,2}.gamma``                   ``blocks.{i}.gamma_{1,2}``        ``blocks.{i}.ls{1,2}.gamma``
``blocks.{i}.attn.qkv.bias`` times             ``blocks.{i}.attn.{q,v}_bias``    ``blocks.{i}.attn.qkv.bias``
``blocks.{i}.attn.qkv.bias_mask`` (k third 0)  (k bias a zero buffer)            (k third 0: ``qkv_k_bias=False``)
``mask_token``, ``rope_embed.periods``,        ``rope.*`` (not persistent)       dropped (periods checked)
``local_cls_norm.*`` (training only)
``blocks.{i}.mlp.w1/w2/w3`` (SwiGLU)           ``mlp.fc1_g/fc1_x/fc2``           ``mlp.fc1_g/fc1_x/fc2``
everything else (``cls_token``, ``patch_embed``, ``norm1/2``, ``attn.qkv/proj``, ``mlp.fc1/2``, ``norm``) keeps
its name.

A model without qkv bias (the presets' default, timm's ``vit_*_dinov3``) takes a checkpoint whose q and v
biases are all zero (timm's distilled models) and refuses one with non-zero biases (create it with
``qkv_bias=True``, timm's ``_qkvb``). Files without a classifier (DINOv3 backbones) leave a model with
``num_classes > 0`` its freshly initialised head, with a warning (``num_classes=0`` gives the bare backbone).
Not supported, with an error: a separate norm for class and register tokens (``cls_norm``,
``untie_cls_and_patch_norms=True``).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn as nn

from ._common import LAYERSCALE_RULES, StateDict, rename
from ._core import CheckpointMismatchError, register_converter

_logger = logging.getLogger(__name__)
# official SwiGLUFFN: w3(silu(w1 x) * w2 x) -> timm's SwiGLU: fc2(silu(fc1_g x) * fc1_x x)
_SWIGLU_RULES = ((r'\.mlp\.w1\.', '.mlp.fc1_g.'), (r'\.mlp\.w2\.', '.mlp.fc1_x.'), (r'\.mlp\.w3\.', '.mlp.fc2.'))


def _is_dinov3(sd: Mapping[str, Any], model: nn.Module) -> bool:
    official = 'storage_tokens' in sd or 'rope_embed.periods' in sd
    dinov3_model = type(getattr(model, 'pe', None)).__name__ == 'DinoV3RoPE'
    return official or ('reg_token' in sd and 'blocks.0.gamma_1' in sd and dinov3_model)


def _qkv_bias(q: torch.Tensor, v: torch.Tensor, model: nn.Module, key: str, sd: StateDict) -> None:
    """Store ``cat(q, 0, v)`` as ``key`` when the model has a qkv bias; else require q and v to be zero."""
    if model.blocks[0].attn.qkv.bias is not None:
        sd[key] = torch.cat([q, torch.zeros_like(q), v])
    elif q.abs().max() > 0 or v.abs().max() > 0:
        raise CheckpointMismatchError(
            f'checkpoint has non-zero q/v biases ({key}) but the model has no qkv bias: create it with '
            f'qkv_bias=True (timm calls these DINOv3 weights *_dinov3_qkvb)')


@register_converter('DINOv3 (facebookresearch/dinov3 / timm eva port)', _is_dinov3, priority=15)
def convert_dinov3(sd: StateDict, model: nn.Module) -> StateDict:
    pe = getattr(model, 'pe', None)
    if type(pe).__name__ != 'DinoV3RoPE':
        raise CheckpointMismatchError('checkpoint is a DINOv3 ViT (storage / register tokens, DINOv3 RoPE) but the '
                                      'model has no DINOv3 RoPE: use a vit_rope2d_dinov3_* model')
    if any(k.startswith('cls_norm.') for k in sd):
        raise CheckpointMismatchError('checkpoint normalises class and register tokens with their own norm '
                                      '(cls_norm, untie_cls_and_patch_norms=True), which visionpe ViTs do not offer')
    periods = sd.pop('rope_embed.periods', None)
    if periods is not None:
        own = pe.periods()
        if periods.shape != own.shape or not torch.allclose(periods.float(), own, rtol=1e-2):
            raise CheckpointMismatchError(
                f'checkpoint RoPE periods {periods.float().tolist()} differ from the model\'s {own.tolist()}: '
                f'pass base=... or min_period / max_period (and the same head dim)')
    out: StateDict = {}
    for k, v in sd.items():
        if k in ('mask_token',) or k.startswith(('local_cls_norm.', 'rope.')) or k.endswith('.bias_mask'):
            continue
        if k == 'storage_tokens':
            out['reg_token'] = v
        elif k.endswith('.attn.qkv.bias'):  # official: the k third is masked to zero in the forward
            mask = sd.get(k + '_mask')
            q, _, v_b = (v * mask if mask is not None else v).chunk(3)
            _qkv_bias(q, v_b, model, k, out)
        elif k.endswith('.attn.q_bias'):  # timm
            pre = k[:-len('q_bias')]
            if pre + 'v_bias' not in sd:
                raise CheckpointMismatchError(f'checkpoint has {k} but no {pre}v_bias')
            _qkv_bias(v, sd[pre + 'v_bias'], model, pre + 'qkv.bias', out)
        elif k.endswith('.attn.v_bias'):
            continue
        else:
            out[k] = v
    out = rename(out, LAYERSCALE_RULES + _SWIGLU_RULES)
    head = getattr(model, 'head', None)
    if isinstance(head, nn.Linear) and 'head.weight' not in out:
        _logger.warning('DINOv3 checkpoint has no classifier: the model keeps its freshly initialised %d-class head '
                        '(num_classes=0 gives the backbone alone)', head.out_features)
        out['head.weight'], out['head.bias'] = head.weight.detach().clone(), head.bias.detach().clone()
    return out
