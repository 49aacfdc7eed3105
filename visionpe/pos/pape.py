"""PaPE and PaPE-RI: parabolic position encoding (Ohrstrom et al., "Where to Attend: A Principled
Vision-Centric Position Encoding with Parabolas", arXiv 2602.01418; code DTU-PAS/parabolic-position-encoding,
``pape/nn/positions/pape.py`` and ``pape_ri.py``; docs/encodings.md, "PaPE").

Every layer adds to the logit of query token ``s`` and key token ``t`` (same head ``h``) a sum of downward
parabolas in their displacement, whose curvature and slope come from the query's content:

    PaPE:     logit(s, t) = q_s . k_t + sum_j [ -a_sj (P_sj - P_tj)^2 + beta_sj (P_sj - P_tj) ]
              P_nj = W_pos[h J + j] . p_n        (J learned projections of the 2-D position p_n per head)
              a_sj = softplus(W_ab h_s)[0, h, j],  beta_sj = (W_ab h_s)[1, h, j]
    PaPE-RI:  logit(s, t) = q_s . k_t - a_s s_h^2 ||p_s - p_t||^2,  a_s = softplus(W_a h_s)[h]

with ``h_s`` the attention input (the block's first LayerNorm output) of token ``s`` and ``s_h`` a fixed random
per-head scale (a buffer, as upstream). Both are computed without any ``N x N`` tensor: q and k are widened with
position channels (``rotate`` hook) so that one fused attention call gives content + position:

    PaPE     q~ = [q, -sum_j a_j P_j^2, a_1..a_J, 2 a_j P_j, sum_j beta_j P_j, beta_1..beta_J, 0...]
             k~ = [k, 1,                 -P_j^2,   P_j,      1,                -P_j,           0...]
    PaPE-RI  q~ = [q, -a |P|^2, a, a, 2 a P_x, 2 a P_y, 0...]     k~ = [k, 1, -P_x^2, -P_y^2, P_x, P_y, 0...]

zero-padded to a multiple of 8 (``pad_multiple``). PaPE's default ``layout='compact'`` sums the J parabolas
into one 2-D quadratic first (6 position channels instead of ``3J + 2``, same logits; :class:`PaPE`). The
softmax scale stays ``head_dim^-0.5`` of the ORIGINAL head dim (the Attention module computes it before any hook)
and multiplies the position term too. v is not widened.
The curvatures come from the attention input, which the ``tokens`` hook :meth:`attn_input` sees just before
attention; it stores the layer's coefficients in the forward's state, and ``rotate`` takes them from there.

Positions (upstream convention, the defaults): patch ``(row r, column c)`` sits at ``(x, y) = (c + 1, r + 1)``
(``coord_mode='index'`` plus ``patch_offset=1``) and every prefix token (class, registers) at ``(0, 0)``, encoded
like any patch. ``normalize=True`` is upstream's ``normalize`` option with its axis quirk: x is divided by the
number of ROWS and y by the number of COLUMNS. Other coordinate modes of :mod:`visionpe.grid` apply too
(not ``polar``: a parabola in the angle would not wrap).

Coordinate augmentation (``coord_aug``, :class:`visionpe.grid.CoordAug`, per batch or per sample): the draw moves
the patch coordinates of the mode as in every encoding (``grid_coords(..., aug=grid.aug)``), then ``patch_offset``
and ``normalize`` apply as without it; prefix tokens stay at ``(0, 0)``. A per-sample draw gives positions
``(B, P + N, 2)`` and widened q~/k~ per image.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..grid import Grid, GridCache, check_coord_mode, grid_coords
from . import register_encoding
from .base import COORD_MODE, EncodingContext, PosEncoding

__all__ = ['PaPE', 'PaPERI', 'PaPEState', 'pape_positions', 'pad_width']


def pad_width(width: int, multiple: int) -> int:
    """``width`` rounded up to a multiple of ``multiple``."""
    return -(-width // multiple) * multiple


def pape_positions(grid: Grid, coord_mode: str = 'index', ref_hw: Optional[Tuple[int, int]] = None,
                   patch_offset: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """``(P + N, 2)`` positions ``(x, y)``: prefix tokens at ``(0, 0)``, patches at their coordinates (moved by
    ``grid.aug`` when drawn) plus ``patch_offset``; ``normalize`` divides ``(x, y)`` by ``(rows, columns)``
    (upstream's axis quirk). A per-sample draw gives ``(B, P + N, 2)``."""
    xy = grid_coords(grid.h, grid.w, coord_mode, ref_hw=ref_hw, aug=grid.aug) + patch_offset
    if normalize:
        xy = xy / torch.tensor([float(grid.h), float(grid.w)])
    return torch.cat([xy.new_zeros(*xy.shape[:-2], grid.num_prefix, 2), xy], dim=-2)


class PaPEState:
    """One forward's positions ``(P + N, 2)`` (``(B, P + N, 2)`` under a per-sample coordinate draw) and the
    per-layer query coefficients that :meth:`attn_input` hands to :meth:`rotate` (consumed there, so no layer
    keeps them)."""
    __slots__ = ('pos', 'coef')

    def __init__(self, pos: torch.Tensor):
        self.pos = pos
        self.coef: Dict[int, torch.Tensor] = {}


class _ParabolicBase(PosEncoding):
    """Shared machinery: positions, the attention-input hook, the widening and padding."""
    hooks = frozenset({'tokens', 'rotate'})
    test_knobs = (COORD_MODE,)  # e.g. --coord-modes index ref (position interpolation)
    coord_aug_support = 'sample'

    def __init__(self, ctx: EncodingContext, coord_mode: str, ref_hw: Optional[Tuple[int, int]],
                 patch_offset: float, normalize: bool, pad_multiple: int):
        super().__init__(ctx)
        check_coord_mode(coord_mode)
        if coord_mode == 'polar':
            raise ValueError(f"{type(self).__name__} measures squared displacements on the image plane; "
                             f"coord_mode='polar' does not apply (use 'index', 'ref', 'normalized', ...)")
        if pad_multiple < 1:
            raise ValueError(f'pad_multiple must be a positive integer, got {pad_multiple}')
        self.coord_mode = coord_mode
        self.ref_hw = tuple(ref_hw) if ref_hw is not None else tuple(ctx.grid_size)
        self.patch_offset = float(patch_offset)
        self.normalize = bool(normalize)
        self.pad_multiple = int(pad_multiple)
        self._cache = GridCache()

    def positions(self, grid: Grid) -> torch.Tensor:
        """The ``(P + N, 2)`` token positions of ``grid`` (float32, on the encoding's device; cached unless the
        grid carries a coordinate draw, :class:`~visionpe.grid.GridCache`)."""
        key = (grid, self.coord_mode, self.ref_hw, self.patch_offset, self.normalize)
        return self._cache.get(key, self.device, lambda: pape_positions(
            grid, self.coord_mode, self.ref_hw, self.patch_offset, self.normalize))

    def prepare(self, grid: Grid) -> PaPEState:
        return PaPEState(self.positions(grid))

    def coefficients(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def attn_input(self, x: torch.Tensor, layer: int, state: PaPEState) -> torch.Tensor:
        state.coef[layer] = self.coefficients(x, layer)
        return x

    def widen(self, q: torch.Tensor, k: torch.Tensor, coef: torch.Tensor, pos: torch.Tensor, layer: int
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def rotate(self, q: torch.Tensor, k: torch.Tensor, layer: int, state: PaPEState
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        coef = state.coef.pop(layer, None)
        if coef is None:
            raise RuntimeError(f'{type(self).__name__} takes its curvatures from the attention input, but layer '
                               f'{layer} never passed it through attn_input: this model does not call the '
                               f"encoding's 'tokens' hook before attention (use a visionpe ViT)")
        if q.shape[2] != state.pos.shape[-2]:
            raise ValueError(f'{type(self).__name__} has positions for {state.pos.shape[-2]} tokens but attention '
                             f'got {q.shape[2]}')
        return self.widen(q, k, coef, state.pos, layer)

    def _assemble(self, q: torch.Tensor, q_parts: list, k_parts: list) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write the channel blocks into zero-padded ``(B, H, T, width)`` q~ and k~. A part is a tensor or a
        zero-argument function that makes it, called only when its slice is written, so at most one temporary
        block is alive besides the two results (the peak memory of a high-resolution forward)."""
        widths = [p.shape[-1] if isinstance(p, torch.Tensor) else p[1] for p in q_parts]
        total = pad_width(sum(widths), self.pad_multiple)
        shape = (*q.shape[:-1], total)
        q_wide, k_wide = q.new_zeros(shape), q.new_zeros(shape)
        start = 0
        for w, qp, kp in zip(widths, q_parts, k_parts):
            q_wide[..., start:start + w] = qp if isinstance(qp, torch.Tensor) else qp[0]()
            k_wide[..., start:start + w] = kp if isinstance(kp, torch.Tensor) else kp[0]()
            start += w
        return q_wide, k_wide

    def extra_repr(self) -> str:
        return (f'coord_mode={self.coord_mode}, patch_offset={self.patch_offset:g}, normalize={self.normalize}, '
                f'pad_multiple={self.pad_multiple}')


class _PaPELayer(nn.Module):
    """PaPE's weights of one layer (upstream key names): ``ab`` (content -> curvature, slope), ``position``."""

    def __init__(self, dim: int, heads: int, parabolas: int):
        super().__init__()
        self.ab = nn.Linear(dim, 2 * heads * parabolas, bias=False)
        self.position = nn.Linear(2, heads * parabolas, bias=False)


@register_encoding('pape')
class PaPE(_ParabolicBase):
    """PaPE: ``parabolas`` (J) learned parabolas per head and layer (see module docstring).

    Args:
        parabolas: J per head (upstream default 50).
        layout: ``'compact'`` (default: the J parabolas summed into one 2-D quadratic, 6 position channels) or
            ``'upstream'`` (upstream's ``3J + 2`` channels, e.g. to compare widened q/k with the reference).
        coord_mode, ref_hw: token coordinates (:mod:`visionpe.grid`, not ``polar``); default index units.
        patch_offset: added to every patch coordinate (upstream: 1, patches 1-based, prefix tokens at 0).
        normalize: upstream's ``normalize``: x / rows, y / columns.
        pad_multiple: widened q/k are zero-padded to a multiple of this (8: fused kernels).

    The compact layout uses that every ``P_j = w_j . p`` is linear in the 2-D position, so with ``dp = p_s - p_t``
    the position term is ``-dp^T M_s dp + b_s . dp``, ``M_s = sum_j a_sj w_j w_j^T`` (3 numbers) and
    ``b_s = sum_j beta_sj w_j`` (2 numbers, a linear map of ``h_s`` whose matrix is folded from the parameters
    every forward): q~ = [q, -p^T M p + b.p, M_xx, 2 M_xy, M_yy, 2 M p - b], k~ = [k, 1, -x^2, -xy, -y^2, x, y].
    Same logits up to float rounding, same parameters (checkpoints load either way), width ``d + 6``
    instead of ``d + 3J + 2`` and half the content projection (``H J + 2 H`` outputs instead of ``2 H J``).
    """

    def __init__(
            self,
            ctx: EncodingContext,
            parabolas: int = 50,
            layout: str = 'compact',
            coord_mode: str = 'index',
            ref_hw: Optional[Tuple[int, int]] = None,
            patch_offset: float = 1.0,
            normalize: bool = False,
            pad_multiple: int = 8,
    ):
        super().__init__(ctx, coord_mode, ref_hw, patch_offset, normalize, pad_multiple)
        if parabolas < 1:
            raise ValueError(f'PaPE needs at least one parabola per head, got parabolas={parabolas}')
        if layout not in ('compact', 'upstream'):
            raise ValueError(f"PaPE layout must be 'compact' or 'upstream', got {layout!r}")
        self.parabolas = int(parabolas)
        self.layout = layout
        self.layers = nn.ModuleList(_PaPELayer(ctx.dim, ctx.num_heads, self.parabolas) for _ in range(ctx.depth))

    def coefficients(self, x: torch.Tensor, layer: int):
        lay = self.layers[layer]
        if self.layout == 'upstream':
            return lay.ab(x)  # (B, T, 2 H J): curvature pre-activations, then slopes
        H, J = self.ctx.num_heads, self.parabolas
        w_a, w_beta = lay.ab.weight[:H * J], lay.ab.weight[H * J:]
        # b = sum_j beta_j w_j is linear in x: fold its matrix, (H, 2, dim) -> (2 H, dim)
        w_b = torch.einsum('hjc,hjd->hcd', lay.position.weight.view(H, J, 2), w_beta.view(H, J, -1))
        return F.linear(x, w_a), F.linear(x, w_b.reshape(2 * H, -1))

    def projected(self, pos: torch.Tensor, layer: int) -> torch.Tensor:
        """``P`` of shape ``(H, T, J)`` (``(B, H, T, J)`` for per-sample positions ``(B, T, 2)``): each head's J
        projections of the positions, float32."""
        H, J = self.ctx.num_heads, self.parabolas
        w = self.layers[layer].position.weight.float()
        return (pos.float() @ w.t()).unflatten(-1, (H, J)).transpose(-3, -2)

    def widen(self, q, k, coef, pos, layer):
        if self.layout == 'compact':
            return self._widen_compact(q, k, coef, pos, layer)
        B, T = coef.shape[:2]
        H, J = self.ctx.num_heads, self.parabolas
        with torch.autocast(device_type=q.device.type, enabled=False):
            u = coef.float().view(B, T, 2, H, J).permute(2, 0, 3, 1, 4)  # (2, B, H, T, J)
            a, beta = F.softplus(u[0]), u[1]
            P = self.projected(pos, layer)
            P = P if P.dim() == 4 else P.unsqueeze(0)  # (1 or B, H, T, J)
            one = P.new_ones(*P.shape[:-1], 1)
            q_parts = [q, (lambda: -(a * P * P).sum(-1, keepdim=True), 1), a, (lambda: 2 * a * P, J),
                       (lambda: (beta * P).sum(-1, keepdim=True), 1), beta]
            k_parts = [k, one, (lambda: -P * P, J), P, one, (lambda: -P, J)]
            return self._assemble(q, q_parts, k_parts)

    def _widen_compact(self, q, k, coef, pos, layer):
        u_a, b = coef
        B, T = u_a.shape[:2]
        H, J = self.ctx.num_heads, self.parabolas
        with torch.autocast(device_type=q.device.type, enabled=False):
            w = self.layers[layer].position.weight.float().view(H, J, 2)
            outer = torch.stack([w[..., 0] * w[..., 0], w[..., 0] * w[..., 1], w[..., 1] * w[..., 1]], -1)
            a = F.softplus(u_a.float().view(B, T, H, J))
            m = torch.einsum('bthj,hjk->bhtk', a, outer)  # (B, H, T, 3): M_xx, M_xy, M_yy
            b = b.float().view(B, T, H, 2).transpose(1, 2)  # (B, H, T, 2)
            p = pos.float() if pos.dim() == 2 else pos.float()[:, None]  # (T, 2) or per sample (B, 1, T, 2)
            x, y = p[..., 0, None], p[..., 1, None]  # (T, 1) or (B, 1, T, 1)
            mp = torch.cat([m[..., :1] * x + m[..., 1:2] * y, m[..., 1:2] * x + m[..., 2:] * y], -1)  # M p
            const = -(mp * p).sum(-1, keepdim=True) + (b * p).sum(-1, keepdim=True)
            q_pos = torch.cat([const, m[..., :1], 2 * m[..., 1:2], m[..., 2:], 2 * mp - b], -1)
            k_pos = torch.cat([torch.ones_like(x), -x * x, -x * y, -y * y, x, y], -1)  # ([B, 1,] T, 6)
            return self._assemble(q, [q, q_pos], [k, k_pos])

    def extra_repr(self) -> str:
        return f'parabolas={self.parabolas}, layout={self.layout}, ' + super().extra_repr()


class _PaPERILayer(nn.Module):
    """PaPE-RI's weights of one layer (upstream key names): ``a`` (content -> curvature) and the fixed
    per-head ``position_scales`` buffer, ``U(-sqrt(1/2), sqrt(1/2))`` as upstream draws it."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.a = nn.Linear(dim, heads, bias=False)
        self.register_buffer('position_scales', (2 * torch.rand(1, heads, 1, 1) - 1) * math.sqrt(1 / 2))


@register_encoding('pape_ri')
class PaPERI(_ParabolicBase):
    """PaPE-RI: one isotropic paraboloid per head, centred on the query (see module docstring).

    Args: as :class:`PaPE`, without ``parabolas``.
    """

    def __init__(
            self,
            ctx: EncodingContext,
            coord_mode: str = 'index',
            ref_hw: Optional[Tuple[int, int]] = None,
            patch_offset: float = 1.0,
            normalize: bool = False,
            pad_multiple: int = 8,
    ):
        super().__init__(ctx, coord_mode, ref_hw, patch_offset, normalize, pad_multiple)
        self.layers = nn.ModuleList(_PaPERILayer(ctx.dim, ctx.num_heads) for _ in range(ctx.depth))

    def coefficients(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return self.layers[layer].a(x)  # (B, T, H)

    def widen(self, q, k, coef, pos, layer):
        with torch.autocast(device_type=q.device.type, enabled=False):
            a = F.softplus(coef.float()).transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
            p = pos.float() if pos.dim() == 2 else pos.float()[:, None]  # (T, 2) or per sample (B, 1, T, 2)
            P = self.layers[layer].position_scales.float() * p  # (1 or B, H, T, 2)
            P2 = P * P
            q_parts = [q, -a * P2.sum(-1, keepdim=True), a.expand(-1, -1, -1, 2), 2 * a * P]
            k_parts = [k, P.new_ones(*P.shape[:-1], 1), -P2, P]
            return self._assemble(q, q_parts, k_parts)
