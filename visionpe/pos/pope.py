"""PoPE-2D: polar coordinate position embedding (Gopalakrishnan, Csordas, Schmidhuber, Mozer,
"Decoupling the What and Where With Polar Coordinate Positional Embeddings", arXiv 2509.10534),
axial 2-D form as in the unofficial lucidrains PoPE-pytorch ``AxialPoPE`` (docs/encodings.md,
"PoPE").

Every channel ``c`` of a head (dim ``d``) is one complex number: magnitude ``softplus(x_c)`` (content)
and phase ``phi_c`` (position). Channels ``c < d/2`` follow the column ``x``, the rest the row ``y``, each
half with the frequencies ``theta^(-k / (d/2))``, ``k = 0 .. d/2 - 1`` (one frequency per channel, not per
pair). Keys add a learnable phase ``delta`` (parameter ``delta``, the reference's ``bias``; per layer, head
and channel), clamped to ``[-2 pi, 0]``:

    logit(s, t) = sum_c softplus(q_sc) softplus(k_tc) cos(phi_sc - phi_tc - delta_c)

which is the dot product of the real ``2d``-channel vectors ``q~ = [mu_q cos phi | mu_q sin phi]`` and
``k~ = [mu_k cos(phi + delta) | mu_k sin(phi + delta)]`` (the d cosine channels, then the d sine channels;
the reference interleaves them, which changes no logit: these contiguous halves make the products 3-4x
faster than writing pairs). The
``rotate`` hook returns these (real cos/sin only, no complex dtypes), so every attention backend computes
the logits; the softmax scale stays ``d^-0.5`` of the ORIGINAL head dim (the Attention module computes
its scale from ``head_dim`` before any hook runs).

Prefix (unpositioned) tokens: any pair involving one uses the plain ``q . k`` of the raw vectors
(reference, "mixed positions"). Without an ``N x N`` bias this is one more widening, ``P`` prefix tokens:

    positioned query s:  [q~_s,  u_s,  0  ]     u_s[c] = q_s . k_c   (c prefix)
    prefix query c:      [0,     0,    e_c]
    positioned key t:    [k~_t,  0,    w_t]     w_t[c] = q_c . k_t   (c prefix, t any)
    prefix key c':       [0,     e_c', w_c']

(``e_c`` one-hot). Then query . key is the PoPE logit for two positioned tokens, ``u_s[c'] = q_s . k_c'``
for a prefix key, and ``w_t[c] = q_c . k_t`` for a prefix query: the required logit for every pair, at
width ``2d + 2P`` (padded to a multiple of 8 for the fused CUDA kernels, to an even width on CPU) and
``O(N P d)`` extra work.

Positions: :func:`visionpe.grid.grid_coords` in ``coord_mode`` (default ``index``: integer patch units,
as the reference). ``delta_init``: ``'zeros'`` (the reference's default) or ``'uniform'`` in ``[-2 pi, 0]``
(its ``bias_uniform_init``).

Gradient of the clamp: ``torch.clamp`` has zero gradient ON its bounds, so the reference's zero-initialised
offsets (all on the upper bound) never receive a gradient. Here the forward value is the same clamp, but
the backward is that of projected gradient descent (:func:`clamp_projected`): the gradient passes inside
the range, and on or beyond a bound whenever a descent step moves the parameter back into the range.
"""
from __future__ import annotations

import math
from typing import Optional, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..grid import Grid, GridCache, check_coord_mode, grid_coords
from . import register_encoding
from .base import COORD_MODE, EncodingContext, PosEncoding

__all__ = ['PoPE2D', 'pope_frequencies', 'pope_phases', 'widen_for_prefix', 'clamp_projected']

PoPEState = Tuple[torch.Tensor, int]  # (cos, sin) of the phases stacked last (N, d, 2); number of prefix tokens


def _halves(cs: torch.Tensor) -> torch.Tensor:
    """(..., d, 2) interleaved (cos, sin) -> (..., 2, d): the cosines, then the sines (a contiguous copy)."""
    return cs.transpose(-1, -2).contiguous()


class _ProjectedClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, = ctx.saved_tensors
        inward = ((x > ctx.lo) & (x < ctx.hi)) | ((x >= ctx.hi) & (grad > 0)) | ((x <= ctx.lo) & (grad < 0))
        return grad * inward, None, None


