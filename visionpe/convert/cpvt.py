"""CPVT checkpoints (Meituan-AutoML/CPVT, DeiT code base): ``pos_block[.i].proj.0.*`` -> ``pe.convs.{layer}.*``.

CPVT's single PEG sits after the first block (``pos_block``); CPVT-GAP keeps a list of PEGs after
blocks 0..4 (``pos_block.{i}``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from ._common import StateDict
from ._core import register_converter


def _is_cpvt(sd: Mapping[str, Any], model: nn.Module) -> bool:
    return any(k.startswith('pos_block.') for k in sd)


@register_converter('CPVT', _is_cpvt, priority=20)
def convert_cpvt(sd: StateDict, model: nn.Module) -> StateDict:
    out = {}
    for k, v in sd.items():
        m = re.match(r'^pos_block\.(?:(\d+)\.)?proj\.0\.(weight|bias)$', k)
        if m:
            k = f'pe.convs.{m.group(1) or 0}.{m.group(2)}'
        out[k] = v
    return out
