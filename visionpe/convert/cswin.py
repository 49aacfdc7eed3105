"""CSWin checkpoints (microsoft/CSWin-Transformer ``models/cswin.py``; the released ``.pth`` files hold
``state_dict_ema`` / ``state_dict``, unwrapped by :func:`visionpe.convert.unwrap_state_dict`).

Upstream (stages S = 1..4, blocks i)         visionpe (:mod:`visionpe.models.cswin`)
``stage1_conv_embed.0.*``                    ``stem.conv.*``
``stage1_conv_embed.2.*``                    ``stem.norm.*``
``stageS.i.{qkv,proj}.*``                    ``stages.{S-1}.blocks.i.attn.{qkv,proj}.*``
``stageS.i.attns.j.get_v.*``                 ``stages.{S-1}.blocks.i.attn.branches.j.lepe.conv.*``
``stageS.i.{norm1,norm2,mlp.fc1,mlp.fc2}.*`` ``stages.{S-1}.blocks.i.{...}.*``
``mergeS.{conv,norm}.*``                     ``stages.S.downsample.{conv,norm}.*``
``norm.*`` / ``head.*``                      ``norm.*`` / ``head.fc.*``
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from ._common import StateDict
from ._core import CheckpointMismatchError, register_converter

_BLOCK = re.compile(r'^stage([1-4])\.(\d+)\.(.+)$')
_MERGE = re.compile(r'^merge([1-3])\.(conv|norm)\.(.+)$')
_LEPE = re.compile(r'^attns\.(\d+)\.get_v\.(.+)$')


def _is_cswin(sd: Mapping[str, Any], model: nn.Module) -> bool:
    return any(k.startswith('stage1_conv_embed.') for k in sd)


def _rename(key: str) -> str:
    if key.startswith('stage1_conv_embed.'):
        idx, rest = key[len('stage1_conv_embed.'):].split('.', 1)
        part = {'0': 'conv', '2': 'norm'}.get(idx)
        if part is None:
            raise CheckpointMismatchError(f'CSWin checkpoint: unknown stem key {key!r}')
        return f'stem.{part}.{rest}'
    m = _BLOCK.match(key)
    if m:
        stage, block, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
        lepe = _LEPE.match(rest)
        if lepe:
            rest = f'attn.branches.{lepe.group(1)}.lepe.conv.{lepe.group(2)}'
        elif rest.split('.', 1)[0] in ('qkv', 'proj'):
            rest = f'attn.{rest}'
        return f'stages.{stage}.blocks.{block}.{rest}'
    m = _MERGE.match(key)
    if m:
        return f'stages.{m.group(1)}.downsample.{m.group(2)}.{m.group(3)}'
    if key.startswith('head.') and not key.startswith('head.fc.'):
        return 'head.fc.' + key[len('head.'):]
    return key


@register_converter('CSWin (microsoft/CSWin-Transformer)', _is_cswin, priority=10)
def convert_cswin(sd: StateDict, model: nn.Module) -> StateDict:
    return {_rename(k): v for k, v in sd.items()}