def clamp_projected(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``x.clamp(lo, hi)`` whose gradient also passes on / beyond a bound when descent moves ``x`` inward."""
    return _ProjectedClamp.apply(x, lo, hi)


def pope_frequencies(axis_dim: int, theta: float) -> torch.Tensor:
    """``theta^(-k / axis_dim)`` for ``k < axis_dim`` (float32, as PoPE-pytorch)."""
    return theta ** -(torch.arange(axis_dim).float() / axis_dim)


def pope_phases(xy: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Phases (N, d) of positions ``xy`` (N, 2) = (x, y): first half ``x f``, second half ``y f``."""
    f = pope_frequencies(head_dim // 2, theta).to(xy.device)
    return torch.cat([xy[:, 0, None] * f, xy[:, 1, None] * f], dim=-1)


def wide_width(w2: int, num_prefix: int, device: torch.device) -> int:
    """Width of the widened q, k: ``2d + 2P``, padded to a multiple of 8 for the fused CUDA kernels
    (on CPU to an even number only: SDPA's CPU kernel takes any width, and 8 costs up to 6 more columns)."""
    multiple = 2 if device.type == 'cpu' else 8
    return -(-(w2 + 2 * num_prefix) // multiple) * multiple


def wide_buffers(q: torch.Tensor, k: torch.Tensor, w2: int, num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Wide q, k (B, H, P + N, width) holding every column but the positioned tokens' first ``w2``,
    which the caller writes: prefix terms ``u``, ``w``, the one-hots and zeros (module docstring)."""
    B, H, L, _ = q.shape
    P = num_prefix
    width = wide_width(w2, P, q.device)
    eye = torch.eye(P, dtype=q.dtype, device=q.device)
    q_wide, k_wide = q.new_empty(B, H, L, width), k.new_empty(B, H, L, width)
    q_wide[:, :, :P].zero_()
    q_wide[:, :, :P, w2 + P:w2 + 2 * P] = eye
    q_wide[:, :, P:, w2:w2 + P] = q[:, :, P:] @ k[:, :, :P].transpose(-1, -2)  # u: . prefix keys
    q_wide[:, :, P:, w2 + P:].zero_()
    k_wide[:, :, :P, :w2].zero_()
    k_wide[:, :, :P, w2:w2 + P] = eye
    k_wide[:, :, P:, w2:w2 + P].zero_()
    k_wide[:, :, :, w2 + P:w2 + 2 * P] = k @ q[:, :, :P].transpose(-1, -2)  # w: . prefix queries
    k_wide[:, :, :, w2 + 2 * P:].zero_()
    return q_wide, k_wide


def widen_for_prefix(q: torch.Tensor, k: torch.Tensor, q_pope: torch.Tensor, k_pope: torch.Tensor,
                     num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Wide q, k whose dot product is PoPE between positioned tokens and ``q . k`` otherwise.

    ``q``, ``k``: raw (B, H, P + N, d); ``q_pope``, ``k_pope``: (B, H, N, 2d) of the positioned tokens.
    See the module docstring for the construction.
    """
    P, w2 = num_prefix, q_pope.shape[-1]
    q_wide, k_wide = wide_buffers(q, k, w2, P)
    q_wide[:, :, P:, :w2] = q_pope
    k_wide[:, :, P:, :w2] = k_pope
    return q_wide, k_wide


def _mul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[...] = a * b`` without a temporary when no gradient is recorded (``out=`` has no autograd)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        out.copy_(a * b)
    else:
        torch.mul(a, b, out=out)


@register_encoding('pope2d')
class PoPE2D(PosEncoding):
    """Axial 2-D PoPE on q and k (see module docstring)."""
    hooks = frozenset({'rotate'})
    test_knobs = (COORD_MODE,)
    coord_aug_support = 'batch'
    keeps_head_dim = False  # q~, k~ are (B, H, N, 2d)

    def __init__(
            self,
            ctx: EncodingContext,
            theta: float = 10000.,
            coord_mode: str = 'index',
            ref_hw: Optional[Tuple[int, int]] = None,
            polar_eps: float = 1.0,
            delta_init: str = 'zeros',
    ):
        super().__init__(ctx)
        d = ctx.head_dim
        if d % 2:
            raise ValueError(f'PoPE-2D splits the head dim between x and y: it must be even, got {d}')
        if not theta > 0:
            raise ValueError(f'theta must be positive, got {theta}')
        if delta_init not in ('zeros', 'uniform'):
            raise ValueError(f"delta_init must be 'zeros' or 'uniform'; got {delta_init!r}")
        self.theta = float(theta)
        self.coord_mode = check_coord_mode(coord_mode)
        self.ref_hw = tuple(ref_hw) if ref_hw is not None else tuple(ctx.grid_size)
        self.polar_eps = polar_eps
        self.delta_init = delta_init
        self.delta = nn.Parameter(torch.zeros(ctx.depth, ctx.num_heads, d))
        if delta_init == 'uniform':
            nn.init.uniform_(self.delta, -2 * math.pi, 0.)
        self._cache = GridCache()

    def phases(self, grid: Grid) -> torch.Tensor:
        xy = grid_coords(grid.h, grid.w, self.coord_mode, ref_hw=self.ref_hw, polar_eps=self.polar_eps, aug=grid.aug)
        return pope_phases(xy, self.ctx.head_dim, self.theta)

    def state_for_phases(self, phases: torch.Tensor, num_prefix: int = 0) -> PoPEState:
        phases = phases.to(self.device, torch.float32)
        return torch.stack([phases.cos(), phases.sin()], dim=-1), num_prefix

    def prepare(self, grid: Grid) -> PoPEState:
        key = (grid, self.coord_mode, self.ref_hw, self.polar_eps, self.theta)
        return self._cache.get(key, self.device, lambda: self.state_for_phases(self.phases(grid), grid.num_prefix))

    def clamped_delta(self, layer: int) -> torch.Tensor:
        """The key phase offset actually used, (heads, d)."""
        return clamp_projected(self.delta[layer], -2 * math.pi, 0.)

    def polar_qk(self, q: torch.Tensor, k: torch.Tensor, layer: int, state: PoPEState,
                 out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q~, k~`` (B, H, N, 2d) of the positioned tokens ``q, k`` (B, H, N, d), cosine half then sine half;
        written into ``out`` (two (B, H, N, 2d) views, e.g. of the widened tensors) when given."""
        cs, _ = state
        with torch.autocast(device_type=self.device.type, enabled=False):
            delta = self.clamped_delta(layer).float().unsqueeze(1)  # (H, 1, d)
            # (cos, sin) of phi + delta, (H, N, d, 2): one complex product e^{i phi} e^{i delta} (a single
            # pass; four real products, two sums and a stack measured about 4x the time)
            cs_k = torch.view_as_real(torch.view_as_complex(cs) * torch.polar(torch.ones_like(delta), delta))
        dt = q.dtype
        if out is None:
            out = (q.new_empty(*q.shape[:-1], 2 * q.shape[-1]), k.new_empty(*k.shape[:-1], 2 * k.shape[-1]))
        for x, c, o in ((q, cs, out[0]), (k, cs_k, out[1])):
            _mul_into(o.unflatten(-1, (2, -1)), F.softplus(x).unsqueeze(-2), _halves(c.to(dt)))
        return out

    def rotate(self, q: torch.Tensor, k: torch.Tensor, layer: int, state: PoPEState
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        cs, p = state
        if q.shape[2] != p + cs.shape[0]:
            raise ValueError(f'PoPE has phases for {p} + {cs.shape[0]} tokens but attention got {q.shape[2]}')
        if not p:
            return self.polar_qk(q, k, layer, state)
        w2 = 2 * q.shape[-1]
        q_wide, k_wide = wide_buffers(q, k, w2, p)  # the positioned tokens' PoPE columns written in place:
        self.polar_qk(q[:, :, p:], k[:, :, p:], layer, state, out=(q_wide[:, :, p:, :w2], k_wide[:, :, p:, :w2]))
        return q_wide, k_wide

    def no_weight_decay(self) -> Set[str]:
        return {'delta'}

    def extra_repr(self) -> str:
        return f'theta={self.theta:g}, coord_mode={self.coord_mode}, delta_init={self.delta_init}'
