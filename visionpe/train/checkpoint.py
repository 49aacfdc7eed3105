"""Rebuild a trained model from a Lightning checkpoint, without Lightning (for the evaluator)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple

from .ckpt_io import read_checkpoint
from .module import build_model

__all__ = ['load_model_from_checkpoint']

_EMA_PREFIX = 'model_ema.module.'
_MODEL_PREFIX = 'model.'


def _strip(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            k = k[len(prefix):]
            out[k.replace('_orig_mod.', '')] = v  # torch.compile wrappers, if any
    return out


def load_model_from_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = 'cpu',
                               use_ema: bool = True, *, trust: bool | None = None,
                               **model_overrides: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the timm model of a ``train.py`` checkpoint and load its weights (EMA ones if present and
    ``use_ema``). ``model_overrides`` are extra ``timm.create_model`` keywords applied on top of the
    training ones (e.g. ``dynamic_img_size=True`` to run at other resolutions).

    Returns ``(model in eval mode, info)``; ``info`` holds ``model_name``, ``model_kwargs``,
    ``img_size``, ``patch_size``, ``mean``, ``std``, ``num_classes``, ``dataset``, ``ema`` (whether the
    EMA weights were loaded), ``epoch``, ``global_step`` and ``path``.

    The file is read by :func:`visionpe.train.ckpt_io.read_checkpoint`: a pickle that asks for more than tensors
    and plain values is refused unless ``trust`` (``None``: the enclosing ``ckpt_io.trusting`` block's choice).
    """
    path = Path(path)
    ckpt = read_checkpoint(path, map_location, trust=trust)
    hp = ckpt.get('hyper_parameters')
    if not isinstance(hp, dict) or 'model_name' not in hp or 'state_dict' not in ckpt:
        raise ValueError(f'{path} is not a visionpe train.py checkpoint (no hyper_parameters.model_name / state_dict)')
    if 'fpn_channels' in hp:  # ObjectDetector's hyper-parameters
        raise ValueError(f'{path} is a detection checkpoint (train.py --task det): evaluate it with --task coco '
                         f'(visionpe.det.load_detector)')
    kwargs = dict(hp.get('model_kwargs') or {})
    model = build_model(hp['model_name'], hp['num_classes'], hp.get('img_size'), {**kwargs, **model_overrides})
    state = ckpt['state_dict']
    ema = use_ema and any(k.startswith(_EMA_PREFIX) for k in state)
    weights = _strip(state, _EMA_PREFIX if ema else _MODEL_PREFIX)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f'{path}: weights do not fit {hp["model_name"]} {kwargs}: missing {missing[:5]}, '
                           f'unexpected {unexpected[:5]}')
    model.eval()
    patch = kwargs.get('patch_size')
    if patch is None and hasattr(model, 'patch_embed') and hasattr(model.patch_embed, 'patch_size'):
        patch = model.patch_embed.patch_size
    if patch is not None:
        patch = tuple(to_2tuple(patch))  # always (h, w), as timm's PatchEmbed
    info = dict(model_name=hp['model_name'], model_kwargs=kwargs, img_size=hp.get('img_size'), patch_size=patch,
                mean=tuple(hp.get('mean', ())), std=tuple(hp.get('std', ())), num_classes=hp['num_classes'],
                dataset=hp.get('dataset'), ema=ema, epoch=ckpt.get('epoch'), global_step=ckpt.get('global_step'),
                path=str(path))
    return model, info
