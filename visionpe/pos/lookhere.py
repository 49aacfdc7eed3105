"""LookHere: directed attention heads with distance penalties (Fuller et al., "LookHere: Vision
Transformers with Directed Attention Generalize and Extrapolate", NeurIPS 2024;
GreenCUBIC/lookhere ``lookhere.py``; docs/encodings.md, "LookHere").

Each head of layer ``l`` adds to the logit of a query patch ``i`` and a key patch ``j``::

    bias_l[h, i, j] = -bf16( (s_global * s_layer[l]) * (s_head[h] * d_h(i, j)) )

``d_h`` is the Euclidean distance in patch units (``distance='sqrt'`` / ``'square'`` transform it),
or, for ``center`` heads, the key's distance from the grid centre, or 0 for ``zero`` heads; keys
outside the head's field of view get ``+inf`` (``fill_with='inf'``), which becomes the largest
bfloat16 before rounding, i.e. a ``-3.39e38`` logit. ``s_layer = linspace(*layer_slopes, depth)``.
Pairs with a prefix token get no bias. The reference rounds the product to bfloat16 even in
float32 (``bf16_round=True`` reproduces that) and turns ``0 * inf`` (a zero slope) into 0.

Fields of view, with ``dx = x_key - x_query`` and ``dy = y_key - y_query`` (y grows downwards):
``up: dy <= 0``, ``down: dy >= 0``, ``left: dx <= 0``, ``right: dx >= 0``, ``tri_up: dy <= -|dx|``,
``tri_down: dy >= |dx|``, ``tri_left: dx <= -|dy|``, ``tri_right: dx >= |dy|``, ``diag_a_b``: tri_a or
tri_b. A head with several tokens sees their intersection; the query itself is always visible.

Layouts: the reference's shorthand, families joined by ``-`` (``'halves-corners-eighths1'``), each
family being four heads (table :data:`FAMILIES`), or a named layout: ``lh180`` = ``halves``
(180-degree half planes), ``lh90`` = ``corners`` (quadrants), ``lh45`` = ``eighths1-eighths2``
(45-degree cones). A list with one layout per block is also accepted.

Head rule (any head count): heads are dealt to the families in chunks of four, round-robin from
the first family, and each family's heads are contiguous, in family order; within a family's run
head ``i`` looks in the family's direction ``i mod 4``. This reproduces every combination the
reference supports (4k heads with one family; 12 = 8 + 4 or 4 + 4 + 4; 16 = 8 + 8, 8 + 4 + 4 or
4 x 4; 6 = 4 + 2) and extends it to the others (3 heads: the first three directions; 8 heads with
two families: 4 + 4). A family left without heads (fewer than 4 heads per family) is reported
with a warning. Head slopes, per run of consecutive heads of one family: direction families give
head ``i`` of the run ``2^-(1 + i // 4)``; ``none``/``zero``/``center`` families give
``[1/4, 1/16, 1/64, 1/256][i // ceil(n / 4)]`` for a run of ``n`` heads.

Memory: the bias factors as ``s_layer(l) x base_h(i, j)``, so one ``(heads, T, T)`` base per grid
(and per distinct layout) is cached, never a ``(depth, heads, T, T)`` tensor; each layer scales,
rounds and negates it on the fly. With FlexAttention the bias is computed inside the kernel from
token coordinates, per-head direction flags and slopes: no ``T x T`` tensor at all. With SDPA
at high resolution (no autograd, bias above ``VISIONPE_MAX_BIAS_MB``) each block of query rows is
built from the coordinates when it is needed and the base is not cached (:mod:`visionpe.attention`).
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..grid import Grid, GridCache, check_coord_mode, grid_coords
from . import register_encoding
from .base import EncodingContext, PosEncoding

__all__ = ['LookHere', 'HeadSpec', 'FAMILIES', 'NAMED_LAYOUTS', 'PRIMITIVES', 'parse_layout', 'lookhere_base',
           'layer_slopes_linspace', 'MAX_BF16']

MAX_BF16 = torch.finfo(torch.bfloat16).max  # 3.3895313892515355e38

# The reference's direction shorthand: each family is four heads, each head a tuple of tokens.
FAMILIES: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    'none': ((), (), (), ()),
    'zero': (('zero',),) * 4,
    'none1zero3': ((),) + (('zero',),) * 3,
    'none2zero2': ((),) * 2 + (('zero',),) * 2,
    'none3zero1': ((),) * 3 + (('zero',),),
    'center': (('center',),) * 4,
    'halves': (('up',), ('down',), ('left',), ('right',)),
    'corners': (('up', 'left'), ('up', 'right'), ('down', 'left'), ('down', 'right')),
    'triangles': (('tri_up',), ('tri_down',), ('tri_left',), ('tri_right',)),
    'diagonals': (('diag_up_right',), ('diag_up_left',), ('diag_down_right',), ('diag_down_left',)),
    'eighths1': (('tri_up', 'left'), ('tri_down', 'left'), ('tri_left', 'up'), ('tri_right', 'up')),
    'eighths2': (('tri_up', 'right'), ('tri_down', 'right'), ('tri_left', 'down'), ('tri_right', 'down')),
    'zerohalves': (('zero', 'up'), ('zero', 'down'), ('zero', 'left'), ('zero', 'right')),
    'zerocorners': (('zero', 'up', 'left'), ('zero', 'up', 'right'), ('zero', 'down', 'left'),
                    ('zero', 'down', 'right')),
    'zerotriangles': (('zero', 'tri_up'), ('zero', 'tri_down'), ('zero', 'tri_left'), ('zero', 'tri_right')),
}
_DIRECTION_FAMILIES = ('halves', 'corners', 'triangles', 'diagonals', 'eighths1', 'eighths2')
NAMED_LAYOUTS: Dict[str, str] = {'lh180': 'halves', 'lh90': 'corners', 'lh45': 'eighths1-eighths2'}
# Field-of-view tests, in this order (flags per head in the kernel inputs).
PRIMITIVES: Tuple[str, ...] = ('up', 'down', 'left', 'right', 'tri_up', 'tri_down', 'tri_left', 'tri_right',
                               'diag_up_right', 'diag_up_left', 'diag_down_right', 'diag_down_left')
_NONE_SLOPES = (0.25, 0.0625, 0.015625, 0.00390625)
DISTANCES = ('linear', 'sqrt', 'square')
FILLS = ('inf', 'zero', 'max')


@dataclass(frozen=True)
class HeadSpec:
    """One head: its field-of-view tokens, distance kind (``dist`` / ``center`` / ``zero``), slope."""
    family: str
    tokens: Tuple[str, ...]
    slope: float

    @property
    def kind(self) -> str:
        return 'zero' if 'zero' in self.tokens else 'center' if 'center' in self.tokens else 'dist'

    @property
    def fov(self) -> Tuple[str, ...]:
        return tuple(t for t in self.tokens if t not in ('zero', 'center'))


def _run_slopes(family: str, n: int) -> List[float]:
    if family in _DIRECTION_FAMILIES:
        return [2.0 ** -(1 + i // 4) for i in range(n)]
    per = max(1, math.ceil(n / 4))
    return [_NONE_SLOPES[min(3, i // per)] for i in range(n)]


def parse_layout(layout: str, num_heads: int) -> List[HeadSpec]:
    """Per-head specs of a named layout or a shorthand string (module docstring: head rule)."""
    if not isinstance(layout, str) or not layout:
        raise ValueError(f'LookHere layout must be a non-empty string, got {layout!r}')
    spec = NAMED_LAYOUTS.get(layout, layout)
    names = spec.split('-')
    bad = [n for n in names if n not in FAMILIES]
    if bad:
        raise ValueError(f"unknown LookHere layout {layout!r} (unknown families {bad}); use a named layout "
                         f"({', '.join(NAMED_LAYOUTS)}) or families joined by '-' from: {', '.join(FAMILIES)}")
    if num_heads < 1:
        raise ValueError(f'LookHere needs at least one head, got {num_heads}')
    counts = [0] * len(names)
    left, f = num_heads, 0
    while left:
        take = min(4, left)
        counts[f] += take
        left -= take
        f = (f + 1) % len(names)
    empty = [n for n, c in zip(names, counts) if c == 0]
    if empty:
        warnings.warn(f'LookHere layout {layout!r} on {num_heads} heads: families {empty} get no head (each '
                      f'family takes heads in chunks of four); use at least {4 * len(names)} heads to show them all',
                      stacklevel=3)
    head_names: List[str] = []
    tokens: List[Tuple[str, ...]] = []
    for name, c in zip(names, counts):
        head_names += [name] * c
        tokens += [FAMILIES[name][i % 4] for i in range(c)]
    slopes: List[float] = []
    for name, run in itertools.groupby(head_names):  # runs of one family share the slope schedule
        slopes += _run_slopes(name, len(list(run)))
    return [HeadSpec(n, t, s) for n, t, s in zip(head_names, tokens, slopes)]


def layer_slopes_linspace(start: float, end: float, depth: int) -> List[float]:
    """``numpy.linspace(start, end, depth)`` in double precision (the reference's layer slopes)."""
    if depth == 1:
        return [float(start)]
    step = (end - start) / (depth - 1)
    out = [start + i * step for i in range(depth)]
    out[-1] = float(end)
    return out


def _visible(token: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    if token == 'up':
        return dy <= 0
    if token == 'down':
        return dy >= 0
    if token == 'left':
        return dx <= 0
    if token == 'right':
        return dx >= 0
    if token == 'tri_up':
        return dy <= -dx.abs()
    if token == 'tri_down':
        return dy >= dx.abs()
    if token == 'tri_left':
        return dx <= -dy.abs()
    if token == 'tri_right':
        return dx >= dy.abs()
    if token.startswith('diag_'):
        a, b = token.split('_')[1:]
        return _visible(f'tri_{a}', dx, dy) | _visible(f'tri_{b}', dx, dy)
    raise ValueError(f'unknown LookHere direction token {token!r}')


def _transform(d2: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance from squared distance, float32 (the same ops as the in-kernel path)."""
    if distance == 'linear':
        return d2.sqrt()
    if distance == 'sqrt':
        return d2.sqrt().sqrt()
    return d2


def _head_fill(spec: HeadSpec, fill_with: str, dmax: float, cmax: float) -> float:
    if fill_with == 'inf':
        return math.inf
    if fill_with == 'zero':
        return 0.0
    return {'dist': dmax, 'center': cmax, 'zero': 0.0}[spec.kind]  # 'max': the head's largest distance


def _extent(xy: torch.Tensor, distance: str) -> Tuple[float, float]:
    """Largest pair distance (transformed) and largest distance from the centre, for ``fill_with='max'``."""
    span = xy.max(0).values - xy.min(0).values
    dmax = float(_transform((span * span).sum(), distance))
    cmax = float((span * 0.5).square().sum().sqrt())
    return dmax, cmax


def lookhere_base(
        specs: Sequence[HeadSpec],
        xy: torch.Tensor,
        num_prefix: int,
        distance: str = 'linear',
        fill_with: str = 'inf',
        rows: slice = slice(None),
) -> torch.Tensor:
    """``base[h, i, j] = s_head[h] * d_h(i, j)`` (masked: the fill value), zero on prefix pairs.

    Shape ``(heads, P + N, P + N)``, float32, or only the query rows ``rows`` of it; ``xy`` are the
    ``N`` patch coordinates.
    """
    n, P = xy.shape[0], num_prefix
    r0, r1, _ = rows.indices(P + n)
    qa, qb = max(r0 - P, 0), max(r1 - P, 0)  # the patch queries among the rows
    xy = xy.float()
    x, y = xy[:, 0], xy[:, 1]
    dx = x[None, :] - x[qa:qb, None]  # key minus query
    dy = y[None, :] - y[qa:qb, None]
    dist = _transform(dx * dx + dy * dy, distance)
    cdist = (xy - xy.mean(0)).square().sum(-1).sqrt()  # the key's distance from the grid centre
    dmax, cmax = _extent(xy, distance)
    prims: Dict[str, torch.Tensor] = {}
    base = dist.new_zeros(len(specs), r1 - r0, P + n)
    patch = base[:, qa + P - r0:, P:]
    for h, spec in enumerate(specs):
        d = {'dist': dist, 'center': cdist[None, :].expand_as(dist), 'zero': torch.zeros_like(dist)}[spec.kind]
        for tok in spec.fov:
            if tok not in prims:
                prims[tok] = _visible(tok, dx, dy)
            d = torch.where(prims[tok], d, d.new_tensor(_head_fill(spec, fill_with, dmax, cmax)))
        patch[h] = torch.tensor(spec.slope, dtype=torch.float32) * d
    return base


def _round_bias(v: torch.Tensor, bf16_round: bool) -> torch.Tensor:
    """``-bf16(v)`` with ``+inf -> max bf16`` and ``nan (0 * inf) -> 0``, as the reference (in place on ``v``)."""
    v = torch.nan_to_num_(v, nan=0.0, posinf=MAX_BF16)
    if bf16_round:
        v = v.to(torch.bfloat16).float()
    return v.neg_()


@register_encoding('lookhere')
class LookHere(PosEncoding):
    """LookHere directed biases (see module docstring).

    Args:
        layout: named layout (``lh180``, ``lh90``, ``lh45``), reference shorthand (e.g.
            ``'halves-corners-eighths1'``), or a list of those, one per block.
        global_slope: ``s_global``; may be changed at test time (``model.pe.global_slope = ...``).
        layer_slopes: ``(first, last)`` of the linear per-layer schedule.
        distance: ``'linear'`` (Euclidean), ``'sqrt'`` or ``'square'``.
        fill_with: value of keys outside a head's view: ``'inf'`` (masked), ``'zero'`` (no mask, no
            penalty) or ``'max'`` (the head's largest distance).
        bf16_round: round the per-layer bias to bfloat16 as the reference does (keep True to use
            released weights exactly).
        coord_mode: token coordinates (``'index'``: patch units, the reference; ``'ref'``: rescaled to
            the training grid ``ref_hw``; any non-polar mode of :mod:`visionpe.grid`).
    """
    hooks = frozenset({'bias'})
    coord_aug_support = 'batch'

    def __init__(
            self,
            ctx: EncodingContext,
            layout: Union[str, Sequence[str]] = 'lh90',
            global_slope: float = 1.0,
            layer_slopes: Sequence[float] = (1.5, 0.5),
            distance: str = 'linear',
            fill_with: str = 'inf',
            bf16_round: bool = True,
            coord_mode: str = 'index',
            ref_hw: Optional[Tuple[int, int]] = None,
    ):
        super().__init__(ctx)
        if isinstance(layout, str):
            layouts = [layout] * ctx.depth
        else:
            layouts = list(layout)
            if len(layouts) != ctx.depth:
                raise ValueError(f'LookHere got {len(layouts)} per-layer layouts for a model of depth {ctx.depth}; '
                                 f'give one layout string, or one per block')
        self.layouts = tuple(layouts)
        self.specs = {name: parse_layout(name, ctx.num_heads) for name in dict.fromkeys(layouts)}
        self.layout = layout if isinstance(layout, str) else tuple(layouts)
        try:
            s0, s1 = (float(s) for s in layer_slopes)
        except (TypeError, ValueError):
            raise ValueError(f'LookHere layer_slopes must be a pair (first, last) of numbers, got {layer_slopes!r}')
        self.layer_slopes = (s0, s1)
        self.global_slope = float(global_slope)
        if distance not in DISTANCES:
            raise ValueError(f"LookHere distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        if fill_with not in FILLS:
            raise ValueError(f"LookHere fill_with must be one of {', '.join(FILLS)}, got {fill_with!r}")
        self.distance, self.fill_with = distance, fill_with
        self.bf16_round = bool(bf16_round)
        check_coord_mode(coord_mode)
        if coord_mode == 'polar':
            raise ValueError("LookHere measures Euclidean distances and directions on the image plane; "
                             "coord_mode='polar' does not apply (use 'index', 'ref', 'normalized', ...)")
        self.coord_mode = coord_mode
        self.ref_hw = tuple(ref_hw) if ref_hw is not None else tuple(ctx.grid_size)
        # (heads, T, T) per grid and distinct layout; large at high resolution, so keep two grids' worth
        self._bases = GridCache(max_entries=2 * len(self.specs))
        self._kernel = GridCache()  # small per-grid inputs of the score_mod

    # --- slopes ------------------------------------------------------------------------------------
    def layer_scale(self, layer: int) -> float:
        """``s_global * s_layer[layer]`` (double precision, as the reference)."""
        return self.global_slope * layer_slopes_linspace(*self.layer_slopes, self.ctx.depth)[layer]

    def head_slopes(self, layer: int = 0) -> List[float]:
        return [s.slope for s in self.specs[self.layouts[layer]]]

    # --- per-grid tensors --------------------------------------------------------------------------
    def _coords(self, grid: Grid) -> torch.Tensor:
        return grid_coords(grid.h, grid.w, self.coord_mode, ref_hw=self.ref_hw, aug=grid.aug)

    def base(self, grid: Grid, layer: int = 0) -> torch.Tensor:
        """The cached ``(heads, T, T)`` base of ``layer``'s layout on ``grid``."""
        name = self.layouts[layer]
        key = (grid, name, self.distance, self.fill_with, self.coord_mode, self.ref_hw)
        return self._bases.get(key, self.device, lambda: lookhere_base(
            self.specs[name], self._coords(grid), grid.num_prefix, self.distance, self.fill_with))

    def layer_bias(self, grid: Grid, layer: int, rows: Optional[slice] = None) -> torch.Tensor:
        """``(heads, T, T)`` float32 bias of one layer: scaled, rounded to bf16 AFTER scaling, negated.

        With ``rows``, only those query rows, built from the coordinates without touching the
        cached base (that is the point: at high resolution the base is the large tensor).
        """
        if rows is None:
            base = self.base(grid, layer)
        else:
            base = lookhere_base(self.specs[self.layouts[layer]], self._coords(grid).to(self.device),
                                 grid.num_prefix, self.distance, self.fill_with, rows)
        scale = torch.tensor(self.layer_scale(layer), dtype=torch.float32, device=base.device)
        return _round_bias(base * scale, self.bf16_round)

    def prepare(self, grid: Grid) -> Grid:
        return grid

    def bias(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any) -> torch.Tensor:
        return self.layer_bias(state, layer).unsqueeze(0)

    def row_bias(self, layer: int) -> str:
        return 'shared'

    def bias_rows(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any,
                  rows: slice) -> torch.Tensor:
        return self.layer_bias(state, layer, rows).unsqueeze(0)

    def _kernel_inputs(self, grid: Grid, name: str) -> Dict[str, torch.Tensor]:
        def build():
            specs = self.specs[name]
            xy = self._coords(grid)
            P = grid.num_prefix
            pad = xy.new_zeros(P, 2)
            full = torch.cat([pad, xy], 0)
            cdist = (xy - xy.mean(0)).square().sum(-1).sqrt()
            dmax, cmax = _extent(xy, self.distance)
            return dict(
                x=full[:, 0].contiguous(), y=full[:, 1].contiguous(),
                cdist=torch.cat([xy.new_zeros(P), cdist]),
                kind=torch.tensor([('dist', 'center', 'zero').index(s.kind) for s in specs]),
                need=torch.tensor([[p in s.fov for p in PRIMITIVES] for s in specs]),
                slope=torch.tensor([s.slope for s in specs], dtype=torch.float32),
                fill=torch.tensor([_head_fill(s, self.fill_with, dmax, cmax) for s in specs], dtype=torch.float32),
            )
        key = (grid, name, self.fill_with, self.distance, self.coord_mode, self.ref_hw)
        return self._kernel.get(key, self.device, build)

    def score_mod(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any) -> Callable:
        """In-kernel twin of :meth:`bias`, from coordinates, per-head flags and slopes (no T x T tensor)."""
        grid: Grid = state
        inp = self._kernel_inputs(grid, self.layouts[layer])
        xs, ys, cd, kind, need = inp['x'], inp['y'], inp['cdist'], inp['kind'], inp['need']
        slope, fill = inp['slope'], inp['fill']
        lscale = torch.tensor(self.layer_scale(layer), dtype=torch.float32, device=xs.device)
        P, distance, bf16 = grid.num_prefix, self.distance, self.bf16_round
        max_bf16 = torch.tensor(MAX_BF16, dtype=torch.float32, device=xs.device)
        zero = torch.zeros((), dtype=torch.float32, device=xs.device)

        def score_mod(score, b, h, q_idx, kv_idx):
            dx = xs[kv_idx] - xs[q_idx]
            dy = ys[kv_idx] - ys[q_idx]
            d = _transform(dx * dx + dy * dy, distance)
            d = torch.where(kind[h] == 1, cd[kv_idx], torch.where(kind[h] == 2, zero, d))
            adx, ady = dx.abs(), dy.abs()
            tri = (dy <= -adx, dy >= adx, dx <= -ady, dx >= ady)  # up, down, left, right
            ok = (dy <= 0, dy >= 0, dx <= 0, dx >= 0) + tri + (
                tri[0] | tri[3], tri[0] | tri[2], tri[1] | tri[3], tri[1] | tri[2])
            hidden = need[h, 0] & ~ok[0]
            for p in range(1, len(PRIMITIVES)):
                hidden = hidden | (need[h, p] & ~ok[p])
            v = lscale * (slope[h] * torch.where(hidden, fill[h], d))
            v = torch.where(v == math.inf, max_bf16, v)
            v = torch.where(v != v, zero, v)  # 0 * inf
            if bf16:
                v = v.to(torch.bfloat16).to(torch.float32)
            patch = (q_idx >= P) & (kv_idx >= P)
            return score + torch.where(patch, -v, zero).to(score.dtype)
        return score_mod

    def extra_repr(self) -> str:
        return (f'layout={self.layout}, global_slope={self.global_slope}, layer_slopes={self.layer_slopes}, '
                f'distance={self.distance}, fill_with={self.fill_with}, bf16_round={self.bf16_round}, '
                f'coord_mode={self.coord_mode}')
