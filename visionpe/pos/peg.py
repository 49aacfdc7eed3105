"""CPVT position encoding generator (Chu et al., "Conditional Positional Encodings for Vision
Transformers", ICLR 2023; docs/encodings.md, "CPVT").

``PEG(x) = DWConv3x3(x) + x`` on the patch tokens laid out as ``(B, D, h, w)``: depthwise,
stride 1, zero padding 1, with bias; prefix tokens pass through. Same math as timm's Twins
``PosConv`` with stride 1. No size-dependent parameters, so any grid runs.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..grid import Grid
from . import register_encoding
from .base import EncodingContext, PosEncoding

__all__ = ['PEG']


@register_encoding('peg')
class PEG(PosEncoding):
    """PEGs after the blocks listed in ``layers`` (0-based; CPVT: after the first block).

    ``num_pegs`` is the CPVT++ shorthand: one PEG after each of the first ``num_pegs`` blocks
    (capped at the depth); it is ignored when ``layers`` is given.
    """
    hooks = frozenset({'tokens'})

    def __init__(self, ctx: EncodingContext, layers: Optional[Sequence[int]] = None, num_pegs: int = 1,
                 kernel_size: int = 3):
        super().__init__(ctx)
        if layers is None:
            layers = range(min(num_pegs, ctx.depth))
        layers = sorted(int(i) for i in layers)
        bad = [i for i in layers if not 0 <= i < ctx.depth]
        if bad:
            raise ValueError(f'PEG layers {bad} are outside the model depth {ctx.depth} (0-based block indices)')
        self.layers = tuple(layers)
        self.convs = nn.ModuleDict({
            str(i): nn.Conv2d(ctx.dim, ctx.dim, kernel_size, 1, kernel_size // 2, bias=True, groups=ctx.dim)
            for i in layers})

    def after_block(self, x: torch.Tensor, layer: int, grid: Grid, state: Any) -> torch.Tensor:
        conv = self.convs[str(layer)] if layer in self.layers else None
        if conv is None:
            return x
        prefix, patches = x[:, :grid.num_prefix], x[:, grid.num_prefix:]
        B, N, C = patches.shape
        feat = patches.transpose(1, 2).reshape(B, C, grid.h, grid.w)
        patches = (conv(feat) + feat).flatten(2).transpose(1, 2)
        return torch.cat([prefix, patches], dim=1)
