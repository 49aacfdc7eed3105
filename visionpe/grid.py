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

Coordinate augmentation (DINOv3, Simeoni et al. 2025; timm's ``RotaryEmbeddingDinoV3``): a
:class:`CoordAug` draws, in training only, one :class:`CoordDraw` per batch (or per sample) that
maps every coordinate of the encoding's mode as ``xy' = (xy + s) * j * r`` with a uniform shift
``s ~ U(-shift, shift)`` per axis (in the mode's units), a per-axis log-uniform jitter
``log j ~ U(-log J, log J)`` and one global log-uniform rescale ``log r ~ U(-log R, log R)``.
The model puts the draw on its :class:`Grid` (``grid.aug``) and every encoding reads it through
:func:`grid_coords` (``aug=grid.aug``), so all of them see the same transform.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Dict, Hashable, Literal, Optional, Tuple

import torch

__all__ = ['COORD_MODES', 'COORD_FAMILIES', 'CoordMode', 'Grid', 'GridCache', 'grid_coords', 'check_coord_mode', 'CoordAug',
           'CoordDraw']

CoordMode = Literal['index', 'normalized', 'centered', 'ref', 'normalized_ref', 'polar']
COORD_MODES: Tuple[str, ...] = ('index', 'normalized', 'centered', 'ref', 'normalized_ref', 'polar')
#: modes that give the same coordinates at the reference (training) grid, by the mode a model was trained
#: with: only these are test-time alternatives (``ref`` for an ``index`` model = position interpolation);
#: another frame (``normalized`` positions in (0, 1) for a model trained on 0..w-1) moves every position
COORD_FAMILIES: Dict[str, Tuple[str, ...]] = {
    'index': ('index', 'ref'), 'ref': ('index', 'ref'),
    'normalized': ('normalized', 'normalized_ref'), 'normalized_ref': ('normalized', 'normalized_ref'),
    'centered': ('centered',), 'polar': ('polar',),
}


@dataclass(frozen=True, eq=False)
class CoordDraw:
    """One drawn coordinate transform ``xy' = (xy + shift) * jitter * rescale`` (columns x, y).

    ``shift`` and ``jitter`` are ``(2,)`` (one per batch) or ``(B, 2)`` (one per sample), ``rescale``
    ``(1,)`` or ``(B, 1)``; any of them may be None (not drawn). Compared by identity: a Grid that
    carries a draw never hits a cached table (see :class:`GridCache`).
    """
    shift: Optional[torch.Tensor] = None
    jitter: Optional[torch.Tensor] = None
    rescale: Optional[torch.Tensor] = None

    @property
    def per_sample(self) -> bool:
        return any(t is not None and t.dim() == 2 for t in (self.shift, self.jitter, self.rescale))

    def axis_scale(self) -> torch.Tensor:
        """``(2,)`` or ``(B, 2)``: the factor ``j * r`` by which the draw multiplies a step along x and along y
        (the shift cancels in differences), so distances under the draw are those of these scaled steps."""
        lead = next((t.shape[:-1] for t in (self.shift, self.jitter, self.rescale) if t is not None), ())
        out = torch.ones(*lead, 2)
        if self.jitter is not None:
            out = out * self.jitter
        if self.rescale is not None:
            out = out * self.rescale
        return out

    def apply(self, xy: torch.Tensor) -> torch.Tensor:
        """``(N, 2)`` coordinates -> ``(N, 2)`` (per batch) or ``(B, N, 2)`` (per sample); DINOv3's order."""
        def put(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=xy.device, dtype=xy.dtype)
            return t[:, None, :] if t.dim() == 2 else t
        if self.shift is not None:
            xy = xy + put(self.shift)
        if self.jitter is not None:
            xy = xy * put(self.jitter)
        if self.rescale is not None:
            xy = xy * put(self.rescale)
        return xy


@dataclass(frozen=True)
class CoordAug:
    """DINOv3's coordinate augmentation settings (timm ``RotaryEmbeddingDinoV3``'s ``shift_coords``,
    ``jitter_coords``, ``rescale_coords``): ``shift >= 0`` in coordinate units, ``jitter >= 1`` and
    ``rescale >= 1`` as multiplicative factors (None: off). ``per_sample`` draws one transform per image
    instead of one per batch.

    :meth:`draw` uses the global torch RNG on the CPU in DINOv3's order (shift, jitter, rescale; the two
    per-axis values in (row, column) order, as timm's ``ij`` grids), so with the same seed it draws
    what ``RotaryEmbeddingDinoV3`` draws; the returned tensors are in this module's (x, y) order.
    """
    shift: Optional[float] = None
    jitter: Optional[float] = None
    rescale: Optional[float] = None
    per_sample: bool = False

    def __post_init__(self) -> None:
        for name, lo in (('shift', 0.0), ('jitter', 1.0), ('rescale', 1.0)):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
                what = 'a shift in coordinate units' if name == 'shift' else 'a multiplicative factor'
                raise ValueError(f'coordinate augmentation {name} must be a finite number >= {lo:g} ({what}) or '
                                 f'None (off); got {v!r}')
            object.__setattr__(self, name, float(v))

    @classmethod
    def from_option(cls, option: Any) -> Optional['CoordAug']:
        """A model's ``coord_aug`` keyword: None, a :class:`CoordAug` or a dict of its fields."""
        if option is None or isinstance(option, CoordAug):
            return option
        if not isinstance(option, dict):
            raise TypeError(f'coord_aug must be None or a dict with keys shift, jitter, rescale, per_sample; '
                            f'got {option!r}')
        bad = sorted(set(option) - {'shift', 'jitter', 'rescale', 'per_sample'})
        if bad:
            raise TypeError(f"coord_aug got unknown key(s) {', '.join(bad)}; valid: shift, jitter, rescale, "
                            f"per_sample")
        return cls(**option)

    @property
    def active(self) -> bool:
        return self.shift is not None or self.jitter is not None or self.rescale is not None

    def draw(self, batch_size: int = 1) -> CoordDraw:
        lead = (batch_size,) if self.per_sample else ()

        def uniform(n: int, lo: float, hi: float) -> torch.Tensor:
            return torch.empty(*lead, n).uniform_(lo, hi)
        shift = jitter = rescale = None
        if self.shift is not None:
            shift = uniform(2, -self.shift, self.shift).flip(-1)  # drawn (row, col) -> (x, y)
        if self.jitter is not None:
            j = math.log(self.jitter)
            jitter = uniform(2, -j, j).exp().flip(-1)
        if self.rescale is not None:
            r = math.log(self.rescale)
            rescale = uniform(1, -r, r).exp()
        return CoordDraw(shift, jitter, rescale)


@dataclass(frozen=True)
class Grid:
    """Layout of the token sequence of one forward pass: prefix tokens, then ``h x w`` patches.

    ``aug``: the coordinate transform drawn for this forward pass (training with coordinate
    augmentation), else None.
    """
    h: int
    w: int
    num_prefix: int = 0
    aug: Optional[CoordDraw] = field(default=None, repr=False)

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
        aug: Optional[CoordDraw] = None,
) -> torch.Tensor:
    """Coordinates of the ``h * w`` patch tokens, shape ``(h * w, 2)``, row-major token order.

    The result is cached per arguments; treat it as read-only. ``polar_eps`` keeps ``log r``
    finite at the centre (``r`` is in patch units, so the default 1 maps the centre to 0).
    ``aug`` (a :class:`CoordDraw`, e.g. ``grid.aug``) transforms the coordinates of the mode; a
    per-sample draw gives ``(B, h * w, 2)``. Polar coordinates take no augmentation.
    """
    check_coord_mode(mode)
    ref = tuple(int(v) for v in ref_hw) if ref_hw is not None else None
    out = _coords_cpu(int(h), int(w), mode, ref, float(polar_eps), torch.is_inference_mode_enabled())
    if aug is not None:
        if mode == 'polar':
            raise ValueError("coordinate augmentation (shift / jitter / rescale) is defined on Cartesian "
                             "coordinates, not coord_mode='polar'; turn coord_aug off for polar encodings")
        out = aug.apply(out)
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
        if _augmented(key):  # a fresh coordinate draw: built for this forward only, never stored
            return _to_device(build(), device)
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


def _augmented(key: Hashable) -> bool:
    parts = key if isinstance(key, tuple) else (key,)
    return any(isinstance(p, Grid) and p.aug is not None for p in parts)


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

