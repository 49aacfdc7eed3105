"""Strip windows for radial-strip attention (RST, arXiv 2404.00358; official code Calvin11311/MDT
``basicsr/models/archs/mdt_arch.py``; docs/encodings.md, "Radial-strip transformer") and their Fourier
relative-position bias.

A *layout* says which tokens of an ``h x w`` grid share a strip. Strips hold different numbers of
tokens, so they are packed as a padded batch: ``index`` lists the token of every slot of every strip
(``num_windows x max_len``; padded slots repeat the strip's first token and are masked as keys), ``inverse`` gives
the slot of every token. Layouts depend only on the grid and are built once per grid
(:class:`visionpe.grid.GridCache` in the attention modules).

Two partitions:

``row``    the reference: ``1 x Ww`` strips of the Cartesian map, strip ``(row, col // Ww)``, slots by
           increasing column (``transpose=True``: ``Ww x 1`` column strips). Azimuth offset
           ``d = col_i - col_j`` with angle ``2 pi d / Ww`` (the column offset read as an angle, as if a
           strip spanned a full turn); radius offset ``e = row_i - row_j = 0``. A width that is not a
           multiple of ``Ww`` leaves a shorter last strip per row (masked padding).
``polar``  tokens binned about the grid centre ``((w - 1) / 2, (h - 1) / 2)``: azimuth bin
           ``alpha = floor((theta + pi) A / 2 pi)`` of ``A`` bins, ring ``rho = floor(r)`` (patch units);
           strip = (sector ``alpha // (A / S)``, band ``rho // ring_width``); ``shifted`` layouts move
           sectors by half a sector and bands by half a ring width (alternate blocks, like Swin's
           shift). Azimuth offset: circular ``alpha_i - alpha_j`` in ``[-A/2, A/2)``, angle ``2 pi d / A``;
           radius offset ``rho_i - rho_j``.

Bias (:class:`StripBias`), per head, tables indexed by the signed offset with Python's negative
indexing (row ``d mod (2K - 1)``), as upstream's ``phi`` / ``theta``:

    b_ij = a_p[d] cos(2 pi d / A) + b_p[d] sin(2 pi d / A) + a_r[e] cos(w_r e) + b_r[e] sin(w_r e)

with ``w_r = theta_max / H`` upstream (irrelevant there: ``e = 0``, so the radius term is the constant
``a_r[0]`` and cancels in the softmax) and ``pi / ring_width`` for polar strips.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..grid import grid_coords

__all__ = ['StripSpec', 'StripLayout', 'StripBias', 'row_strips', 'polar_strips', 'pack_strips']


@dataclass
class StripLayout:
    """Packed strips of one grid (see module docstring). ``valid`` is None when no slot is padding."""
    grid_hw: Tuple[int, int]
    num_windows: int
    max_len: int
    index: torch.Tensor          # (nW * L,) token of every slot (padded slots: the strip's first)
    inverse: torch.Tensor        # (N,) slot of every token
    valid: Optional[torch.Tensor]  # (nW, L) bool
    mask: Optional[torch.Tensor]   # (nW, 1, L) float: 0 on real keys, -inf on padded ones
    lengths: Tuple[int, ...]     # tokens per strip (packed layout for block-diagonal kernels)
    order: torch.Tensor          # (N,) tokens grouped by strip, no padding
    order_inverse: torch.Tensor  # (N,)
    az_offset: torch.Tensor      # (nW, L, L) signed azimuth offsets
    rad_offset: torch.Tensor     # (nW, L, L) signed radius offsets
    pair: torch.Tensor           # (nW, L, L) int32 row of the (azimuth, radius) offset pair in
    #                              StripBias.table: (d mod 2K-1) (2R-1) + (e mod 2R-1); padded keys: the -inf row
    az_rows: int                 # K: the angular table has 2K - 1 rows
    rad_rows: int                # R: the radial table has 2R - 1 rows
    az_period: int               # A: azimuth offset d is the angle 2 pi d / A
    rad_freq: float              # w_r: radius offset e is the angle w_r e

    def tensors(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def pack_strips(
        window_id: torch.Tensor,
        az: torch.Tensor,
        rad: torch.Tensor,
        grid_hw: Tuple[int, int],
        az_period: int,
        az_rows: int,
        rad_rows: int,
        rad_freq: float,
        circular: bool,
) -> StripLayout:
    """Group tokens by ``window_id`` (any integers; empty ids are dropped) into a padded batch."""
    N = window_id.numel()
    uniq, win = torch.unique(window_id, return_inverse=True)
    nW = uniq.numel()
    counts = torch.bincount(win, minlength=nW)
    L = int(counts.max())
    order = torch.argsort(win, stable=True)  # strips in id order, tokens row-major inside
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty(N, dtype=torch.long)
    slot[order] = torch.arange(N) - starts[win[order]]
    inverse = win * L + slot
    index = torch.full((nW * L,), -1, dtype=torch.long)
    index[inverse] = torch.arange(N)
    index = index.view(nW, L)
    valid = index >= 0
    # padded slots repeat the strip's first token: masked as keys, dropped as queries, offsets in range
    index = torch.where(valid, index, index[:, :1]).reshape(-1)
    a, r = az[index].view(nW, L), rad[index].view(nW, L)
    d = a[:, :, None] - a[:, None, :]
    if circular:
        d = (d + az_period // 2) % az_period - az_period // 2
    e = r[:, :, None] - r[:, None, :]
    if d.abs().max() > az_rows - 1 or e.abs().max() > rad_rows - 1:
        raise AssertionError('strip offsets exceed the bias tables (strip layout and table sizes disagree)')
    rad_span = 2 * rad_rows - 1
    pair = (d % (2 * az_rows - 1)) * rad_span + e % rad_span
    pair = pair.masked_fill(~valid[:, None, :], (2 * az_rows - 1) * rad_span).int()  # padded keys: -inf row
    padded = not bool(valid.all())
    mask = None
    if padded:
        mask = torch.zeros(nW, 1, L).masked_fill(~valid[:, None, :], float('-inf'))
    return StripLayout(
        grid_hw=tuple(grid_hw), num_windows=nW, max_len=L, index=index, inverse=inverse,
        valid=valid if padded else None, mask=mask, lengths=tuple(int(c) for c in counts),
        order=order, order_inverse=torch.argsort(order), az_offset=d, rad_offset=e, pair=pair,
        az_rows=az_rows, rad_rows=rad_rows, az_period=az_period, rad_freq=rad_freq)


def row_strips(h: int, w: int, strip_len: int, transpose: bool = False, rad_freq: float = 0.) -> StripLayout:
    """Reference ``1 x strip_len`` row strips (``transpose``: ``strip_len x 1`` column strips)."""
    xy = grid_coords(h, w, 'index').long()
    x, y = xy[:, 0], xy[:, 1]
    line, pos, n_pos = (x, y, h) if transpose else (y, x, w)
    per_line = -(-n_pos // strip_len)
    wid = line * per_line + pos // strip_len
    return pack_strips(wid, pos, line, (h, w), az_period=strip_len, az_rows=strip_len, rad_rows=1,
                       rad_freq=rad_freq, circular=False)


def polar_strips(h: int, w: int, num_sectors: int, ring_width: int, azimuth_bins: int, shifted: bool = False
                 ) -> StripLayout:
    """Azimuth-sector x radius-ring strips about the grid centre (see module docstring)."""
    if azimuth_bins % num_sectors:
        raise ValueError(f'azimuth_bins ({azimuth_bins}) must be a multiple of num_sectors ({num_sectors})')
    # the centre and angle convention of grid_coords(..., 'polar'), in float64 so that tokens on a bin
    # edge (axes, diagonals) are binned the same way on every machine
    xy = grid_coords(h, w, 'index').double()
    dx, dy = xy[:, 0] - (w - 1) / 2, xy[:, 1] - (h - 1) / 2
    theta = torch.atan2(dy, dx)  # (-pi, pi]
    rho = torch.floor(torch.sqrt(dx * dx + dy * dy)).long()
    alpha = torch.floor((theta + math.pi) * (azimuth_bins / (2 * math.pi))).long() % azimuth_bins
    K = azimuth_bins // num_sectors
    sector = ((alpha + (K // 2 if shifted else 0)) % azimuth_bins) // K
    band = (rho + (ring_width // 2 if shifted else 0)) // ring_width
    wid = band * num_sectors + sector
    return pack_strips(wid, alpha, rho, (h, w), az_period=azimuth_bins, az_rows=K, rad_rows=ring_width,
                       rad_freq=math.pi / ring_width, circular=True)


@dataclass(frozen=True)
class StripSpec:
    """How one strip-attention layer partitions a grid (``strips='row'`` or ``'polar'``)."""
    strips: str = 'polar'
    strip_len: int = 8              # row strips: Ww
    num_sectors: int = 8            # polar strips
    ring_width: int = 4
    azimuth_bins: int = 64
    rad_freq: Optional[float] = None  # row strips: upstream theta_max / H (the radius term is constant)

    def __post_init__(self):
        if self.strips not in ('row', 'polar'):
            raise ValueError(f"strips must be 'row' (reference 1 x Ww strips) or 'polar' (azimuth sector x "
                             f"radius ring), got {self.strips!r}")
        for name in ('strip_len', 'num_sectors', 'ring_width', 'azimuth_bins'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.strips == 'polar' and self.azimuth_bins % self.num_sectors:
            raise ValueError(f'azimuth_bins ({self.azimuth_bins}) must be a multiple of num_sectors '
                             f'({self.num_sectors})')

    @property
    def az_rows(self) -> int:
        return self.strip_len if self.strips == 'row' else self.azimuth_bins // self.num_sectors

    @property
    def rad_rows(self) -> int:
        """Radius offsets per strip; 1 means the radius term would be a constant."""
        return 1 if self.strips == 'row' else self.ring_width

    def build(self, h: int, w: int, shifted: bool = False) -> StripLayout:
        if self.strips == 'row':
            return row_strips(h, w, self.strip_len, transpose=shifted, rad_freq=self.rad_freq or 0.)
        return polar_strips(h, w, self.num_sectors, self.ring_width, self.azimuth_bins, shifted)


class StripBias(nn.Module):
    """Per-head angular (``a_p``, ``b_p``) and radial (``a_r``, ``b_r``) Fourier tables -> logit bias.

    ``radial=False`` drops the radius tables (they would only add a constant: one ring per strip).
    """

    def __init__(self, num_heads: int, az_rows: int, rad_rows: int, radial: bool = True, init_std: float = .02):
        super().__init__()
        self.num_heads, self.az_rows, self.rad_rows = num_heads, az_rows, rad_rows
        self.a_p = nn.Parameter(torch.zeros(2 * az_rows - 1, num_heads))
        self.b_p = nn.Parameter(torch.zeros(2 * az_rows - 1, num_heads))
        if radial:
            self.a_r = nn.Parameter(torch.zeros(2 * rad_rows - 1, num_heads))
            self.b_r = nn.Parameter(torch.zeros(2 * rad_rows - 1, num_heads))
        else:
            self.register_parameter('a_r', None)
            self.register_parameter('b_r', None)
        for p in self.parameters():
            trunc_normal_(p, std=init_std)

    def _check(self, lay: StripLayout) -> None:
        if lay.az_rows != self.az_rows or lay.rad_rows != self.rad_rows:
            raise ValueError(f'strip layout with offset ranges ({lay.az_rows}, {lay.rad_rows}) does not fit bias '
                             f'tables built for ({self.az_rows}, {self.rad_rows})')

    @staticmethod
    def _lookup(table: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        # (rows, heads) at signed offsets (negative = counted from the end, as upstream) -> (heads, *offset);
        # index_select over the flat offsets: advanced indexing took 4x the time (rst_tiny at 448 px)
        flat = (offset % table.shape[0]).flatten()
        return table.t().contiguous().index_select(1, flat).view(table.shape[1], *offset.shape)

    @staticmethod
    def _fourier(a: torch.Tensor, b: torch.Tensor, half: int, angle: Callable[[torch.Tensor], torch.Tensor]
                 ) -> torch.Tensor:
        """``a[i] cos(angle(d_i)) + b[i] sin(angle(d_i))`` for every table row ``i``: (rows, heads), with
        the signed offset ``d_i = i`` for ``i < half`` and ``i - rows`` above (Python's negative indexing)."""
        i = torch.arange(a.shape[0], device=a.device)
        ang = angle(torch.where(i < half, i, i - a.shape[0]).float())
        return a * torch.cos(ang)[:, None] + b * torch.sin(ang)[:, None]

    def angular_table(self, lay: StripLayout) -> torch.Tensor:
        """``a_p[d] cos(2 pi d / A) + b_p[d] sin(2 pi d / A)`` per azimuth offset: (2K - 1, heads). The
        angle in float32 as upstream: ``(d * 2 pi) / A``."""
        self._check(lay)
        return self._fourier(self.a_p, self.b_p, self.az_rows, lambda d: d * (2 * math.pi) / lay.az_period)

    def radial_table(self, lay: StripLayout) -> Optional[torch.Tensor]:
        """``a_r[e] cos(w_r e) + b_r[e] sin(w_r e)`` per radius offset: (2R - 1, heads), or None without
        radius tables."""
        if self.a_r is None:
            return None
        self._check(lay)
        return self._fourier(self.a_r, self.b_r, self.rad_rows, lambda e: e * lay.rad_freq)

    def angular(self, lay: StripLayout) -> torch.Tensor:
        """Angular term at every pair of slots: (heads, nW, L, L)."""
        return self._lookup(self.angular_table(lay), lay.az_offset)

    def radial(self, lay: StripLayout) -> Optional[torch.Tensor]:
        """Radial term at every pair of slots: (heads, nW, L, L), or None without radius tables."""
        table = self.radial_table(lay)
        return None if table is None else self._lookup(table, lay.rad_offset)

    def table(self, lay: StripLayout) -> torch.Tensor:
        """Bias of every (azimuth, radius) offset pair, row ``(d mod 2K-1) (2R-1) + (e mod 2R-1)``, and a
        last ``-inf`` row (padded keys): (heads, (2K - 1)(2R - 1) + 1)."""
        t = self.angular_table(lay)[:, None, :]
        rad = self.radial_table(lay)
        t = (t + rad[None, :, :] if rad is not None else t.expand(-1, 2 * self.rad_rows - 1, -1)).flatten(0, 1)
        return torch.cat([t, t.new_full((1, self.num_heads), float('-inf'))]).t().contiguous()

    def forward(self, lay: StripLayout, pair: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full bias with the padding mask, (heads, nW, L, L): one gather of :meth:`table` at the layout's
        ``pair`` rows (or at ``pair``, a subset of them). The sums per offset pair are formed once per
        call on the small table instead of at every slot pair (4 gathers, 4 products, 3 sums at 448 px)."""
        pair = lay.pair if pair is None else pair
        return self.table(lay).index_select(1, pair.flatten()).view(self.num_heads, *pair.shape)

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, az_offsets={2 * self.az_rows - 1}, ' \
               f'rad_offsets={2 * self.rad_rows - 1 if self.a_r is not None else 0}'
