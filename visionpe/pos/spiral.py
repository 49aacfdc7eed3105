"""Spiral RoPE (Liu et al., "Spiral RoPE: Rotate Your Rotary Positional Embeddings in the 2D Plane",
arXiv 2602.03227; code huajianduzhuo-code/Spiral_RoPE, ``RoPE_DeiT/rope.py``; docs/encodings.md, "Spiral RoPE").

Axial 2-D RoPE whose channel groups measure the position along ``K = 2R`` directions spread over 180 degrees
instead of only x and y. Per head (dim ``d``, ``R = rotate``):

* frequencies (buffer ``freqs``, ``n_f = e / 2`` values, ``e = d/2``, or ``d / (2R)`` with ``same_theta``):
  ``f_j = f_min (f_max / f_min)^((n_f - 1 - j) / (n_f - 1))`` with ``f_max = max_freq`` and
  ``f_min = min_freq`` or, when that is 0, ``max_freq / theta^((e - 2) / e)``; each used by one rotary pair of
  channels (``same_theta`` repeats each group of two pairs ``R`` times);
* channels ``[0, d/2)`` follow the row axis, ``[d/2, d)`` the column axis; cut into groups of ``4R`` channels,
  sub-block ``s`` (channels ``[4s, 4s + 4)`` of its group) is turned by ``phi_s = s * 90 / R`` degrees: a row-axis
  channel measures ``c_y + sin(phi) (x - c_x) + cos(phi) (y - c_y)``, a column-axis channel
  ``c_x + cos(phi) (x - c_x) - sin(phi) (y - c_y)`` (``(c_x, c_y)`` the grid centre);
* the pair angle is ``f * coordinate``; pairs are interleaved ``(2m, 2m+1)``; prefix tokens are not rotated.

Coordinates: any non-polar mode of :mod:`visionpe.grid`, on any ``H x W`` grid. ``border_clamp`` clamps each
turned coordinate to the grid's extent along its axis, which is what upstream's resampling of its frequency maps
(``grid_sample`` with border padding) computes. The upstream behaviours are two settings: ``coord_mode='index',
border_clamp=True`` (the default) is upstream at its training size and its evaluation recipe (a model rebuilt per
size: integer positions), and ``coord_mode='ref', border_clamp=True`` is an upstream model run at another size
(the grid squeezed into the training extent). Upstream runs only square grids; here ``H != W`` works in every mode.
Without the clamp the encoding is a pure relative one (translation invariant).

Coordinate augmentation (``coord_aug``, :class:`visionpe.grid.CoordAug`, per batch or per sample): the draw moves
the coordinates of the mode (``grid_coords(..., aug=grid.aug)``) before they are turned, so the centre and the
clamp's extent are those of the augmented grid (a shift then only moves every channel's coordinate by a constant,
a per-axis jitter stretches the plane before the directions are measured). ``pos_scale`` applies after it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..grid import Grid, GridCache, check_coord_mode, grid_coords
from . import register_encoding
from .base import COORD_MODE, EncodingContext, PosEncoding
from .rope import apply_rope, rope_tables

__all__ = ['SpiralRoPE', 'spiral_frequencies', 'spiral_angles']


def spiral_frequencies(head_dim: int, rotate: int, max_freq: float = 1.5, min_freq: float = 0.0,
                       theta: float = 10000., same_theta: bool = False) -> torch.Tensor:
    """The base frequency ladder (float32, evaluated as upstream does): see the module docstring."""
    e = head_dim // 2 // rotate if same_theta else head_dim // 2
    n = e // 2
    if min_freq < 1e-6:
        min_freq = max_freq / theta ** ((e - 2) / e)
    if n == 1:
        return torch.tensor([max_freq], dtype=torch.float32)
    return min_freq * (max_freq / min_freq) ** (torch.arange(n - 1, -1, -1).float() / (n - 1))


def _channel_layout(head_dim: int, rotate: int, freqs: torch.Tensor, same_theta: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per rotary pair (``d/2`` of them): frequency, axis (0 row, 1 column) and direction angle (radians)."""
    g = freqs.repeat_interleave(2)  # per channel of one axis
    if same_theta:
        g = g.view(-1, 4).repeat_interleave(rotate, dim=0).reshape(-1)
    ch = torch.arange(head_dim)
    per_channel = torch.cat([g, g])
    axis = (ch >= head_dim // 2).long()
    phi = ((ch % (4 * rotate)) // 4).float() * (math.pi / 2 / rotate)
    return per_channel[0::2], axis[0::2], phi[0::2]


def spiral_angles(xy: torch.Tensor, freqs: torch.Tensor, axis: torch.Tensor, phi: torch.Tensor,
                  border_clamp: bool) -> torch.Tensor:
    """Pair angles ``(N, d/2)`` for coordinates ``xy`` ``(N, 2)`` of a grid (see module docstring); per-sample
    coordinates ``(B, N, 2)`` give ``(B, N, d/2)``."""
    lo, hi = xy.min(-2, keepdim=True).values, xy.max(-2, keepdim=True).values  # (..., 1, 2)
    centre = (lo + hi) / 2
    u, v = xy[..., 0:1] - centre[..., 0:1], xy[..., 1:2] - centre[..., 1:2]  # (..., N, 1)
    s, c = torch.sin(phi), torch.cos(phi)
    row = centre[..., 1:2] + s * u + c * v
    col = centre[..., 0:1] + c * u - s * v
    if border_clamp:
        row = torch.minimum(torch.maximum(row, lo[..., 1:2]), hi[..., 1:2])
        col = torch.minimum(torch.maximum(col, lo[..., 0:1]), hi[..., 0:1])
    # phi = 0 is the plain axis: take the coordinate itself (no rounding from the turn)
    row = torch.where(phi == 0, xy[..., 1:2].expand_as(row), row)
    col = torch.where(phi == 0, xy[..., 0:1].expand_as(col), col)
    return freqs * torch.where(axis == 0, row, col)


@register_encoding('spiral')
class SpiralRoPE(PosEncoding):
    """Spiral RoPE on q and k (see module docstring).

    Args:
        rotate: R (attribute ``rotations``); ``K = 2R`` directions (upstream default 2; the head dim must be a
            multiple of ``4R``).
        max_freq, min_freq, theta, same_theta: the frequency ladder (upstream 1.5, 0, 10000, False).
        coord_mode, ref_hw: token coordinates (:mod:`visionpe.grid`, not ``polar``).
        border_clamp: clamp turned coordinates to the grid (upstream's border-padded resampling).
        pos_scale: multiplies the coordinates (test-time position interpolation).
    """
    hooks = frozenset({'rotate'})
    test_knobs = (COORD_MODE,)  # e.g. --coord-modes index ref (position interpolation)
    coord_aug_support = 'sample'

    def __init__(
            self,
            ctx: EncodingContext,
            rotate: int = 2,
            max_freq: float = 1.5,
            min_freq: float = 0.0,
            theta: float = 10000.,
            same_theta: bool = False,
            coord_mode: str = 'index',
            ref_hw: Optional[Tuple[int, int]] = None,
            border_clamp: bool = True,
            pos_scale: float = 1.0,
    ):
        super().__init__(ctx)
        d = ctx.head_dim
        if rotate < 1:
            raise ValueError(f'Spiral RoPE needs rotate >= 1 (rotate=1 is axial RoPE), got {rotate}')
        if d % (4 * rotate):
            raise ValueError(f'Spiral RoPE cuts each head into groups of 4 * rotate = {4 * rotate} channels; the head '
                             f'dim {d} is not a multiple: change rotate or embed_dim / num_heads')
        if same_theta and (d // 2 // rotate) % 2:
            raise ValueError(f'same_theta needs (head_dim / 2) / rotate to be even, got {d // 2 // rotate}')
        check_coord_mode(coord_mode)
        if coord_mode == 'polar':
            raise ValueError("Spiral RoPE turns directions on the image plane; coord_mode='polar' does not apply")
        self.rotations, self.max_freq, self.min_freq = int(rotate), float(max_freq), float(min_freq)
        self.theta, self.same_theta = float(theta), bool(same_theta)
        self.coord_mode = coord_mode
        self.ref_hw = tuple(ref_hw) if ref_hw is not None else tuple(ctx.grid_size)
        self.border_clamp = bool(border_clamp)
        self.pos_scale = float(pos_scale)
        # upstream keeps the ladder as a persistent buffer (checkpoints carry it)
        self.register_buffer('freqs', spiral_frequencies(d, self.rotations, self.max_freq, self.min_freq, self.theta,
                                                         self.same_theta))
        self._cache = GridCache()

    def angles(self, grid: Grid) -> torch.Tensor:
        """``(N, d/2)`` pair angles of the patch tokens of ``grid`` (``(B, N, d/2)`` under a per-sample
        coordinate draw), float32."""
        xy = grid_coords(grid.h, grid.w, self.coord_mode, ref_hw=self.ref_hw, aug=grid.aug).to(self.freqs.device)
        if self.pos_scale != 1.0:
            xy = xy * self.pos_scale
        f, axis, phi = _channel_layout(self.ctx.head_dim, self.rotations, self.freqs.float(), self.same_theta)
        return spiral_angles(xy, f, axis.to(xy.device), phi.to(xy.device), self.border_clamp)

    def prepare(self, grid: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(sin, cos)`` tables ``(P + N, d)`` (identity rows for prefix tokens; ``(B, P + N, d)`` under a
        per-sample coordinate draw), cached per grid unless it carries a draw."""
        key = (grid, self.coord_mode, self.ref_hw, self.border_clamp, self.pos_scale, self.freqs._version)
        return self._cache.get(key, self.device, lambda: rope_tables(self.angles(grid), grid.num_prefix))

    def rotate(self, q: torch.Tensor, k: torch.Tensor, layer: int, state) -> Tuple[torch.Tensor, torch.Tensor]:
        sin, cos = state
        if sin.dim() == 3:  # per-sample coordinates: (B, T, d) -> (B, 1, T, d)
            sin, cos = sin.unsqueeze(1), cos.unsqueeze(1)
        return apply_rope(q, sin, cos), apply_rope(k, sin, cos)

    def extra_repr(self) -> str:
        return (f'rotate={self.rotations}, max_freq={self.max_freq:g}, min_freq={self.min_freq:g}, '
                f'same_theta={self.same_theta}, coord_mode={self.coord_mode}, border_clamp={self.border_clamp}')
