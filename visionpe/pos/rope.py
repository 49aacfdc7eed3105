"""2-D rotary position embedding (Heo et al., "Rotary Position Embedding for Vision Transformer",
ECCV 2024, naver-ai/rope-vit; docs/encodings.md, "2-D RoPE").

Adjacent channel pairs ``(2j, 2j+1)`` of every head of q and k rotate by an angle ``phi_j``:
``(a, b) -> (a cos phi - b sin phi, a sin phi + b cos phi)``. Prefix tokens are not rotated.

* ``axial`` (theta 100): ``mag_i = theta^(-4i/d)`` for ``i < d/4``; pairs ``j < d/4`` turn by
  ``x * mag_j``, pairs ``j >= d/4`` by ``y * mag_(j - d/4)``.
* ``mixed`` (theta 10): learnable ``F`` of shape ``(2, depth, heads, d/2)`` (no weight decay),
  ``phi_j = x F_x,j + y F_y,j``, initialised per layer and head with a random direction.

Angles and sin/cos are computed in float32, also under autocast. Positions come from
:func:`visionpe.grid.grid_coords` in any mode; with ``coord_mode='polar'`` the axial variant uses
integer frequencies ``1 .. d/4`` on the angle axis, so that its phases stay 2 pi periodic
("rope2d_polar"). Test-time knobs: ``pos_scale`` multiplies positions (linear position
interpolation with ``train / test``), ``ntk_scale`` raises theta to ``theta * s^(d'/(d'-2))``
with ``d' = d/2`` channels per axis (NTK-aware scaling, axial only).
"""
from __future__ import annotations

from typing import Any, Optional, Set, Tuple

import torch
import torch.nn as nn
from timm.layers.pos_embed_sincos import apply_rot_embed, init_random_2d_freqs

from ..grid import Grid, GridCache, check_coord_mode, grid_coords
from . import register_encoding
from .base import EncodingContext, PosEncoding

__all__ = ['RoPE2D', 'MixedRoPEState', 'axial_frequencies', 'rope_tables', 'apply_rope']


def axial_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """``1 / theta^(4i / d)`` for ``i < d/4`` (float32, as naver computes it)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))


def rope_tables(angles: torch.Tensor, num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pair angles ``(..., N, d/2)`` -> interleaved ``(sin, cos)`` of shape ``(..., P + N, d)``.

    The ``P`` prefix rows are the identity rotation (sin 0, cos 1), so a whole sequence rotates
    in one pass without slicing off the prefix tokens.
    """
    angles = angles.float().repeat_interleave(2, dim=-1)
    sin, cos = angles.sin(), angles.cos()
    if num_prefix:
        pad = list(sin.shape)
        pad[-2] = num_prefix
        sin = torch.cat([sin.new_zeros(pad), sin], dim=-2)
        cos = torch.cat([cos.new_ones(pad), cos], dim=-2)
    return sin, cos


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (..., N, d); result in x's dtype (timm's apply_rot_embed)."""
    return apply_rot_embed(x, sin, cos)


class MixedRoPEState:
    """RoPE-Mixed rotations of one grid, layer by layer: ``state[l]`` is ``(sin, cos)`` of shape
    ``(heads, P + N, d)`` from ``phi = x F_x[l] + y F_y[l]`` (float32, also under autocast). Each block
    computes only its own layer, so no ``(depth, heads, N, d)`` stack is ever held (at 1024 px, ViT-S:
    ~150 MiB of tables that way, ~13 MiB per layer this way)."""

    def __init__(self, xy: torch.Tensor, freqs: torch.Tensor, num_prefix: int):
        self.xy, self.freqs, self.num_prefix = xy, freqs, num_prefix

    def __len__(self) -> int:
        return self.freqs.shape[1]

    def __getitem__(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=self.freqs.device.type, enabled=False):
            f = self.freqs[:, layer].float()  # (2, heads, d/2)
            # ([B,] heads, N, d/2): x F_x + y F_y, elementwise (no matmul downcast under autocast)
            xy = self.xy.unsqueeze(-3)  # ([B,] 1, N, 2)
            angles = xy[..., 0, None] * f[0].unsqueeze(-2) + xy[..., 1, None] * f[1].unsqueeze(-2)
            return rope_tables(angles, self.num_prefix)


@register_encoding('rope2d')
class RoPE2D(PosEncoding):
    """Axial or mixed 2-D RoPE on q and k (see module docstring)."""
    hooks = frozenset({'rotate'})
    coord_aug_support = 'sample'

    def __init__(
            self,
            ctx: EncodingContext,
            rope_type: str = 'axial',
            theta: Optional[float] = None,
            coord_mode: str = 'index',
            ref_hw: Optional[Tuple[int, int]] = None,
            polar_eps: float = 1.0,
            pos_scale: float = 1.0,
            ntk_scale: float = 1.0,
    ):
        super().__init__(ctx)
        if rope_type not in ('axial', 'mixed'):
            raise ValueError(f"rope_type must be 'axial' or 'mixed', got {rope_type!r}")
        d = ctx.head_dim
        if d % 4:
            raise ValueError(f'2-D RoPE needs a head dim divisible by 4, got {d} (embed_dim / num_heads)')
        self.rope_type = rope_type
        self.theta = float(theta if theta is not None else (100. if rope_type == 'axial' else 10.))
        self.coord_mode = check_coord_mode(coord_mode)
        self.ref_hw = tuple(ref_hw) if ref_hw is not None else tuple(ctx.grid_size)
        self.polar_eps = polar_eps
        self.pos_scale = pos_scale
        self.ntk_scale = ntk_scale
        if rope_type == 'mixed':
            self.freqs = nn.Parameter(init_random_2d_freqs(d, ctx.depth, ctx.num_heads, temperature=self.theta))
        else:
            self.freqs = None
        self._cache = GridCache()

    def _coords(self, grid: Grid) -> torch.Tensor:
        xy = grid_coords(grid.h, grid.w, self.coord_mode, ref_hw=self.ref_hw, polar_eps=self.polar_eps,
                         aug=grid.aug)
        return xy * self.pos_scale if self.pos_scale != 1.0 else xy

    def _axial_angles(self, grid: Grid) -> torch.Tensor:
        d = self.ctx.head_dim
        theta = self.theta
        if self.ntk_scale != 1.0:
            d_axis = d // 2
            theta = theta * self.ntk_scale ** (d_axis / (d_axis - 2))
        mag_x = axial_frequencies(d, theta)
        if self.coord_mode == 'polar':
            mag_y = torch.arange(1, d // 4 + 1, dtype=torch.float32)  # integer: 2 pi periodic in the angle
        else:
            mag_y = mag_x
        xy = self._coords(grid)
        return torch.cat([xy[..., 0, None] * mag_x, xy[..., 1, None] * mag_y], dim=-1)  # ([B,] N, d/2)

    def prepare(self, grid: Grid) -> Any:
        """Axial: the ``(sin, cos)`` tables ``(P + N, d)``, cached per grid. Mixed: a
        :class:`MixedRoPEState` that gives each layer its ``(heads, P + N, d)`` tables when asked."""
        if self.rope_type == 'axial':
            device = self.device
            key = (grid, self.coord_mode, self.ref_hw, self.pos_scale, self.ntk_scale, self.theta)
            return self._cache.get(key, device, lambda: rope_tables(self._axial_angles(grid), grid.num_prefix))
        key = (grid, self.coord_mode, self.ref_hw, self.pos_scale, 'xy')
        xy = self._cache.get(key, self.freqs.device, lambda: self._coords(grid))
        return MixedRoPEState(xy, self.freqs, grid.num_prefix)

    def tables(self, grid: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every rotation at once: ``(P + N, d)`` axial, ``(depth, heads, P + N, d)`` mixed (for inspection;
        the forward pass never builds the mixed stack)."""
        state = self.prepare(grid)
        if self.rope_type == 'axial':
            return state
        sin, cos = zip(*(state[layer] for layer in range(len(state))))
        return torch.stack(sin), torch.stack(cos)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, layer: int, state: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        sin, cos = state[layer] if self.rope_type == 'mixed' else state
        if sin.dim() == 3 and self.rope_type == 'axial':  # per-sample coordinates: (B, T, d) -> (B, 1, T, d)
            sin, cos = sin.unsqueeze(1), cos.unsqueeze(1)
        return apply_rope(q, sin, cos), apply_rope(k, sin, cos)

    def no_weight_decay(self) -> Set[str]:
        return {'freqs'} if self.freqs is not None else set()

    def extra_repr(self) -> str:
        return f'variant={self.rope_type}, theta={self.theta}, coord_mode={self.coord_mode}'

