"""Token coordinates: the one place that says where every token sits.

A forward pass sees ``num_prefix`` prefix tokens (class, registers) followed by an ``h x w``
grid of patch tokens in row-major order: patch token ``k`` sits at column ``x = k mod w`` and
row ``y = k div w`` (docs/encodings.md, "Coordinates"). Every encoding asks :func:`grid_coords` for
positions, in one of these modes:

``index``       integer patch units, origin top-left: ``(x, y)``. A larger image gives larger
                coordinates (extrapolation).
``normalized``  ``((x + 0.5) / w, (y + 0.5) / h)`` in (0, 1) (ComRoPE's convention). A larger
                image gives denser coordinates (interpolation).
``centered``    ``normalized`` mapped to (-1, 1) (timm pixel / DINOv3 style).
``ref``         index coordinates times ``ref_w / w`` and ``ref_h / h``: rescaled to the
                reference (training) grid, EVA-02 style.
``normalized_ref`` ``((x + 0.5) / ref_w, (y + 0.5) / ref_h)``: normalised by the reference
                (training) grid, so a larger image extends past 1 (ComRoPE's "train-relative"
                positions: extrapolation in normalised units).
``polar``       ``(log(r + eps), theta)`` about the grid centre, ``r`` in patch units and
                ``theta = atan2(y - cy, x - cx)`` in (-pi, pi]. A uniform rescale of the image
                is a shift along log r, a rotation about the centre a shift along theta.

Column 0 of the result is always the first axis (x, or log r in polar mode), column 1 the
second (y, or theta).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, Hashable, Literal, Optional, Tuple

import torch

__all__ = ['COORD_MODES', 'CoordMode', 'Grid', 'GridCache', 'grid_coords', 'check_coord_mode']

CoordMode = Literal['index', 'normalized', 'centered', 'ref', 'normalized_ref', 'polar']
COORD_MODES: Tuple[str, ...] = ('index', 'normalized', 'centered', 'ref', 'normalized_ref', 'polar')


@dataclass(frozen=True)
class Grid:
    """Layout of the token sequence of one forward pass: prefix tokens, then ``h x w`` patches."""
    h: int
    w: int
    num_prefix: int = 0

    @property
    def hw(self) -> Tuple[int, int]:
        return self.h, self.w

    @property
    def num_patches(self) -> int:
        return self.h * self.w

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.h * self.w


def check_coord_mode(mode: str) -> str:
    if mode not in COORD_MODES:
        raise ValueError(f"unknown coordinate mode {mode!r}; choose one of {', '.join(COORD_MODES)}")
    return mode


@lru_cache(maxsize=128)
def _coords_cpu(
        h: int,
        w: int,
        mode: str,
        ref_hw: Optional[Tuple[int, int]],
        polar_eps: float,
        inference: bool,
) -> torch.Tensor:
    # ``inference`` only keys the cache: tensors made under torch.inference_mode must not reach autograd
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing='ij')
    x, y = xs.reshape(-1), ys.reshape(-1)
    if mode == 'index':
        pass
    elif mode == 'normalized':
        x, y = (x + 0.5) / w, (y + 0.5) / h
    elif mode == 'centered':
        x, y = 2 * (x + 0.5) / w - 1, 2 * (y + 0.5) / h - 1
    elif mode in ('ref', 'normalized_ref'):
        if ref_hw is None:
            raise ValueError(f"coordinate mode {mode!r} needs the reference grid (ref_hw=(rows, cols))")
        if mode == 'ref':
            x, y = x * (ref_hw[1] / w), y * (ref_hw[0] / h)
        else:
            x, y = (x + 0.5) / ref_hw[1], (y + 0.5) / ref_hw[0]
    elif mode == 'polar':
        dx, dy = x - (w - 1) / 2, y - (h - 1) / 2
        r = torch.sqrt(dx * dx + dy * dy)
        x, y = torch.log(r + polar_eps), torch.atan2(dy, dx)
    else:
        check_coord_mode(mode)
    out = torch.stack([x, y], dim=-1)
    out.requires_grad_(False)
    return out


def grid_coords(
        h: int,
        w: int,
        mode: str = 'index',
        ref_hw: Optional[Tuple[int, int]] = None,
        polar_eps: float = 1.0,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Coordinates of the ``h * w`` patch tokens, shape ``(h * w, 2)``, row-major token order.

    The result is cached per arguments; treat it as read-only. ``polar_eps`` keeps ``log r``
    finite at the centre (``r`` is in patch units, so the default 1 maps the centre to 0).
    """
    check_coord_mode(mode)
    ref = tuple(int(v) for v in ref_hw) if ref_hw is not None else None
    out = _coords_cpu(int(h), int(w), mode, ref, float(polar_eps), torch.is_inference_mode_enabled())
    if device is not None or dtype != torch.float32:
        out = out.to(device=device, dtype=dtype)
    return out


class GridCache:
    """Per-module cache of tensors that depend only on the grid (plus device and dtype).

    Not a buffer: it never enters a state_dict, and a resolution change costs one rebuild.
    ``get(key, device, build)`` returns ``build()`` moved to ``device``, computed once per key.
    Entries built under ``torch.inference_mode`` are kept apart: inference tensors cannot enter
    autograd, so a model evaluated in inference mode (e.g. Lightning's validation) must not hand them
    to a later training step.
    """

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._store: Dict[Hashable, object] = {}

    def get(self, key: Hashable, device: torch.device, build: Callable[[], object]) -> object:
        full_key = (key, str(device), torch.is_inference_mode_enabled())
        hit = self._store.get(full_key)
        if hit is None:
            hit = _to_device(build(), device)
            if len(self._store) >= self.max_entries:
                self._store.pop(next(iter(self._store)))
            self._store[full_key] = hit
        return hit

    def clear(self) -> None:
        self._store.clear()

    def __len__(self) -> int:
        return len(self._store)


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj

