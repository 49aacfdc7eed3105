"""Absolute position embeddings: learned tables, 2-D sin-cos, resampling, and LaPE.

The ViT keeps its absolute table as ``model.pos_embed`` (timm's key and semantics); the functions
here compute what gets added for a grid. LaPE (Yu et al., ICCV 2023, "LaPE: Layer-adaptive Position
Embedding") is an encoding of its own: its table never enters the residual stream but is threaded
through one LayerNorm per block and added to each attention input (docs/encodings.md, "LaPE").
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_

from ..grid import CoordDraw, Grid, GridCache, check_coord_mode, grid_coords
from . import register_encoding
from .base import EncodingContext, PosEncoding

__all__ = ['sincos_2d', 'resample_table', 'sample_table_cape', 'LaPE', 'LaPEChain']


def sincos_2d(
        h: int,
        w: int,
        dim: int,
        temperature: float = 10000.,
        coord_mode: str = 'index',
        ref_hw: Optional[Tuple[int, int]] = None,
        aug: Optional[CoordDraw] = None,
) -> torch.Tensor:
    """Fixed 2-D sin-cos table (MAE), shape ``(1, h * w, dim)`` (``(B, h * w, dim)`` for a per-sample ``aug``).

    ``omega_i = 1 / temperature^(i / (dim/4))`` for ``i < dim/4`` and the embedding of a patch at
    ``(x, y)`` is ``[sin(x omega), cos(x omega), sin(y omega), cos(y omega)]``; ``aug`` moves ``(x, y)``
    (coordinate augmentation, :class:`visionpe.grid.CoordAug`).
    """
    if dim % 4:
        raise ValueError(f'sin-cos position embedding needs embed_dim divisible by 4, got {dim}')
    xy = grid_coords(h, w, coord_mode, ref_hw=ref_hw, aug=aug).double()
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ox, oy = xy[..., :1] * omega, xy[..., 1:] * omega
    out = torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=-1).float()
    return out if out.dim() == 3 else out.unsqueeze(0)


def sample_table_cape(table: torch.Tensor, table_hw: Tuple[int, int], num_prefix: int, grid: Grid) -> torch.Tensor:
    """CAPE for a learned table (Likhomanenko et al., NeurIPS 2021, "CAPE: Encoding Relative Positions with
    Continuous Augmented Positional Embeddings"): the patch part of the ``(1, P + h0*w0, D)`` table is
    sampled bilinearly (``grid_sample``, ``align_corners=False``, border padding) at the grid's ``centered``
    coordinates moved by ``grid.aug``. Without a draw and with ``grid.hw == table_hw`` every token reads its
    own table entry. Returns ``(1 or B, P + h*w, D)``; the P prefix rows are kept as they are.
    """
    h0, w0 = table_hw
    D = table.shape[-1]
    loc = grid_coords(grid.h, grid.w, 'centered', aug=grid.aug).to(device=table.device, dtype=table.dtype)
    loc = loc if loc.dim() == 3 else loc.unsqueeze(0)  # (B or 1, N, 2) as grid_sample's (x, y)
    B = loc.shape[0]
    patch = table[:, num_prefix:].reshape(1, h0, w0, D).permute(0, 3, 1, 2).expand(B, -1, -1, -1)
    out = F.grid_sample(patch, loc.unsqueeze(1), mode='bilinear', padding_mode='border', align_corners=False)
    out = out[:, :, 0].transpose(1, 2)  # (B, N, D)
    if num_prefix:
        out = torch.cat([table[:, :num_prefix].expand(B, -1, -1), out], dim=1)
    return out


def resample_table(
        table: torch.Tensor,
        new_hw: Tuple[int, int],
        old_hw: Tuple[int, int],
        num_prefix: int,
        interpolation: str = 'bicubic',
        antialias: bool = True,
) -> torch.Tensor:
    """Resample the patch part of a ``(1, P + h*w, D)`` table to a new grid, keeping the P prefix rows.

    timm's ``resample_abs_pos_embed`` (float32). ``antialias=True`` is timm's default; the DeiT /
    LaPE / iRPE fine-tuning recipes use plain bicubic (``antialias=False``).
    """
    if tuple(new_hw) == tuple(old_hw):
        return table
    return resample_abs_pos_embed(table, new_size=list(new_hw), old_size=list(old_hw),
                                  num_prefix_tokens=num_prefix, interpolation=interpolation,
                                  antialias=antialias)


class LaPEChain(Sequence):
    """``p_l = LN_l(p_(l-1))`` computed on demand, keeping only the last one: blocks ask for ``p_0, p_1, ...``
    in order, so each costs one LayerNorm; any other index is recomputed from ``p_0``."""

    def __init__(self, p0: torch.Tensor, norms: nn.ModuleList):
        self.p0, self.norms = p0, norms
        self._layer, self._p = -1, p0

    def __len__(self) -> int:
        return len(self.norms)

    def __getitem__(self, layer: int) -> torch.Tensor:
        if not 0 <= layer < len(self.norms):
            raise IndexError(f'LaPE layer {layer} out of range for depth {len(self.norms)}')
        if layer < self._layer:
            self._layer, self._p = -1, self.p0
        while self._layer < layer:
            self._layer += 1
            self._p = self.norms[self._layer](self._p)
        return self._p


@register_encoding('lape')
class LaPE(PosEncoding):
    """Layer-adaptive position embedding.

    ``p_0`` = the absolute table (learned or sin-cos) at the current grid; ``p_l = LN_l(p_(l-1))``
    (each block normalises the previous block's PE, the chain is cumulative); block ``l`` computes
    ``x = x + Attn(LN1_l(x) + p_l)``. Prefix tokens get their own table rows (``with_prefix``).
    """
    hooks = frozenset({'tokens'})
    coord_aug_support = 'sample'

    def __init__(
            self,
            ctx: EncodingContext,
            table: str = 'learn',
            with_prefix: bool = True,
            interpolation: str = 'bicubic',
            antialias: bool = False,
            norm_eps: float = 1e-6,
            coord_mode: str = 'index',
    ):
        super().__init__(ctx)
        if table not in ('learn', 'sincos'):
            raise ValueError(f"LaPE table must be 'learn' or 'sincos', got {table!r}")
        self.table = table
        self.num_prefix = ctx.num_prefix_tokens if with_prefix else 0
        self.interpolation, self.antialias = interpolation, antialias
        self.coord_mode = check_coord_mode(coord_mode)
        self.grid_size = tuple(ctx.grid_size)
        if table == 'learn':
            n = self.num_prefix + self.grid_size[0] * self.grid_size[1]
            self.pos_embed = nn.Parameter(torch.zeros(1, n, ctx.dim))
            trunc_normal_(self.pos_embed, std=.02)
        else:
            self.pos_embed = None
        self.norms = nn.ModuleList([nn.LayerNorm(ctx.dim, eps=norm_eps) for _ in range(ctx.depth)])
        self._cache = GridCache()

    def _p0(self, grid: Grid) -> torch.Tensor:
        if self.pos_embed is not None and grid.aug is not None:
            return sample_table_cape(self.pos_embed, self.grid_size, self.num_prefix, grid)
        if self.pos_embed is not None:
            return resample_table(self.pos_embed, grid.hw, self.grid_size, self.num_prefix,
                                  self.interpolation, self.antialias)
        device = self.device

        def build():
            t = sincos_2d(grid.h, grid.w, self.ctx.dim, coord_mode=self.coord_mode, ref_hw=self.grid_size,
                          aug=grid.aug)
            return torch.cat([t.new_zeros(t.shape[0], self.num_prefix, t.shape[-1]), t], dim=1)
        return self._cache.get((grid, self.coord_mode), device, build)

    def prepare(self, grid: Grid) -> Sequence[torch.Tensor]:
        """``[p_1, ..., p_depth]``: a list when gradients are on (backward keeps every ``p_l`` anyway), else a
        :class:`LaPEChain` that holds one ``p_l`` at a time (inference memory does not grow with depth)."""
        p = self._p0(grid)
        if self.num_prefix < grid.num_prefix:  # prefix tokens without a table row get no PE
            p = torch.cat([p.new_zeros(p.shape[0], grid.num_prefix - self.num_prefix, p.shape[-1]), p], dim=1)
        chain = LaPEChain(p, self.norms)
        return chain if not torch.is_grad_enabled() else list(chain)

    def attn_input(self, x: torch.Tensor, layer: int, state: Any) -> torch.Tensor:
        return x + state[layer]

    def set_grid_size(self, new_size: Tuple[int, int], old_size: Tuple[int, int]) -> None:
        if self.pos_embed is not None and tuple(new_size) != self.grid_size:
            self.pos_embed = nn.Parameter(resample_table(
                self.pos_embed.detach(), new_size, self.grid_size, self.num_prefix,
                self.interpolation, self.antialias))
        self.grid_size = tuple(new_size)

    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed'}
