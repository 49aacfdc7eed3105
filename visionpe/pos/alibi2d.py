"""2-D ALiBi (Press et al., "Train Short, Test Long", ICLR 2022, in 2-D as the LookHere and PaPE papers' baseline;
docs/encodings.md, "2-D ALiBi"), and :class:`DistanceBias`, the machinery of every additive bias that depends only
on the distance between two patches (also FIRE-2D, :mod:`visionpe.pos.fire2d`).

    bias_h(i, j) = -m_h * ||p_i - p_j||           (Euclidean, in the units of ``coord_mode``: patches by default)

with ALiBi's geometric head slopes ``m_h = 2^(-8 (h + 1) / n)`` for ``n`` heads a power of two, and for other head
counts the slopes of the largest power of two below ``n`` followed by every other slope of twice that
(:func:`alibi_slopes`). Pairs with a prefix token (class, registers) get no bias. ``slope_scale`` multiplies
every slope (a test-time knob: ``model.pe.slope_scale = s``).

Distance biases on an ``h x w`` grid depend only on the absolute offset ``(|dy|, |dx|)`` of the two patches: an
encoding gives one value per head for each of the ``h * w`` distinct offsets (its *table*) and the bias is
gathered from it, as Swin's relative position bias is, so nothing is ever computed per ``N x N`` pair. The bias is
built whole (small grids, training), by blocks of query rows (SDPA at high resolution without autograd, like
LookHere: no ``(heads, T, T)`` tensor), or inside the FlexAttention kernel (``score_mod``: a table lookup).

Coordinate augmentation (``coord_aug``, :class:`visionpe.grid.CoordAug`, one draw per batch): the draw maps every
coordinate as ``xy' = (xy + s) * j * r``; the shift cancels in every difference and the per-axis factor ``j * r``
(:meth:`~visionpe.grid.CoordDraw.axis_scale`) multiplies the steps, so the distances are those of an ``h x w`` grid
with steps ``(s_x j_x r, s_y j_y r)``: still one table per offset, shared by the batch (a per-sample draw would need
one table per image and is refused).
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

import torch

from ..grid import Grid, GridCache, check_coord_mode
from . import register_encoding
from .base import COORD_MODE, EncodingContext, PosEncoding

__all__ = ['ALiBi2D', 'DistanceBias', 'alibi_slopes', 'axis_steps', 'offset_distances', 'offset_index']


def alibi_slopes(num_heads: int) -> List[float]:
    """ALiBi's head slopes (Press et al. 2022): ``2^(-8 (h+1) / n)`` for a power of two ``n``, else those of the
    largest power of two ``m < n`` followed by the even-indexed slopes of ``2m``."""
    def geometric(n: int) -> List[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    if num_heads < 1:
        raise ValueError(f'ALiBi needs at least one head, got {num_heads}')
    m = 2 ** int(math.floor(math.log2(num_heads)))
    return geometric(m) + geometric(2 * m)[0::2][:num_heads - m]


def axis_steps(h: int, w: int, coord_mode: str, ref_hw: Tuple[int, int]) -> Tuple[float, float]:
    """``(s_x, s_y)``: one patch step along x and along y in the units of ``coord_mode`` (any non-polar mode of
    :mod:`visionpe.grid`, whose coordinates are affine in the patch index per axis)."""
    if coord_mode == 'index':
        return 1.0, 1.0
    if coord_mode == 'normalized':
        return 1.0 / w, 1.0 / h
    if coord_mode == 'centered':
        return 2.0 / w, 2.0 / h
    if coord_mode == 'ref':
        return ref_hw[1] / w, ref_hw[0] / h
    if coord_mode == 'normalized_ref':
        return 1.0 / ref_hw[1], 1.0 / ref_hw[0]
    raise ValueError(f'no axis steps for coordinate mode {coord_mode!r}')


def offset_distances(h: int, w: int, sx: float = 1.0, sy: float = 1.0) -> torch.Tensor:
    """Euclidean length of every distinct absolute offset ``(|dy|, |dx|)`` of an ``h x w`` grid with steps
    ``(sx, sy)``, flattened ``|dy| * w + |dx|``: ``(h * w,)`` float32."""
    dy = torch.arange(h, dtype=torch.float32)[:, None] * sy
    dx = torch.arange(w, dtype=torch.float32)[None, :] * sx
    return (dy * dy + dx * dx).sqrt().reshape(-1)


def offset_index(h: int, w: int, rows: slice, device: Optional[torch.device] = None) -> torch.Tensor:
    """``(len(rows), h * w)`` index into an offset table for the patch query rows ``rows`` (patch indices)."""
    q = torch.arange(h * w, device=device)[rows]
    k = torch.arange(h * w, device=device)
    return (q[:, None] // w - k[None, :] // w).abs() * w + (q[:, None] % w - k[None, :] % w).abs()


class DistanceBias(PosEncoding):
    """Base of additive biases that are a per-head function of patch distance: subclasses give
    :meth:`table` ``(heads, h * w)`` (one value per distinct offset) for a layer; this class gathers it whole,
    by query rows or in the FlexAttention kernel. Pairs with a prefix token get :meth:`prefix_table` (0 by default)."""
    hooks = frozenset({'bias'})
    test_knobs = (COORD_MODE,)  # e.g. --coord-modes index ref (distances in training-grid units)
    coord_aug_support = 'batch'

    def __init__(self, ctx: EncodingContext, coord_mode: str = 'index', ref_hw: Optional[Tuple[int, int]] = None):
        super().__init__(ctx)
        check_coord_mode(coord_mode)
        if coord_mode == 'polar':
            raise ValueError(f"{type(self).__name__} measures Euclidean distances on the image plane; "
                             f"coord_mode='polar' does not apply (use 'index', 'ref', 'normalized', ...)")
        self.coord_mode = coord_mode
        self.ref_hw = tuple(ref_hw) if ref_hw is not None else tuple(ctx.grid_size)
        self._grid_cache = GridCache()

    # --- grid geometry -----------------------------------------------------------------------------
    def steps(self, grid: Grid) -> Tuple[float, float]:
        """``(s_x, s_y)``: one patch step along x and y in ``coord_mode`` units, times the per-axis factor of the
        grid's coordinate draw (``grid.aug``; see module docstring)."""
        sx, sy = axis_steps(grid.h, grid.w, self.coord_mode, self.ref_hw)
        if grid.aug is None:
            return sx, sy
        if grid.aug.per_sample:
            raise ValueError(f'{type(self).__name__} builds one distance table per batch; a per-sample coordinate '
                             f'draw does not apply: use coord_aug with per_sample=False')
        fx, fy = grid.aug.axis_scale().tolist()
        return sx * fx, sy * fy

    def distances(self, grid: Grid) -> torch.Tensor:
        """``(h * w,)`` distance of every distinct offset, in ``coord_mode`` units (cached per grid unless it
        carries a coordinate draw)."""
        key = ('dist', grid, self.coord_mode, self.ref_hw)
        return self._grid_cache.get(key, self.device, lambda: offset_distances(grid.h, grid.w, *self.steps(grid)))

    def _index(self, grid: Grid) -> torch.Tensor:
        key = ('index', grid.hw)
        return self._grid_cache.get(key, self.device, lambda: offset_index(grid.h, grid.w, slice(None)))

    # --- what subclasses give ----------------------------------------------------------------------
    def table(self, state: Any, layer: int) -> torch.Tensor:
        """``(heads, h * w)`` bias of every distinct offset for ``layer``."""
        raise NotImplementedError

    def prefix_table(self, state: Any, layer: int) -> Optional[torch.Tensor]:
        """``(heads, 1 + h * w)`` bias of pairs with a prefix token: column 0 for two prefix tokens, column
        ``1 + n`` for a prefix token and patch ``n`` (either order); None: no bias (the default)."""
        return None

    def grid_of(self, state: Any) -> Grid:
        return state[0]

    # --- the bias ----------------------------------------------------------------------------------
    def layer_bias(self, state: Any, layer: int, rows: slice = slice(None)) -> torch.Tensor:
        """``(heads, len(rows), T)`` float32 bias for the query rows ``rows`` of the whole sequence."""
        grid = self.grid_of(state)
        P, n = grid.num_prefix, grid.num_patches
        r0, r1, _ = rows.indices(P + n)
        qa, qb = max(r0 - P, 0), max(r1 - P, 0)
        tab = self.table(state, layer)
        idx = self._index(grid)[qa:qb] if rows == slice(None) else offset_index(grid.h, grid.w, slice(qa, qb),
                                                                                  tab.device)
        patch = tab[:, idx]  # (H, qb - qa, n)
        if not P:
            return patch
        out = tab.new_zeros(tab.shape[0], r1 - r0, P + n)
        out[:, qa + P - r0:, P:] = patch
        pre = self.prefix_table(state, layer)
        if pre is not None:
            pa = min(r1, P) - r0  # prefix query rows among the rows
            if pa > 0:
                out[:, :pa, :P] = pre[:, :1, None]
                out[:, :pa, P:] = pre[:, None, 1:]
            out[:, qa + P - r0:, :P] = pre[:, 1 + qa:1 + qb, None]
        return out

    def bias(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any) -> torch.Tensor:
        return self.layer_bias(state, layer).unsqueeze(0).to(q.dtype)

    def row_bias(self, layer: int) -> str:
        return 'shared'

    def bias_rows(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any,
                  rows: slice) -> torch.Tensor:
        return self.layer_bias(state, layer, rows).unsqueeze(0).to(q.dtype)

    def score_mod(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any) -> Callable:
        """In-kernel twin of :meth:`bias`: lookups in the offset (and prefix) tables, no ``T x T`` tensor."""
        grid = self.grid_of(state)
        tab = self.table(state, layer)
        pre = self.prefix_table(state, layer)
        if pre is None:
            pre = tab.new_zeros(tab.shape[0], 1 + grid.num_patches)
        P, w = grid.num_prefix, grid.w
        t = torch.arange(P + grid.num_patches, device=tab.device) - P
        r, c, patch = t.clamp(min=0) // w, t.clamp(min=0) % w, t >= 0
        pre_col = t + 1  # column of the prefix table for a token (0 for prefix tokens)
        pre_col[~patch] = 0

        def score_mod(score, b, h, q_idx, kv_idx):
            idx = (r[q_idx] - r[kv_idx]).abs() * w + (c[q_idx] - c[kv_idx]).abs()
            qp, kp = patch[q_idx], patch[kv_idx]
            v = torch.where(qp & kp, tab[h, idx], pre[h, torch.where(qp, pre_col[q_idx], pre_col[kv_idx])])
            return score + v.to(score.dtype)
        return score_mod

    def extra_repr(self) -> str:
        return f'coord_mode={self.coord_mode}'


