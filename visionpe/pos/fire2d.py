"""FIRE-2D: functional interpolation for relative positions (Li et al., "Functional Interpolation for Relative
Positions Improves Long Context Transformers", ICLR 2024), in 2-D as studied in "Analysing Extrapolation
Capabilities of Modern Positional Embeddings in ViTs"; no upstream 2-D code exists (docs/encodings.md, "FIRE-2D").

Every layer ``l`` adds to the logit of patches ``i`` and ``j``, per head ``h``:

    bias_lh(i, j) = f_l( psi_l(d_ij) / psi_l(max(|L_l|, D)) )_h,      psi_l(x) = log(|c_l| x + 1)

* ``d_ij = ||p_i - p_j||``: Euclidean distance of the two patches in ``coord_mode`` units (patches by default);
* ``D``: the largest distance in the current grid, ``||((w - 1) s_x, (h - 1) s_y)||`` (FIRE's progressive
  interpolation: the 1-D query position becomes the grid's extent, as attention here is not causal);
* ``c_l`` (init ``c_init`` = 0.1, FIRE's) and the threshold ``L_l`` (init: ``D`` of the training grid, so the
  MLP sees ``[0, 1]`` in training and any larger grid maps into the same range) are learned per layer;
* ``f_l``: an MLP ``1 -> mlp_hidden -> heads`` with ReLU (FIRE's, width 32), per layer.

The MLP input lies in ``[0, 1]`` at every grid size. Prefix tokens (class, registers; ``prefix_position``):
``'centre'`` (default) places them at the grid centre, so a pair of a prefix token and patch ``n`` gets
``f(u(||p_n - centre||))`` and two prefix tokens ``f(u(0))`` (as ComRoPE's presets rotate the class token at the
centre; without it the last layer's MLP could not reach a class-token output); ``'none'`` leaves their pairs
unbiased, as 2-D ALiBi does. The MLP runs on the ``h * w`` distinct offsets ``(|dy|, |dx|)`` of the grid (plus the
``1 + h * w`` prefix distances) and the bias is gathered from that table
(:class:`~visionpe.pos.alibi2d.DistanceBias`: whole, by query rows, or in the FlexAttention kernel), never
computed per ``N x N`` pair.

Coordinate augmentation (``coord_aug``, one draw per batch; :class:`~visionpe.pos.alibi2d.DistanceBias`): distances
are those of the augmented coordinates, steps ``(s_x j_x r, s_y j_y r)``, the prefix distances those from the
augmented grid's centre (a shift cancels in both). FIRE's progressive interpolation is read the natural way: ``D``
is the largest distance of the grid the layer sees, i.e. of the augmented grid, and ``L`` is unchanged. So the
augmentation is not a no-op after normalisation: while ``D < |L|`` the inputs scale with the draw (through the
log), and once ``D >= |L|`` the largest distance maps to 1 and only the spread of the inputs (per-axis jitter, the
log's curvature) changes.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import Mlp

from ..grid import Grid, grid_coords
from . import register_encoding
from .alibi2d import DistanceBias, axis_steps
from .base import EncodingContext

__all__ = ['FIRE2D', 'fire_inputs']


def fire_inputs(dist: torch.Tensor, c: torch.Tensor, threshold: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """``log(|c| d + 1) / log(|c| max(|L|, D) + 1)`` for distances ``dist`` and the grid's extent ``D``."""
    c = c.abs()
    return torch.log1p(c * dist) / torch.log1p(c * torch.maximum(threshold.abs(), extent))


