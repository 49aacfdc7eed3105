"""ComRoPE: rotary position embedding with trainable commuting angle matrices (Yu et al., CVPR 2025,
"ComRoPE: Scalable and Robust Rotary Position Embedding Parameterized by Trainable Commuting Angle
Matrices"; reference code Longin-Yu/ComRoPE ``model.py``; SPECS.md section 8).

Per head, q and k of a token at position ``p = (p_0, p_1)`` are rotated by
``R(p) = blockdiag_j expm(p_0 A_0j + p_1 A_1j)``: ``b x b`` blocks, block ``j`` acting on channels
``[j b, (j + 1) b)`` of the head, skew-symmetric generators ``A_ij``. Then
``q_s^T R(p_s)^T R(p_t) k_t = q_s^T R(p_t - p_s) k_t`` whenever the generators of a block commute.

``comrope_type``:

``ap``       axis-partitioned: block ``j`` is driven by axis ``j mod 2`` only (round robin), generator
             ``P_j - P_j^T`` with ``P ~ N(0, init_std^2)`` per (layer, head, block).
``ld``       linearly dependent: ``A_ij = m_ij (P_j - P_j^T)``, ``P`` per (layer, head, block),
             scalars ``m ~ N(0, 1)`` per (layer, axis, block), shared by all heads.
``liere``    the code base's LieRE baseline: ``A_ij = (P_ij - P_ij^T) / scale_factor``, independent per
             axis, so the generators do not commute and the encoding is not purely relative.
``vanilla``  the code base's fixed RoPE: ``b = 2``, the first ``d/4`` pairs follow axis 0 with angles
             ``theta_base^k p_0``, the rest axis 1 (``theta_base`` upstream default 1e-100 gives the
             frequencies ``[1, 0, 0, ...]``: one rotating pair per axis; kept for parity).

Positions: axis 0 is the ROW and axis 1 the column (upstream order), from
:func:`visionpe.grid.grid_coords` in ``coord_mode`` (default ``normalized``: ``(i + 0.5) / G``, ComRoPE's
convention; ``normalized_ref`` is upstream's "train-relative" variant). Prefix tokens sit at
``prefix_pos`` (row, col) and are rotated like patches: default ``(0.5, 0.5)``, the image centre in
normalised units, as upstream (it stays there in every mode); ``'center'`` is the centre of the current
grid in the chosen mode; ``None`` leaves prefix tokens unrotated.

Efficiency (never a dense ``(d x d)`` matrix): every layer computes its ``(heads, L, d/b, b, b)`` blocks
once per forward, in its ``rotate`` call (q and k share them; so eval holds one layer's blocks at a time),
and applies them block-wise. When the generators commute, ``R(p) = expm(p_0 A_0) expm(p_1 A_1)``, so
``torch.linalg.matrix_exp`` runs only on the distinct values of each axis (``h + w`` instead of ``h w``
per grid, found once per grid): AP and vanilla gather the blocks per token, LD multiplies the two
per-axis factors per token. Arbitrary positions (or LieRE) take one matrix_exp per token.

Optional absolute embedding ``ape`` (upstream ``keep_ape=False``, its default): a learned
``(1, h_train, w_train, C)`` table sampled at each token's normalised position with
``grid_sample(align_corners=True, padding_mode='border')``. ``'bilinear'`` samples at (row, col);
``'rowonly'`` reproduces upstream's axis-order bug (its 5-D ``grid_sample`` puts the column on the
size-1 frame axis: every token reads the middle column of its row), needed for its checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..grid import Grid, GridCache, check_coord_mode, grid_coords
from . import register_encoding
from .base import EncodingContext, PosEncoding

__all__ = ['ComRoPE', 'COMROPE_TYPES', 'ComRoPEState', 'apply_blocks']

COMROPE_TYPES = ('ap', 'ld', 'liere', 'vanilla')
APE_TYPES = ('bilinear', 'rowonly')
PrefixPos = Union[None, str, Tuple[float, float]]


@dataclass(frozen=True)
class ComRoPEState:
    """Positions of one forward pass.

    ``pos``: ``(L', 2)`` (row, col) of the rotated tokens; ``num_identity``: leading tokens left unrotated
    (prefix tokens with ``prefix_pos=None``); ``axes``: per axis ``(values (U,), index (L',))`` with
    ``pos[:, a] == values[index]``, or None when the per-axis factorisation would not save work.
    """
    pos: torch.Tensor
    num_identity: int = 0
    axes: Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]] = None


def apply_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x`` (B, H, L, d) times block-diagonal ``blocks`` (H or 1, L, d/b, b, b), block by block:
    ``y[.., j b + i] = sum_k blocks[.., j, i, k] x[.., j b + k]``. One einsum (a batched matmul), not a
    broadcast product and sum, which builds a ``(B, H, L, d, b)`` temporary and was 3x slower on CPU."""
    B, H, L, d = x.shape
    t, b = blocks.shape[-3], blocks.shape[-1]
    return torch.einsum('hltik,bhltk->bhlti', blocks, x.reshape(B, H, L, t, b)).reshape(B, H, L, d)


def _factorise(pos: torch.Tensor) -> Optional[Tuple[Tuple[torch.Tensor, torch.Tensor], ...]]:
    axes = tuple(torch.unique(pos[:, a], return_inverse=True) for a in range(pos.shape[1]))
    if sum(v.numel() for v, _ in axes) >= pos.shape[0]:
        return None  # scattered positions: one matrix_exp per token is cheaper
    return axes


@register_encoding('comrope')
class ComRoPE(PosEncoding):
    """ComRoPE-AP / -LD (and the code base's LieRE / vanilla RoPE baselines) on q and k."""
    hooks = frozenset({'rotate', 'tokens'})

    def __init__(
            self,
            ctx: EncodingContext,
            comrope_type: str = 'ap',
            block_size: Optional[int] = None,
            init_std: float = 1.0,
            coord_mode: str = 'normalized',
            ref_hw: Optional[Tuple[int, int]] = None,
            polar_eps: float = 1.0,
            prefix_pos: PrefixPos = (0.5, 0.5),
            theta_base: float = 1e-100,
            scale_factor: float = 1.0,
            ape: Optional[str] = None,
    ):
        super().__init__(ctx)
        if comrope_type not in COMROPE_TYPES:
            raise ValueError(f"comrope_type must be one of {', '.join(COMROPE_TYPES)}; got {comrope_type!r}")
        d, heads, depth = ctx.head_dim, ctx.num_heads, ctx.depth
        b = block_size if block_size is not None else (2 if comrope_type == 'vanilla' else 4)
        if not isinstance(b, int) or b < 1:
            raise ValueError(f'block_size must be a positive integer, got {block_size!r}')
        if comrope_type == 'vanilla' and b != 2:
            raise ValueError(f"comrope_type='vanilla' rotates channel pairs: block_size must be 2, got {b}")
        if comrope_type in ('ap', 'vanilla') and (d % (2 * b)):
            raise ValueError(f'ComRoPE-{comrope_type.upper()} splits the head dim {d} between 2 axes in blocks '
                             f'of {b}: block_size must divide head_dim / 2 = {d / 2:g}')
        if d % b:
            raise ValueError(f'block_size {b} must divide the head dim {d} (embed_dim / num_heads)')
        if not init_std > 0:
            raise ValueError(f'init_std must be positive, got {init_std}')
        if not scale_factor > 0 or not init_std * scale_factor < 1e30:
            raise ValueError(f'scale_factor must be positive with init_std * scale_factor < 1e30 (float32 '
                             f'parameters), got {scale_factor}: the upstream default 1e100 overflows to inf; '
                             f'use 1.0 (the same initial generators, a different effective learning rate)')
        self.comrope_type = comrope_type
        self.block_size = b
        self.num_blocks = d // b
        self.init_std = float(init_std)
        self.coord_mode = check_coord_mode(coord_mode)
        self.ref_hw = tuple(ref_hw) if ref_hw is not None else tuple(ctx.grid_size)
        self.polar_eps = polar_eps
        self.prefix_pos = self._check_prefix_pos(prefix_pos)
        self.theta_base = float(theta_base)
        self.scale_factor = float(scale_factor)

        t = self.num_blocks
        self.multiplier = None
        if comrope_type in ('ap', 'ld'):
            self.freqs = nn.Parameter(torch.randn(depth, heads, t, b, b) * self.init_std)
            if comrope_type == 'ld':
                self.multiplier = nn.Parameter(torch.randn(depth, 2, t))
        elif comrope_type == 'liere':
            # upstream: P ~ N(0, (init_std * scale_factor)^2), generator (P - P^T) / scale_factor
            self.freqs = nn.Parameter(torch.randn(depth, heads, 2, t, b, b) * (self.init_std * self.scale_factor))
        else:
            self.freqs = None

        if ape is not None and ape not in APE_TYPES:
            raise ValueError(f"ape must be None, 'bilinear' or 'rowonly'; got {ape!r}")
        if ape is not None and self.coord_mode not in ('normalized', 'normalized_ref'):
            raise ValueError(f"ape={ape!r} samples its table at normalised positions: it needs coord_mode "
                             f"'normalized' or 'normalized_ref', not {self.coord_mode!r}")
        self.ape = ape
        if ape is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, *self.ref_hw, ctx.dim))
            trunc_normal_(self.pos_embed, std=.02)
        else:
            self.pos_embed = None
            self.hooks = frozenset({'rotate'})
        self._cache = GridCache()

    @staticmethod
    def _check_prefix_pos(prefix_pos: PrefixPos) -> PrefixPos:
        if prefix_pos is None or prefix_pos == 'center':
            return prefix_pos
        try:
            r, c = (float(v) for v in prefix_pos)
        except (TypeError, ValueError):
            raise ValueError(f"prefix_pos must be None, 'center' or a (row, col) pair of numbers; "
                             f"got {prefix_pos!r}") from None
        return r, c

    # ------------------------------------------------------------------ positions
    def positions(self, grid: Grid) -> torch.Tensor:
        """(row, col) of the rotated tokens: prefix tokens first unless ``prefix_pos`` is None."""
        xy = grid_coords(grid.h, grid.w, self.coord_mode, ref_hw=self.ref_hw, polar_eps=self.polar_eps)
        rc = xy.flip(-1)  # grid_coords gives (x, y); ComRoPE's axis 0 is the row
        if not grid.num_prefix or self.prefix_pos is None:
            return rc
        if self.prefix_pos == 'center':
            centre = rc.mean(0, keepdim=True)
        else:
            centre = torch.tensor([self.prefix_pos], dtype=rc.dtype)
        return torch.cat([centre.expand(grid.num_prefix, 2), rc], dim=0)

    def state_for_positions(self, pos: torch.Tensor, num_identity: int = 0) -> ComRoPEState:
        """State for explicit (row, col) positions ``pos`` (L', 2) after ``num_identity`` unrotated tokens."""
        if pos.dim() != 2 or pos.shape[1] != 2:
            raise ValueError(f'positions must have shape (tokens, 2) as (row, col); got {tuple(pos.shape)}')
        pos = pos.to(self.device, torch.float32)
        return ComRoPEState(pos, num_identity, _factorise(pos) if self.comrope_type != 'liere' else None)

    def prepare(self, grid: Grid) -> ComRoPEState:
        key = (grid, self.coord_mode, self.ref_hw, self.polar_eps, self.prefix_pos)
        num_identity = grid.num_prefix if self.prefix_pos is None else 0
        return self._cache.get(key, self.device,
                               lambda: self.state_for_positions(self.positions(grid), num_identity))

    # ------------------------------------------------------------------ generators and rotations
    def _skew(self, layer: int) -> Optional[torch.Tensor]:
        if self.freqs is None:
            return None
        p = self.freqs[layer].float()
        return p - p.transpose(-1, -2)

    def _vanilla_freqs(self, device: torch.device) -> torch.Tensor:
        n = self.num_blocks // 2
        return (self.theta_base ** torch.arange(n)).to(device)  # float32, as upstream

    def generators(self, layer: int) -> torch.Tensor:
        """Per-axis block generators ``A`` (heads or 1, 2, d/b, b, b), upstream's ``get_exponent_matrix()``."""
        t = self.num_blocks
        if self.comrope_type == 'vanilla':
            j = torch.tensor([[0., -1.], [1., 0.]], device=self.device)
            f = self._vanilla_freqs(self.device)
            a = torch.zeros(1, 2, t, 2, 2, device=self.device)
            a[0, 0, :t // 2] = f[:, None, None] * j
            a[0, 1, t // 2:] = f[:, None, None] * j
            return a
        s = self._skew(layer)
        if self.comrope_type == 'liere':
            return s / self.scale_factor
        if self.comrope_type == 'ld':
            return s.unsqueeze(1) * self.multiplier[layer].float()[None, :, :, None, None]
        mask = torch.zeros(2, t, 1, 1, device=s.device)
        mask[0, 0::2] = 1.
        mask[1, 1::2] = 1.
        return s.unsqueeze(1) * mask

    def _axis_exp(self, values: torch.Tensor, index: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
        """``expm(p gen)`` for the distinct values of one axis, gathered per token: (H, L', t, b, b)."""
        e = torch.linalg.matrix_exp(values.view(1, -1, 1, 1, 1) * gen.unsqueeze(1))
        return e.index_select(1, index)

    def rotation_blocks(self, layer: int, state: ComRoPEState) -> torch.Tensor:
        """Diagonal blocks of ``R`` for every token, float32: (heads or 1, L, d/b, b, b)."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            pos = state.pos
            if state.axes is not None and self.comrope_type in ('ap', 'vanilla'):  # each block follows one axis
                gen = self.generators(layer)
                t = self.num_blocks
                # AP: round robin (blocks 0, 2, .. follow axis 0); vanilla: first half axis 0
                blocks = [slice(0, t, 2), slice(1, t, 2)] if self.comrope_type == 'ap' else \
                    [slice(0, t // 2), slice(t // 2, t)]
                e = [self._axis_exp(v, i, gen[:, a, blocks[a]]) for a, (v, i) in enumerate(state.axes)]
                if self.comrope_type == 'ap':
                    h, n, half, b, _ = e[0].shape
                    r = torch.stack(e, dim=3).reshape(h, n, 2 * half, b, b)
                else:
                    r = torch.cat(e, dim=2)
            elif state.axes is not None and self.comrope_type == 'ld':  # commuting: expm(a + b) = expm(a) expm(b)
                gen = self.generators(layer)
                (v0, i0), (v1, i1) = state.axes
                r = self._axis_exp(v0, i0, gen[:, 0]) @ self._axis_exp(v1, i1, gen[:, 1])
            else:
                gen = self.generators(layer)  # (H, 2, t, b, b)
                log_r = pos[None, :, 0, None, None, None] * gen[:, None, 0] \
                    + pos[None, :, 1, None, None, None] * gen[:, None, 1]
                r = torch.linalg.matrix_exp(log_r)
            if state.num_identity:
                eye = torch.eye(self.block_size, device=r.device, dtype=r.dtype)
                eye = eye.expand(r.shape[0], state.num_identity, r.shape[2], -1, -1)
                r = torch.cat([eye, r], dim=1)
        return r

    def rotate(self, q: torch.Tensor, k: torch.Tensor, layer: int, state: ComRoPEState
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        r = self.rotation_blocks(layer, state)
        if r.shape[1] != q.shape[2]:
            raise ValueError(f'ComRoPE has positions for {r.shape[1]} tokens but attention got {q.shape[2]}')
        r = r.to(q.dtype)
        return apply_blocks(q, r), apply_blocks(k, r)

    # ------------------------------------------------------------------ optional absolute table
    def ape_table(self, state: ComRoPEState) -> torch.Tensor:
        """The absolute embedding of every positioned token, (L', C), sampled as upstream does."""
        pos = state.pos
        col = torch.zeros_like(pos[:, 1]) if self.ape == 'rowonly' else pos[:, 1] * 2 - 1
        loc = torch.stack([col, pos[:, 0] * 2 - 1], dim=-1).to(self.pos_embed.dtype)  # grid_sample: (x, y)
        table = self.pos_embed[0].permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w)
        out = F.grid_sample(table, loc.view(1, 1, -1, 2), mode='bilinear', padding_mode='border',
                            align_corners=True)
        return out[0, :, 0].t()

    def embed(self, x: torch.Tensor, grid: Grid, state: ComRoPEState) -> torch.Tensor:
        if self.pos_embed is None:
            return x
        n = state.num_identity
        ape = self.ape_table(state).to(x.dtype)
        if n:
            return torch.cat([x[:, :n], x[:, n:] + ape], dim=1)
        return x + ape

    def no_weight_decay(self) -> Set[str]:
        return {n for n in ('freqs', 'multiplier', 'pos_embed') if getattr(self, n) is not None}

    def extra_repr(self) -> str:
        return (f'type={self.comrope_type}, block_size={self.block_size}, coord_mode={self.coord_mode}, '
                f'prefix_pos={self.prefix_pos}' + (f', ape={self.ape}' if self.ape else ''))
