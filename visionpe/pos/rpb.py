"""Window relative position bias: Swin's table and SwinV2's continuous (log-spaced) bias
(docs/encodings.md, "Swin").

Swin (Liu et al., ICCV 2021; microsoft/Swin-Transformer, timm ``swin_transformer``): per window of
``Mh x Mw`` tokens a learned table of ``(2Mh - 1)(2Mw - 1)`` rows and one column per head;
query ``i`` and key ``j`` at window offsets ``(dy, dx) = (y_i - y_j, x_i - x_j)`` read row
``(dy + Mh - 1)(2Mw - 1) + (dx + Mw - 1)``, and ``logit_ij += table[row, head]``.
At another window size the table is resampled: ``'bicubic'`` (``F.interpolate`` on the
``(2Mh - 1) x (2Mw - 1)`` offset grid, as Swin's own ``load_pretrained`` does) or ``'beit'``
(timm's ``resize_rel_pos_bias_table``: geometric-progression resampling, what timm's Swin
``set_input_size`` and checkpoint filter use).

SwinV2 (Liu et al., CVPR 2022): continuous position bias ``16 * sigmoid(MLP(c))`` with
``c = sign(t) * log2(1 + |t|) / log2(8)``, ``t = 8 * offset / (M_ref - 1)`` per axis, ``M_ref`` the
training window. Defined for any window, so it needs no resampling.

These are helpers of window attention (:mod:`visionpe.models.swin`): the tables live in the
attention modules under timm's key names (``relative_position_bias_table``, ``cpb_mlp``), so timm
checkpoints load one to one. They are not a :class:`~visionpe.pos.base.PosEncoding`, because the
interface's per-model table would change those key names.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ndgrid, resize_rel_pos_bias_table

__all__ = ['RPB_RESIZE_MODES', 'relative_position_index', 'bias_from_table', 'resize_rpb_table',
           'log_spaced_coords', 'make_cpb_mlp', 'continuous_bias']

RPB_RESIZE_MODES = ('bicubic', 'beit')


def relative_position_index(win_h: int, win_w: int, device=None) -> torch.Tensor:
    """``(N, N)`` table rows, ``N = win_h * win_w`` tokens in row-major order (long)."""
    coords = torch.stack(ndgrid(torch.arange(win_h, device=device), torch.arange(win_w, device=device))).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): (dy, dx)
    return (rel[0] + win_h - 1) * (2 * win_w - 1) + (rel[1] + win_w - 1)


def bias_from_table(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather a ``(rows, heads)`` table with an ``(N, N)`` index -> ``(heads, N, N)`` logit bias."""
    n = index.shape[0]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


def resize_rpb_table(
        table: torch.Tensor,
        new_window: Tuple[int, int],
        old_window: Tuple[int, int],
        mode: str = 'bicubic',
) -> torch.Tensor:
    """Resample a ``((2Mh-1)(2Mw-1), heads)`` table from ``old_window`` to ``new_window``."""
    new_window, old_window = tuple(new_window), tuple(old_window)
    if new_window == old_window:
        return table
    if mode not in RPB_RESIZE_MODES:
        raise ValueError(f"rpb_resize must be one of {', '.join(RPB_RESIZE_MODES)}; got {mode!r}")
    heads = table.shape[-1]
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if mode == 'beit':
        return resize_rel_pos_bias_table(table, new_window_size=new_window, new_bias_shape=(dst[0] * dst[1], heads),
                                         old_window_size=old_window)
    src = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    grid = table.float().t().reshape(1, heads, *src)
    out = F.interpolate(grid, size=dst, mode='bicubic', align_corners=False)
    return out.reshape(heads, -1).t().to(table.dtype)


def log_spaced_coords(window: Tuple[int, int], ref_window: Tuple[int, int]) -> torch.Tensor:
    """SwinV2's ``((2Mh-1) * (2Mw-1), 2)`` log-spaced offsets (dy, dx), normalised by the training window."""
    dy = torch.arange(-(window[0] - 1), window[0], dtype=torch.float32) / max(ref_window[0] - 1, 1)
    dx = torch.arange(-(window[1] - 1), window[1], dtype=torch.float32) / max(ref_window[1] - 1, 1)
    t = torch.stack(ndgrid(dy, dx), dim=-1).reshape(-1, 2) * 8
    return torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8)


def make_cpb_mlp(num_heads: int, hidden: int = 512) -> nn.Sequential:
    """SwinV2's bias MLP ``2 -> hidden -> heads`` (keys ``0.weight, 0.bias, 2.weight``)."""
    return nn.Sequential(nn.Linear(2, hidden, bias=True), nn.ReLU(inplace=True), nn.Linear(hidden, num_heads, bias=False))


def continuous_bias(mlp: nn.Module, coords: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``16 * sigmoid(mlp(coords))`` gathered to ``(heads, N, N)``."""
    return bias_from_table(16 * torch.sigmoid(mlp(coords)), index)
