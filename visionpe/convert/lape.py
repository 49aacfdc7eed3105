"""LaPE checkpoints (Ingrid725/LaPE ``vision_transformer.py``, DeiT code base).

``blocks.{l}.pe_norm.*`` -> ``pe.norms.{l}.*`` and the table ``pos_embed`` -> ``pe.pos_embed``
(resampled plain bicubic, without antialias, as LaPE's own fine-tuning recipe does).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from ._common import StateDict, fit_table, rename
from ._core import register_converter


def _is_lape(sd: Mapping[str, Any], model: nn.Module) -> bool:
    return any('.pe_norm.' in k for k in sd)


@register_converter('LaPE', _is_lape, priority=20)
def convert_lape(sd: StateDict, model: nn.Module) -> StateDict:
    sd = rename(sd, [(r'^blocks\.(\d+)\.pe_norm\.', r'pe.norms.\1.'), (r'^pos_embed$', 'pe.pos_embed')])
    pe = getattr(model, 'pe', None)
    table = getattr(pe, 'pos_embed', None)
    if 'pe.pos_embed' in sd and table is not None:
        sd['pe.pos_embed'] = fit_table(sd['pe.pos_embed'], table, pe.num_prefix, pe.interpolation,
                                       pe.antialias, tuple(pe.grid_size))
    return sd