@register_encoding('fire2d')
class FIRE2D(DistanceBias):
    """FIRE-2D distance bias with a small MLP per layer (see module docstring).

    Args:
        mlp_hidden: hidden width of each layer's MLP (FIRE: 32).
        c_init: initial ``c`` (FIRE: 0.1).
        threshold_init: initial ``L``; default the largest distance of the training grid (``ctx.grid_size``).
        prefix_position: ``'centre'`` (prefix tokens at the grid centre) or ``'none'`` (their pairs unbiased).
        coord_mode, ref_hw: coordinates (:mod:`visionpe.grid`, not ``polar``); ``index`` = patch units.
    """

    def __init__(self, ctx: EncodingContext, mlp_hidden: int = 32, c_init: float = 0.1,
                 threshold_init: Optional[float] = None, prefix_position: str = 'centre',
                 coord_mode: str = 'index', ref_hw: Optional[Tuple[int, int]] = None):
        super().__init__(ctx, coord_mode, ref_hw)
        if prefix_position not in ('centre', 'none'):
            raise ValueError(f"FIRE-2D prefix_position must be 'centre' or 'none', got {prefix_position!r}")
        self.prefix_position = prefix_position
        if mlp_hidden < 1:
            raise ValueError(f'FIRE-2D mlp_hidden must be a positive integer, got {mlp_hidden}')
        if not c_init > 0:
            raise ValueError(f'FIRE-2D c_init must be positive, got {c_init}')
        if threshold_init is None:
            h, w = ctx.grid_size
            sx, sy = axis_steps(h, w, coord_mode, self.ref_hw)
            threshold_init = math.hypot((w - 1) * sx, (h - 1) * sy)
        if not threshold_init > 0:
            raise ValueError(f'FIRE-2D threshold_init must be positive, got {threshold_init}')
        self.mlp_hidden = int(mlp_hidden)
        self.c = nn.Parameter(torch.full((ctx.depth,), float(c_init)))
        self.threshold = nn.Parameter(torch.full((ctx.depth,), float(threshold_init)))
        self.mlps = nn.ModuleList(Mlp(1, self.mlp_hidden, ctx.num_heads, act_layer=nn.ReLU)
                                  for _ in range(ctx.depth))

    def centre_distances(self, grid: Grid) -> torch.Tensor:
        """``(1 + h * w,)``: 0 (two prefix tokens), then every patch's distance from the grid centre."""
        def build():
            self.steps(grid)  # refuses a per-sample draw
            xy = grid_coords(grid.h, grid.w, self.coord_mode, ref_hw=self.ref_hw, aug=grid.aug)
            return torch.cat([xy.new_zeros(1), (xy - xy.mean(0)).square().sum(-1).sqrt()])
        key = ('centre', grid, self.coord_mode, self.ref_hw)
        return self._grid_cache.get(key, self.device, build)

    def inputs(self, grid: Grid, layer: int, prefix: bool = False) -> torch.Tensor:
        """MLP inputs (in [0, 1]) for ``layer``: of every distinct offset of ``grid`` ``(h * w,)``, or with
        ``prefix`` of the prefix pairs ``(1 + h * w,)``; the normaliser is the grid's largest distance either way."""
        dist = self.distances(grid)
        extent = dist.max()  # the largest distance in the grid (its diagonal)
        return fire_inputs(self.centre_distances(grid) if prefix else dist, self.c[layer], self.threshold[layer],
                           extent)

    def prepare(self, grid: Grid) -> Tuple[Grid, List[torch.Tensor], List[Optional[torch.Tensor]]]:
        """The grid, every layer's ``(heads, h * w)`` offset table and ``(heads, 1 + h * w)`` prefix table
        (small: computed per forward, as they learn)."""
        tables, prefix = [], []
        with torch.autocast(device_type=self.device.type, enabled=False):
            for layer in range(self.ctx.depth):
                u = self.inputs(grid, layer).float()
                if self.prefix_position == 'centre' and grid.num_prefix:
                    u_pre = self.inputs(grid, layer, prefix=True).float()
                    both = self.mlps[layer](torch.cat([u, u_pre])[:, None]).t()
                    tables.append(both[:, :u.shape[0]])
                    prefix.append(both[:, u.shape[0]:])
                else:
                    tables.append(self.mlps[layer](u[:, None]).t())
                    prefix.append(None)
        return grid, tables, prefix

    def table(self, state, layer: int) -> torch.Tensor:
        return state[1][layer]

    def prefix_table(self, state, layer: int) -> Optional[torch.Tensor]:
        return state[2][layer]

    def no_weight_decay(self):
        return {'c', 'threshold'}

    def extra_repr(self) -> str:
        return f'mlp_hidden={self.mlp_hidden}, prefix_position={self.prefix_position}, ' + super().extra_repr()
