"""Swin checkpoints: microsoft/Swin-Transformer, naver-ai/rope-vit (RoPE Swin), timm at another window.

timm Swin state dicts already use our key names and load with no conversion. This converter handles:

* the original layout (microsoft and naver's RoPE Swin): patch merging at the END of a stage
  (``layers.{i}.downsample`` -> ``layers.{i+1}.downsample``) and ``head.*`` -> ``head.fc.*``;
* persistent buffers we recompute (``relative_position_index``, ``attn_mask``, ``rope_t_x/y``);
* bias tables of another window (timm's ``resize_rel_pos_bias_table``, as timm's own filter) and
  patch-embedding kernels of another patch size (timm's ``resample_patch_embed``);
* naver RoPE Swin frequencies ``layers.{i}.blocks.{j}.attn.rope_freqs`` of shape
  ``(2, heads, d/2)``: RoPE-Mixed ones are stacked into ``layers.{i}.pe.freqs``
  ``(2, depth, heads, d/2)``; RoPE-Axial ones are fixed buffers, checked against the model's theta
  (naver's axial Swin configs use theta 50; a config reader passes it when a file is loaded).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_patch_embed, resize_rel_pos_bias_table

from ._common import StateDict
from ._core import CheckpointMismatchError, register_config_reader, register_converter, unwrap_state_dict

_DROP = ('relative_position_index', 'attn_mask', 'rope_t_x', 'rope_t_y', 'relative_coords_table')
_TABLE = 'relative_position_bias_table'


def _is_swin_model(model: nn.Module) -> bool:
    return type(model).__name__ == 'SwinTransformer' and type(model).__module__.startswith('visionpe.')


def _is_original_layout(sd: Mapping[str, Any]) -> bool:
    return 'layers.0.downsample.reduction.weight' in sd


def _detect(sd: Mapping[str, Any], model: nn.Module) -> bool:
    if not _is_swin_model(model):
        return False
    if _is_original_layout(sd) or any(k.rsplit('.', 1)[-1] in _DROP + ('rope_freqs',) for k in sd):
        return True
    own = model.state_dict()
    return any(k.endswith(_TABLE) and k in own and sd[k].shape != own[k].shape for k in sd) or (
        'patch_embed.proj.weight' in sd and sd['patch_embed.proj.weight'].shape != own['patch_embed.proj.weight'].shape)


def axial_theta(freqs: torch.Tensor) -> float | None:
    """theta of a naver RoPE-Axial ``rope_freqs`` buffer ``(2, heads, d/2)`` (None if not axial)."""
    quarter = freqs.shape[-1] // 2
    fx, fy = freqs[0, 0, :quarter].double(), freqs[1, 0, :quarter].double()
    if quarter < 2 or fy.abs().max() > 1e-6 or not torch.allclose(freqs[0], freqs[0, :1].expand_as(freqs[0])):
        return None
    head_dim = 4 * quarter
    return round(float(fx[1]) ** (-head_dim / 4), 3)


@register_converter('Swin (microsoft / naver RoPE Swin / timm at another window)', _detect, priority=5)
def convert_swin(sd: StateDict, model: nn.Module) -> StateDict:
    original = _is_original_layout(sd)
    own = model.state_dict()
    out: StateDict = {}
    freqs: dict[int, dict[int, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.rsplit('.', 1)[-1] in _DROP:
            continue
        if original:
            k = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) + 1}.downsample', k)
            k = re.sub(r'^head\.', 'head.fc.', k)
        m = re.match(r'^layers\.(\d+)\.blocks\.(\d+)\.attn\.rope_freqs$', k)
        if m:
            freqs.setdefault(int(m.group(1)), {})[int(m.group(2))] = v
            continue
        if k == 'patch_embed.proj.weight' and k in own and v.shape[-2:] != own[k].shape[-2:]:
            v = resample_patch_embed(v, list(own[k].shape[-2:]), interpolation='bicubic', antialias=True)
        if k.endswith(_TABLE) and k in own and v.shape != own[k].shape:
            attn = model.get_submodule(k[:-len(_TABLE) - 1])
            v = resize_rel_pos_bias_table(v, new_window_size=attn.window_size, new_bias_shape=own[k].shape)
        out[k] = v
    for i, per_block in sorted(freqs.items()):
        stage = model.layers[i] if i < len(model.layers) else None
        pe = getattr(stage, 'pe', None)
        if pe is None or type(pe).__name__ != 'RoPE2D':
            raise CheckpointMismatchError(
                f'checkpoint has RoPE frequencies (layers.{i}.blocks.*.attn.rope_freqs) but the model has no rotary '
                f'encoding in stage {i}: use a swin_rope2d_* (axial) or swin_rope2d_mixed_* model')
        stacked = torch.stack([per_block[j] for j in sorted(per_block)], dim=1)  # (2, depth, heads, d/2)
        if pe.rope_type == 'mixed':
            if stacked.shape != pe.freqs.shape:
                raise CheckpointMismatchError(
                    f'RoPE-Mixed frequencies of stage {i} have shape {tuple(stacked.shape)}, the model '
                    f'{tuple(pe.freqs.shape)} (2, depth, heads, head_dim/2): check depths, heads and width')
            out[f'layers.{i}.pe.freqs'] = stacked
            continue
        theta = axial_theta(per_block[min(per_block)])
        if theta is None:
            raise CheckpointMismatchError(
                f'stage {i} of the checkpoint has learned (RoPE-Mixed) frequencies but the model uses RoPE-Axial: '
                f'use a swin_rope2d_mixed_* model')
        if not math.isclose(theta, pe.theta, rel_tol=1e-3):
            raise CheckpointMismatchError(
                f'the checkpoint was trained with RoPE-Axial theta {theta:g}, the model uses theta {pe.theta:g}: '
                f'create it with theta={theta:g}')
    return out


@register_config_reader
def swin_rope_config(obj: Any, model_name: str) -> dict[str, Any] | None:
    """Architecture keywords of a naver RoPE Swin file: axial theta, and whether it has bias tables."""
    if not model_name.startswith('swin_rope2d'):
        return None
    try:
        sd = unwrap_state_dict(obj)
    except CheckpointMismatchError:
        return None
    rope = [v for k, v in sd.items() if k.endswith('attn.rope_freqs')]
    if not rope:
        return None
    kwargs: dict[str, Any] = {}
    if any(k.endswith(_TABLE) for k in sd):
        kwargs['rel_pos_bias'] = 'table'
    theta = axial_theta(rope[0])
    if theta is not None and not model_name.startswith('swin_rope2d_mixed'):
        kwargs['theta'] = theta
    return kwargs or None
