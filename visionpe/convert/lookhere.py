"""LookHere checkpoints (GreenCUBIC/lookhere releases ``LH_{180,90,45}_weights_and_config.pth``).

A release is ``{'config': lh_config, 'weights': state_dict}``; ``lh_config`` holds ``global_slope``,
``layer_slopes``, ``head_directions`` (the direction shorthand, or one string per layer) and
optionally ``distance`` and ``fill_with``. The model itself is the reference's DeiT-III-style ViT-B/16
(LayerNorm eps 1e-5, LayerScale, a tanh MLP classifier, no absolute table), whose keys are ours.

The config reader maps the stored config to model keywords for ``vit_lookhere*`` models, so
``timm.create_model('vit_lookhere_base', pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
builds the file's layout and slopes. Architecture sizes are taken only where the file stores them
(``embed_dim``, ``depth``, ``num_heads``, ``patch_size``, ... under the config or at the top level);
the releases store none, they are ViT-B/16.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ._common import LAYERSCALE_RULES, StateDict, rename
from ._core import CheckpointMismatchError, register_config_reader, register_converter, unwrap_state_dict

# upstream constructor keywords that are ours too
_SIZE_KEYS = ('img_size', 'patch_size', 'in_chans', 'num_classes', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio',
              'init_values', 'drop_path_rate')
_LH_KEYS = {'head_directions': 'layout', 'global_slope': 'global_slope', 'layer_slopes': 'layer_slopes',
            'distance': 'distance', 'fill_with': 'fill_with'}


def _is_lookhere_model(model: nn.Module) -> bool:
    from ..pos.lookhere import LookHere
    return isinstance(getattr(model, 'pe', None), LookHere)


def _detect(sd: Mapping[str, Any], model: nn.Module) -> bool:
    return _is_lookhere_model(model) and 'cls_token' in sd and not any(k.startswith('pe.') for k in sd)


@register_converter('LookHere (GreenCUBIC/lookhere)', _detect, priority=15)
def convert_lookhere(sd: StateDict, model: nn.Module) -> StateDict:
    sd = rename(sd, LAYERSCALE_RULES)
    if 'pos_embed' in sd and getattr(model, 'pos_embed', None) is None:
        raise CheckpointMismatchError(
            'checkpoint has an absolute position table (pos_embed) but a LookHere model has none: this is not a '
            'LookHere checkpoint (LookHere releases carry no pos_embed); load it into a model with pos_embed')
    mlp_ckpt = 'head.fc1.weight' in sd
    mlp_model = getattr(model, 'head_type', 'linear') == 'mlp_tanh'
    if mlp_ckpt != mlp_model:
        raise CheckpointMismatchError(
            f"LookHere checkpoint has a {'tanh MLP' if mlp_ckpt else 'linear'} classifier but the model has a "
            f"{'tanh MLP' if mlp_model else 'linear'} one: create the model with "
            f"head={'mlp_tanh' if mlp_ckpt else 'linear'!r} (the config reader does this for files that carry "
            f"their config, e.g. the LH_*_weights_and_config.pth releases)")
    return sd


def _lh_config(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for key in ('lh_config', 'config'):
        cfg = obj.get(key)
        if isinstance(cfg, Mapping):
            if 'head_directions' in cfg:
                return cfg
            inner = cfg.get('lh_config')
            if isinstance(inner, Mapping) and 'head_directions' in inner:
                return inner
    return None


@register_config_reader
def lookhere_config(obj: Any, model_name: str) -> dict[str, Any] | None:
    """Model keywords from a LookHere file's stored config (``vit_lookhere*`` models only)."""
    if not model_name.startswith('vit_lookhere') or not isinstance(obj, Mapping):
        return None
    lh = _lh_config(obj)
    if lh is None:
        return None
    kw: dict[str, Any] = {}
    for src, dst in _LH_KEYS.items():
        if src in lh:
            v = lh[src]
            kw[dst] = tuple(v) if src == 'layer_slopes' else (list(v) if isinstance(v, (list, tuple)) else v)
    for scope in (obj, obj.get('config') if isinstance(obj.get('config'), Mapping) else {}, lh):
        for key in _SIZE_KEYS:
            if key in scope and not isinstance(scope[key], (Mapping, torch.Tensor)):
                kw[key] = tuple(scope[key]) if isinstance(scope[key], list) else scope[key]
    # the reference architecture: LayerNorm eps 1e-5, tanh MLP classifier (hidden = embed_dim * mlp_ratio)
    kw.update(norm_eps=1e-5, qkv_bias=True, pos_embed='none', class_token=True)
    try:
        sd = unwrap_state_dict(obj)
    except CheckpointMismatchError:
        sd = {}
    kw['head'] = 'linear' if 'head.weight' in sd and 'head.fc1.weight' not in sd else 'mlp_tanh'
    return kw
