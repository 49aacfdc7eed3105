"""RST / MDT checkpoints (Calvin11311/MDT ``basicsr/models/archs/mdt_arch.py``): the RSAS block keys.

Upstream ``TransformerBlock(att=True)``        visionpe :class:`visionpe.models.rst.RSASBlock`
``[prefix]attn.{a_p,b_p,a_r,b_r}``             ``[prefix]attn.rel_pos.{a_p,b_p,a_r,b_r}``
``[prefix]norm2.body.{weight,bias}``           ``[prefix]norm2.{weight,bias}`` (WithBias LayerNorm)
``norm1``, ``attn.qkv``, ``attn.proj``, ``ffn.*`` unchanged.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from ._common import StateDict, rename
from ._core import register_converter

_TABLE = re.compile(r'(^|\.)attn\.(a_p|b_p|a_r|b_r)$')


def _is_rst(sd: Mapping[str, Any], model: nn.Module) -> bool:
    return any(_TABLE.search(k) for k in sd)


@register_converter('RST / MDT (Calvin11311/MDT RSAS blocks)', _is_rst, priority=10)
def convert_rst(sd: StateDict, model: nn.Module) -> StateDict:
    return rename(sd, [(r'(^|\.)attn\.(a_p|b_p|a_r|b_r)$', r'\1attn.rel_pos.\2'),
                       (r'(^|\.)norm2\.body\.(weight|bias)$', r'\1norm2.\2')])
