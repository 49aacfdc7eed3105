"""Small helpers shared by the converters: regex renames and absolute-table resampling."""
from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
import torch.nn as nn

from ..pos.absolute import resample_table

StateDict = dict[str, torch.Tensor]

# DeiT-III / RoPE-ViT / EVA name their LayerScale parameters gamma_1, gamma_2
LAYERSCALE_RULES = ((r'^blocks\.(\d+)\.gamma_1$', r'blocks.\1.ls1.gamma'),
                    (r'^blocks\.(\d+)\.gamma_2$', r'blocks.\1.ls2.gamma'))


def rename(sd: StateDict, rules: Iterable[tuple[str, str]]) -> StateDict:
    """Apply ``(pattern, replacement)`` regex rules to every key (first matching rule wins)."""
    rules = [(re.compile(p), r) for p, r in rules]
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            if pat.search(k):
                k = pat.sub(rep, k)
                break
        out[k] = v
    return out


def infer_grid(num_patches: int, hint: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (rows, cols) of a flattened table: the hint when it fits, else the square root."""
    if hint is not None and hint[0] * hint[1] == num_patches:
        return tuple(hint)
    side = int(math.isqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f'cannot infer the grid of a position table with {num_patches} patch rows; '
                         f'it is not square and no grid size was given')
    return side, side


def fit_table(table: torch.Tensor, target: torch.Tensor, num_prefix: int, interpolation: str = 'bicubic',
              antialias: bool = True, target_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Resample a ``(1, P + h*w, D)`` table to the target's grid (only when sizes differ)."""
    if table.shape == target.shape:
        return table
    old = infer_grid(table.shape[1] - num_prefix)
    new = target_grid or infer_grid(target.shape[1] - num_prefix)
    return resample_table(table, new, old, num_prefix, interpolation, antialias)


def model_attr(model: nn.Module, name: str, default=None):
    return getattr(model, name, default)