@register_encoding('alibi2d')
class ALiBi2D(DistanceBias):
    """2-D ALiBi: ``-m_h ||p_i - p_j||`` with ALiBi's geometric slopes (see module docstring).

    Args:
        slope_scale: multiplies every head slope (test-time knob).
        coord_mode, ref_hw: coordinates (:mod:`visionpe.grid`, not ``polar``); ``index`` = patch units.
    """

    def __init__(self, ctx: EncodingContext, slope_scale: float = 1.0, coord_mode: str = 'index',
                 ref_hw: Optional[Tuple[int, int]] = None):
        super().__init__(ctx, coord_mode, ref_hw)
        self.slope_scale = float(slope_scale)
        self.slopes = tuple(alibi_slopes(ctx.num_heads))

    def prepare(self, grid: Grid) -> Tuple[Grid, torch.Tensor]:
        """The grid and the ``(heads, h * w)`` table (the same in every layer), cached per grid and scale."""
        key = ('table', grid, self.coord_mode, self.ref_hw, self.slope_scale)

        def build():
            m = torch.tensor(self.slopes, dtype=torch.float32) * self.slope_scale
            return -m[:, None] * self.distances(grid).cpu()[None, :]
        return grid, self._grid_cache.get(key, self.device, build)

    def table(self, state: Tuple[Grid, torch.Tensor], layer: int) -> torch.Tensor:
        return state[1]

    def extra_repr(self) -> str:
        return f'slope_scale={self.slope_scale:g}, ' + super().extra_repr()
