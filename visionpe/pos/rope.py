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
with ``d' = d/2`` channels per axis (NTK-aware scaling, axial only: RoPE-Mixed refuses it),
``yarn_scale`` applies YaRN (:func:`yarn_factors`: NTK-by-parts frequency interpolation plus the
attention temperature); the evaluator sweeps all three as the ``rope_scaling`` knob
(:data:`ROPE_SCALING`). The channel layout is interleaved here; DINOv3's subclass (:mod:`visionpe.pos.rope_dinov3`) uses the rotate-half layout and puts the y pairs first.

YaRN (Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models", ICLR 2024,
section 3) in 2-D. A rotation pair with frequency vector ``f = (f_x, f_y)`` (angle per coordinate
unit) turns ``r = (|f_x| W + |f_y| H) / (2 pi)`` times across the training grid, ``W x H`` its
extent in coordinate units (index coordinates: the training grid's columns and rows). With
``gamma = clamp((r - alpha) / (beta - alpha), 0, 1)`` the frequency becomes
``f' = ((1 - gamma) / s + gamma) f``: pairs that turn more than ``beta`` times are kept, those that turn
less than ``alpha`` times are interpolated by ``s`` (position interpolation), a linear ramp between.
Axial RoPE gets one factor per axis (``r = |f| W / 2 pi`` for x, ``|f| H / 2 pi`` for y); RoPE-Mixed
and learned frequencies one per pair, by the magnitude of ``f`` along its direction (the formula
above). The temperature ``sqrt(1/t) = 0.1 ln s + 1`` (``yarn_mscale``) multiplies q and k of every
token (prefix tokens included): the softmax scale of attention is multiplied by ``(0.1 ln s + 1)^2``.
It is applied inside the rotation tables (``cos`` and ``sin`` times ``mscale``, the prefix rows
``cos = mscale``), as YaRN's reference code scales its cos/sin cache, so every attention backend
gets it without a change to the attention module.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Set, Tuple

import torch
import torch.nn as nn
from timm.layers.pos_embed_sincos import apply_rot_embed, init_random_2d_freqs

from ..grid import Grid, GridCache, check_coord_mode, grid_coords
from . import register_encoding
from .base import COORD_MODE, EncodingContext, Knob, KnobContext, PosEncoding

__all__ = ['RoPE2D', 'MixedRoPEState', 'axial_frequencies', 'rope_tables', 'apply_rope', 'apply_rope_qk',
           'yarn_factors', 'yarn_mscale', 'parse_rope_scaling', 'ROPE_SCALING']


def axial_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """``1 / theta^(4i / d)`` for ``i < d/4`` (float32, as naver computes it)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))


def rope_tables(angles: torch.Tensor, num_prefix: int, half: bool = False,
                mscale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pair angles ``(..., N, d/2)`` -> ``(sin, cos)`` of shape ``(..., P + N, d)``, times ``mscale``.

    Layout: pair ``j`` is channels ``(2j, 2j+1)`` (interleaved, RoPE-ViT) or, with ``half``,
    ``(j, j + d/2)`` (rotate-half, DINOv3 / LLaMA). The ``P`` prefix rows are the identity rotation
    (sin 0, cos 1) scaled by ``mscale``, so a whole sequence rotates in one pass without slicing off
    the prefix tokens. ``mscale`` != 1 scales every q and k (YaRN's temperature, :func:`yarn_mscale`).
    """
    angles = angles.float()
    angles = torch.cat([angles, angles], dim=-1) if half else angles.repeat_interleave(2, dim=-1)
    sin, cos = angles.sin(), angles.cos()
    if mscale != 1.0:
        sin, cos = sin * mscale, cos * mscale
    if num_prefix:
        pad = list(sin.shape)
        pad[-2] = num_prefix
        sin = torch.cat([sin.new_zeros(pad), sin], dim=-2)
        cos = torch.cat([cos.new_full(pad, mscale), cos], dim=-2)
    return sin, cos


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, half: bool = False) -> torch.Tensor:
    """Rotate the pairs of ``x`` (..., N, d) (layout as :func:`rope_tables`); result in x's dtype
    (timm's apply_rot_embed: ``x cos + rot(x) sin``).

    Interleaved float32 pairs are rotated as one complex product ``(x_2j + i x_2j+1) (cos_j + i sin_j)``,
    the same products and sums (bit-identical on x86) in one pass instead of five: 3-4x faster (Swin
    windows, ViT-S at 448 px)."""
    if half or x.dtype != torch.float32 or sin.dtype != torch.float32:
        return apply_rot_embed(x, sin, cos, half=half)
    return _rotate_complex(x, torch.complex(cos[..., ::2], sin[..., ::2]))


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, half: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rope` on q and k with one complex table."""
    if half or q.dtype != torch.float32 or k.dtype != torch.float32 or sin.dtype != torch.float32:
        return apply_rot_embed(q, sin, cos, half=half), apply_rot_embed(k, sin, cos, half=half)
    e = torch.complex(cos[..., ::2], sin[..., ::2])
    return _rotate_complex(q, e), _rotate_complex(k, e)


def _rotate_complex(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # a complex view needs even strides and offset
    return torch.view_as_real(torch.view_as_complex(pairs) * e).flatten(-2)


def yarn_factors(rotations: torch.Tensor, scale: float, alpha: float = 1.0, beta: float = 32.0) -> torch.Tensor:
    """YaRN's NTK-by-parts multiplier of each frequency, ``(1 - gamma) / s + gamma`` with
    ``gamma = clamp((r - alpha) / (beta - alpha), 0, 1)``, ``r`` (``rotations``) the number of turns a pair
    makes across the training extent (see the module docstring). ``s <= 1`` leaves every frequency."""
    if not beta > alpha >= 0:
        raise ValueError(f'YaRN needs 0 <= yarn_alpha < yarn_beta, got alpha={alpha}, beta={beta}')
    if scale <= 1.0:
        return torch.ones_like(rotations)
    gamma = ((rotations - alpha) / (beta - alpha)).clamp(0.0, 1.0)
    return (1.0 - gamma) / scale + gamma


def yarn_mscale(scale: float) -> float:
    """YaRN's ``sqrt(1/t) = 0.1 ln s + 1`` for ``s > 1`` (1 otherwise): q and k are each multiplied by it."""
    return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0


class MixedRoPEState:
    """RoPE-Mixed rotations of one grid, layer by layer: ``state[l]`` is ``(sin, cos)`` of shape
    ``(heads, P + N, d)`` from ``phi = x F_x[l] + y F_y[l]`` (float32, also under autocast). Each block
    computes only its own layer, so no ``(depth, heads, N, d)`` stack is ever held (at 1024 px, ViT-S:
    ~150 MiB of tables that way, ~13 MiB per layer this way)."""

    def __init__(self, xy: torch.Tensor, freqs: torch.Tensor, num_prefix: int, mscale: float = 1.0,
                 half: bool = False):
        self.xy, self.freqs, self.num_prefix, self.mscale, self.half = xy, freqs, num_prefix, mscale, half

    def __len__(self) -> int:
        return self.freqs.shape[1]

    def __getitem__(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=self.freqs.device.type, enabled=False):
            f = self.freqs[:, layer].float()  # (2, heads, d/2)
            # ([B,] heads, N, d/2): x F_x + y F_y, elementwise (no matmul downcast under autocast)
            xy = self.xy.unsqueeze(-3)  # ([B,] 1, N, 2)
            angles = xy[..., 0, None] * f[0].unsqueeze(-2) + xy[..., 1, None] * f[1].unsqueeze(-2)
            return rope_tables(angles, self.num_prefix, half=self.half, mscale=self.mscale)


# ------------------------------------------------------------------------------ test-time knob
ROPE_SCALING_MODES = ('none', 'pi', 'ntk', 'yarn')


def parse_rope_scaling(spec: str) -> str:
    """Check ``none`` | ``pi`` | ``ntk`` | ``yarn`` | ``pi:F`` | ``ntk:F`` | ``yarn:F``; returns ``spec``."""
    _rope_scaling(spec)
    return spec


def _rope_scaling(spec: str) -> tuple[str, float | None]:
    """``spec`` -> ``(mode, factor or None for per-resolution)``."""
    mode, _, value = str(spec).partition(':')
    if mode not in ROPE_SCALING_MODES or (mode == 'none' and value):
        raise ValueError(f"bad --rope-scaling {spec!r}: use none, pi, ntk, yarn (factor from the resolution) or "
                         f"pi:F / ntk:F / yarn:F (fixed factor, e.g. ntk:2)")
    if not value:
        return mode, None
    try:
        f = float(value)
    except ValueError:
        raise ValueError(f'bad --rope-scaling {spec!r}: {value!r} is not a number') from None
    if f <= 0:
        raise ValueError(f'bad --rope-scaling {spec!r}: the factor must be positive')
    return mode, f


def _set_rope_scaling(enc: 'RoPE2D', spec: str, ctx: KnobContext) -> None:
    """``pi``: positions times ``1 / s`` (Chen et al. 2023); ``ntk``: theta times ``s^(d'/(d'-2))`` (bloc97
    2023); ``yarn``: YaRN with scale ``s`` (Peng et al. 2024); ``s = max(1, test / train)`` (larger ratio of
    the two axes) unless fixed by ``:F``."""
    mode, factor = _rope_scaling(spec)
    if factor is None:
        (h, w), (th, tw) = ctx.size, ctx.train_size
        factor = max(1.0, h / th, w / tw)
    setattr(enc, {'pi': 'pos_scale', 'ntk': 'ntk_scale', 'yarn': 'yarn_scale'}[mode],
            1.0 / factor if mode == 'pi' else factor)


def _rope_accepts(enc: 'RoPE2D', spec: str) -> str | None:
    mode = _rope_scaling(spec)[0]
    if mode == 'ntk' and enc.rope_type != 'axial':
        return 'NTK scaling changes the axial frequencies; RoPE-Mixed learns its own'
    if mode == 'yarn' and enc.coord_mode == 'polar':
        return 'YaRN needs Cartesian coordinates'
    return None


#: RoPE frequency scaling at test time (position interpolation / NTK-aware / YaRN)
ROPE_SCALING = Knob(
    'rope_scaling', 'RoPE frequency scaling: none | pi | ntk | yarn (factor max(1, test/train) per resolution) | '
    'pi:F | ntk:F | yarn:F (fixed factor)', parse_rope_scaling, default='none', words=(), check=parse_rope_scaling,
    label=lambda s: f'rope={s}', rank=20, attrs=('pos_scale', 'ntk_scale', 'yarn_scale'), set=_set_rope_scaling,
    accepts=_rope_accepts, needs_train_size=lambda s: _rope_scaling(s)[0] != 'none' and _rope_scaling(s)[1] is None)


@register_encoding('rope2d')
class RoPE2D(PosEncoding):
    """Axial or mixed 2-D RoPE on q and k (see module docstring).

    Subclasses change the frequencies (:meth:`axial_magnitudes`), the coordinates (:meth:`grid_xy`),
    the channel order of the two axes (``axis_order``) and the pair layout (``rotate_half``).
    """
    hooks = frozenset({'rotate'})
    test_knobs = (COORD_MODE, ROPE_SCALING)
    coord_aug_support = 'sample'
    #: which axis the first d/4 pairs of an axial rotation follow: 'xy' (RoPE-ViT) or 'yx' (DINOv3)
    axis_order: str = 'xy'
    #: pair layout: interleaved ``(2j, 2j+1)`` (False) or rotate-half ``(j, j + d/2)`` (True)
    rotate_half: bool = False

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
            yarn_scale: float = 1.0,
            yarn_alpha: float = 1.0,
            yarn_beta: float = 32.0,
            yarn_mscale: Optional[float] = None,
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
        #: YaRN test-time knob (module docstring): s (1 = off), ramp bounds alpha < beta in turns over the
        #: training extent, and the q/k multiplier (None: 0.1 ln s + 1; 1.0 turns the temperature off)
        self.yarn_scale, self.yarn_alpha, self.yarn_beta = yarn_scale, yarn_alpha, yarn_beta
        self.yarn_mscale = yarn_mscale
        yarn_factors(torch.zeros(1), 1.0, yarn_alpha, yarn_beta)  # validates alpha < beta now
        if rope_type == 'mixed':
            self.freqs = nn.Parameter(init_random_2d_freqs(d, ctx.depth, ctx.num_heads, temperature=self.theta))
        else:
            self.freqs = None
        self._cache = GridCache()

    # ------------------------------------------------------------------ coordinates and frequencies
    def grid_xy(self, grid: Grid) -> torch.Tensor:
        """``(h * w, 2)`` token coordinates (x, y) before any test-time knob."""
        return grid_coords(grid.h, grid.w, self.coord_mode, ref_hw=self.ref_hw, polar_eps=self.polar_eps)

    def _coords(self, grid: Grid) -> torch.Tensor:
        xy = self.grid_xy(grid)
        if grid.aug is not None:  # coordinate augmentation of this training batch (visionpe.grid.CoordAug)
            if self.coord_mode == 'polar':
                raise ValueError("coordinate augmentation (shift / jitter / rescale) is defined on Cartesian "
                                 "coordinates, not coord_mode='polar'; turn coord_aug off for polar encodings")
            xy = grid.aug.apply(xy)
        return xy * self.pos_scale if self.pos_scale != 1.0 else xy

    def axial_magnitudes(self, theta: float) -> torch.Tensor:
        """Angle per coordinate unit of the ``d/4`` pairs of one axis: ``theta^(-4i/d)``."""
        return axial_frequencies(self.ctx.head_dim, theta)

    def train_extent(self) -> Tuple[float, float]:
        """``(W, H)``: the training grid's extent in coordinate units (``n`` times the coordinate step of an
        axis of ``n`` tokens: the columns and rows of ``ref_hw`` for index coordinates, 2 for centred ones)."""
        h, w = self.ref_hw
        xy = self.grid_xy(Grid(h, w))
        out = []
        for axis, n in ((0, w), (1, h)):
            span = float(xy[:, axis].max() - xy[:, axis].min())
            out.append(span * n / (n - 1) if n > 1 else 1.0)
        return out[0], out[1]

    def yarn_active(self) -> bool:
        return self.yarn_scale > 1.0

    def _check_yarn(self) -> None:
        if self.coord_mode == 'polar':
            raise ValueError("YaRN scaling needs Cartesian coordinates; coord_mode='polar' turns by angle and "
                             "log-radius (use pos_scale or ntk_scale, or another coordinate mode)")

    def mscale(self) -> float:
        """The factor on q and k (YaRN's temperature; 1 when YaRN is off)."""
        if not self.yarn_active():
            return 1.0
        return float(self.yarn_mscale) if self.yarn_mscale is not None else yarn_mscale(self.yarn_scale)

    def axial_frequencies_xy(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Frequencies ``(mag_x, mag_y)`` of an axial rotation after ``ntk_scale`` and ``yarn_scale``."""
        d = self.ctx.head_dim
        theta = self.theta
        if self.ntk_scale != 1.0:
            d_axis = d // 2
            theta = theta * self.ntk_scale ** (d_axis / (d_axis - 2))
        mag_x = self.axial_magnitudes(theta)
        if self.coord_mode == 'polar':
            mag_y = torch.arange(1, d // 4 + 1, dtype=torch.float32)  # integer: 2 pi periodic in the angle
        else:
            mag_y = mag_x
        if self.yarn_active():
            self._check_yarn()
            ext_w, ext_h = self.train_extent()
            s, a, b = self.yarn_scale, self.yarn_alpha, self.yarn_beta
            mag_x = mag_x * yarn_factors(mag_x.abs() * ext_w / (2 * math.pi), s, a, b)
            mag_y = mag_y * yarn_factors(mag_y.abs() * ext_h / (2 * math.pi), s, a, b)
        return mag_x, mag_y

    def mixed_frequencies(self) -> torch.Tensor:
        """RoPE-Mixed frequencies ``(2, depth, heads, d/2)`` after ``yarn_scale`` (by frequency magnitude)."""
        if not self.yarn_active():
            return self.freqs
        self._check_yarn()
        ext_w, ext_h = self.train_extent()
        with torch.no_grad():
            turns = (self.freqs[0].abs() * ext_w + self.freqs[1].abs() * ext_h) / (2 * math.pi)
            factor = yarn_factors(turns.float(), self.yarn_scale, self.yarn_alpha, self.yarn_beta)
        return self.freqs * factor.to(self.freqs.dtype)

    def _axial_angles(self, grid: Grid, xy: Optional[torch.Tensor] = None) -> torch.Tensor:
        mag_x, mag_y = self.axial_frequencies_xy()
        xy = self._coords(grid) if xy is None else xy
        cols = [xy[..., 0, None] * mag_x, xy[..., 1, None] * mag_y]
        if self.axis_order == 'yx':
            cols.reverse()
        return torch.cat(cols, dim=-1)  # ([B,] N, d/2)

    def _knob_key(self) -> tuple:
        return (self.coord_mode, self.ref_hw, self.pos_scale, self.ntk_scale, self.theta, self.yarn_scale,
                self.yarn_alpha, self.yarn_beta, self.yarn_mscale)

    def prepare(self, grid: Grid) -> Any:
        """Axial: the ``(sin, cos)`` tables ``(P + N, d)``, cached per grid. Mixed: a
        :class:`MixedRoPEState` that gives each layer its ``(heads, P + N, d)`` tables when asked."""
        if self.rope_type == 'axial':
            return self._cache.get((grid, *self._knob_key()), self.device, lambda: rope_tables(
                self._axial_angles(grid), grid.num_prefix, half=self.rotate_half, mscale=self.mscale()))
        if self.ntk_scale != 1.0:
            raise ValueError('ntk_scale raises the theta of axial RoPE; RoPE-Mixed learns its frequencies: use '
                             'pos_scale or yarn_scale')
        key = (grid, self.coord_mode, self.ref_hw, self.pos_scale, 'xy')
        xy = self._cache.get(key, self.freqs.device, lambda: self._coords(grid))
        return MixedRoPEState(xy, self.mixed_frequencies(), grid.num_prefix, mscale=self.mscale(),
                              half=self.rotate_half)

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
        return apply_rope_qk(q, k, sin, cos, self.rotate_half)

    def no_weight_decay(self) -> Set[str]:
        return {'freqs'} if self.freqs is not None else set()

    def extra_repr(self) -> str:
        return f'variant={self.rope_type}, theta={self.theta}, coord_mode={self.coord_mode}'
