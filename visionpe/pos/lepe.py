"""LePE: locally-enhanced positional encoding (Dong et al., "CSWin Transformer", CVPR 2022;
microsoft/CSWin-Transformer ``models/cswin.py``; docs/encodings.md, "CSWin: LePE").

A *value* term (docs/architecture.md, "The encoding interface"): the attention output of a window gets

    out = softmax(q k^T / sqrt(d)) v + DWConv3x3(V)

where ``V`` is the window's value tensor laid out as an image (channels = heads x head_dim,
channel ``c = head * d + j``) and the depthwise conv (bias, zero padding 1) runs *inside* the
window: zero padding at the window border, so a token never sees V from another window. Padded
tokens (see :mod:`visionpe.models.cswin`) carry V = 0 and so look like that zero padding.

:class:`LePE` is the layer (one per attention window type); :class:`LePEEncoding` is the same term
as a registered encoding (``pe='lepe'``) for the plain ViT, where the window is the whole patch grid
and prefix tokens get no LePE term.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

from ..grid import Grid
from . import register_encoding
from .base import EncodingContext, PosEncoding

__all__ = ['LePE', 'LePEEncoding']


class LePE(nn.Module):
    """``DWConv(V)`` inside every window; ``forward(v, hw)`` with v of shape (windows, heads, Hs*Ws, d).

    The conv is upstream's ``get_v``: ``Conv2d(dim, dim, k, padding=k // 2, groups=dim)``.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'LePE needs an odd kernel size (same-size output), got {kernel_size}')
        self.dim = dim
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride=1, padding=kernel_size // 2, groups=dim)

    def forward(self, v: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        Bw, heads, L, d = v.shape
        Hs, Ws = hw
        if heads * d != self.dim or Hs * Ws != L:
            raise ValueError(f'LePE built for {self.dim} channels got values of shape {tuple(v.shape)} '
                             f'for a {Hs}x{Ws} window')
        img = v.permute(0, 1, 3, 2).reshape(Bw, heads * d, Hs, Ws)
        out = self.conv(img).reshape(Bw, heads, d, L)
        return out.permute(0, 1, 3, 2)

    def value(self, out: torch.Tensor, v: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """The value hook: attention output plus the LePE term of the same window."""
        return out + self.forward(v, hw)


@register_encoding('lepe')
class LePEEncoding(PosEncoding):
    """LePE for the plain ViT: one depthwise conv per layer over the whole patch grid (value hook)."""
    hooks = frozenset({'value'})

    def __init__(self, ctx: EncodingContext, kernel_size: int = 3):
        super().__init__(ctx)
        self.lepe = nn.ModuleList([LePE(ctx.dim, kernel_size) for _ in range(ctx.depth)])

    def prepare(self, grid: Grid) -> Grid:
        return grid

    def value(self, out: torch.Tensor, v: torch.Tensor, probs: Optional[torch.Tensor], layer: int,
              state: Any) -> torch.Tensor:
        grid: Grid = state
        P = grid.num_prefix
        term = self.lepe[layer](v[:, :, P:], grid.hw)
        if P:
            term = torch.cat([term.new_zeros(term.shape[0], term.shape[1], P, term.shape[3]), term], dim=2)
        return out + term
