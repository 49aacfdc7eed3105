"""DINOv3's 2-D RoPE (Simeoni et al., "DINOv3", arXiv 2508.10104; facebookresearch/dinov3
``RopePositionEmbedding``; timm ``RotaryEmbeddingDinoV3``).

Axial RoPE on patch centres normalised to [-1, 1] (``coord_mode='centered'``)::

    x = 2 (i + 0.5) / D_x - 1,   y = 2 (j + 0.5) / D_y - 1

with ``(D_x, D_y) = (w, h)`` (``normalize_coords='separate'``), ``(min(h, w),) * 2`` (``'min'``) or
``(max(h, w),) * 2`` (``'max'``; these two keep the aspect ratio, so the shorter axis does not reach 1).
Pair ``i < d/4`` turns by ``2 pi y / P_i`` and pair ``d/4 + i`` by ``2 pi x / P_i`` (rows first), in the
rotate-half layout (pair ``j`` is channels ``j`` and ``j + d/2``). Periods ``P_i = base^(4i/d)``
(``base`` 100), or ``min_period (max_period / min_period)^(i / (d/4 - 1))`` when both are given (they then
replace ``base``, as upstream). Prefix tokens (class, registers) are not rotated.

Training-time coordinate augmentation (train mode only, one draw per forward pass for the whole batch, as
upstream): ``shift_coords`` S adds ``U(-S, S)`` per axis, ``jitter_coords`` J multiplies each axis by
``exp(U(-ln J, ln J))``, ``rescale_coords`` R both axes by one ``exp(U(-ln R, ln R))``; drawn in that order,
(row, col) per axis, from torch's global CPU generator, as timm does, so a seeded run reproduces timm's.
:meth:`DinoV3RoPE.augment_coords` is the one place that does it (a coordinate source can call it).

Every :class:`~visionpe.pos.rope.RoPE2D` knob applies (``pos_scale``, ``ntk_scale`` with ``base`` periods,
YaRN; the training extent of centred coordinates is 2 per axis).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..grid import Grid
from . import register_encoding
from .base import EncodingContext
from .rope import RoPE2D, axial_frequencies, rope_tables

__all__ = ['DinoV3RoPE', 'NORMALIZE_COORDS']

NORMALIZE_COORDS = ('separate', 'min', 'max')


@register_encoding('rope2d_dinov3')
class DinoV3RoPE(RoPE2D):
    """DINOv3 axial RoPE: centred normalised coordinates, rows first, rotate-half, optional augmentation."""
    axis_order = 'yx'
    rotate_half = True

    def __init__(
            self,
            ctx: EncodingContext,
            base: float = 100.,
            min_period: float | None = None,
            max_period: float | None = None,
            normalize_coords: str = 'separate',
            coord_mode: str = 'centered',
            ref_hw: tuple[int, int] | None = None,
            shift_coords: float | None = None,
            jitter_coords: float | None = None,
            rescale_coords: float | None = None,
            pos_scale: float = 1.0,
            ntk_scale: float = 1.0,
            yarn_scale: float = 1.0,
            yarn_alpha: float = 1.0,
            yarn_beta: float = 32.0,
            yarn_mscale: float | None = None,
    ):
        if coord_mode == 'polar':
            raise ValueError("DINOv3 RoPE rotates Cartesian coordinates; for rotary over (log r, angle) use "
                             "vit_rope2d_polar_* (pe='rope2d', coord_mode='polar')")
        super().__init__(ctx, rope_type='axial', theta=base, coord_mode=coord_mode, ref_hw=ref_hw,
                         pos_scale=pos_scale, ntk_scale=ntk_scale, yarn_scale=yarn_scale, yarn_alpha=yarn_alpha,
                         yarn_beta=yarn_beta, yarn_mscale=yarn_mscale)
        if normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(f"normalize_coords must be one of {', '.join(NORMALIZE_COORDS)}; got {normalize_coords!r}")
        if normalize_coords != 'separate' and self.coord_mode != 'centered':
            raise ValueError(f"normalize_coords={normalize_coords!r} divides centred coordinates: it needs "
                             f"coord_mode='centered', not {self.coord_mode!r}")
        if (min_period is None) != (max_period is None):
            raise ValueError('give both min_period and max_period (they replace base), or neither')
        if min_period is not None and not 0 < min_period <= max_period:
            raise ValueError(f'need 0 < min_period <= max_period, got {min_period}, {max_period}')
        for name, value, low in (('shift_coords', shift_coords, 0.), ('jitter_coords', jitter_coords, 1.),
                                 ('rescale_coords', rescale_coords, 1.)):
            if value is not None and not (math.isfinite(value) and value >= low):
                raise ValueError(f'{name} must be a finite number >= {low:g} (or None), got {value!r}')
        self.normalize_coords = normalize_coords
        self.min_period, self.max_period = min_period, max_period
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords

    # ------------------------------------------------------------------ coordinates
    def grid_xy(self, grid: Grid) -> torch.Tensor:
        xy = super().grid_xy(grid)  # 'centered': 2 (i + 0.5) / n - 1 per axis ('separate')
        if self.normalize_coords == 'separate':
            return xy
        denom = float(min(grid.h, grid.w) if self.normalize_coords == 'min' else max(grid.h, grid.w))
        return (xy + 1.0) * torch.tensor([grid.w / denom, grid.h / denom]) - 1.0

    @property
    def augments(self) -> bool:
        return any(v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords))

    def augment_coords(self, xy: torch.Tensor) -> torch.Tensor:
        """DINOv3's training augmentation of ``(N, 2)`` coordinates (x, y); see the module docstring."""
        yx = xy.flip(-1)  # upstream draws per axis in (row, col) order
        if self.shift_coords is not None:
            yx = yx + torch.empty(2, dtype=yx.dtype).uniform_(-self.shift_coords, self.shift_coords)
        if self.jitter_coords is not None:
            lim = math.log(self.jitter_coords)
            yx = yx * torch.empty(2, dtype=yx.dtype).uniform_(-lim, lim).exp()
        if self.rescale_coords is not None:
            lim = math.log(self.rescale_coords)
            yx = yx * torch.empty(1, dtype=yx.dtype).uniform_(-lim, lim).exp()
        return yx.flip(-1)

    # ------------------------------------------------------------------ frequencies
    def periods(self) -> torch.Tensor:
        """``P_i`` of the ``d/4`` pairs of one axis (before test-time knobs)."""
        n = self.ctx.head_dim // 4
        if self.min_period is not None:
            return self.min_period * (self.max_period / self.min_period) ** torch.linspace(0, 1, n)
        return 1.0 / axial_frequencies(self.ctx.head_dim, self.theta)

    def axial_magnitudes(self, theta: float) -> torch.Tensor:
        if self.min_period is not None:
            if self.ntk_scale != 1.0:
                raise ValueError('ntk_scale rescales the base of the periods; with min_period / max_period use '
                                 'pos_scale or yarn_scale')
            return 2 * math.pi / self.periods()
        return 2 * math.pi * axial_frequencies(self.ctx.head_dim, theta)

    def _knob_key(self) -> tuple:
        return super()._knob_key() + (self.normalize_coords, self.min_period, self.max_period)

    def prepare(self, grid: Grid) -> Any:
        if not (self.training and self.augments):
            return super().prepare(grid)
        xy = self.augment_coords(self.grid_xy(grid))  # a fresh draw per forward, never cached
        if self.pos_scale != 1.0:
            xy = xy * self.pos_scale
        sin, cos = rope_tables(self._axial_angles(grid, xy), grid.num_prefix, half=True, mscale=self.mscale())
        return sin.to(self.device), cos.to(self.device)

    def extra_repr(self) -> str:
        periods = (f'periods={self.min_period}..{self.max_period}' if self.min_period is not None
                   else f'base={self.theta}')
        return f'{periods}, coord_mode={self.coord_mode}, normalize_coords={self.normalize_coords}'
