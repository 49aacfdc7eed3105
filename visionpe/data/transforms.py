"""Transforms: batched tensor transforms for small in-memory data, timm's factory for ImageNet.

Batched scale augmentation (:class:`BatchScaleAugment`) composes, per sample,
1. placement of the item on a larger square canvas (side ``c`` times the item, ``c ~ U(canvas)``,
   uniform position; the background is 0, Fashion-MNIST's black),
2. a random resized crop of the canvas (area fraction ``s ~ U(scale)``, log aspect ratio uniform in
   ``log(ratio)``, uniform position; torchvision's RandomResizedCrop parameters),
3. a horizontal flip with probability ``hflip``,
4. resampling of the crop to the output size.
In normalised coordinates (``[-1, 1]`` over the image, pixel centres as in ``align_corners=False``)
the output point ``u`` reads the item at ``x = c * (t_crop + f * w_crop * u - t_item)``: the
apparent item size is ``1 / (c * sqrt(s))`` frames.

The map is axis-aligned, so resampling is separable: one (out x in) weight matrix per axis and
sample, applied as two batched matmuls (:func:`resample`). The weights are those of PyTorch's
``interpolate(mode='bilinear', align_corners=False, antialias=True)``: a triangle filter widened
by the shrink factor, renormalised over the image; points outside the image read 0 (the canvas).
Evaluation (:func:`resize_batch`) is the same resampler with the identity map: the whole item fills
the frame at any size, exactly the training view with ``c = 1, s = 1`` and no flip.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ['BatchScaleAugment', 'resize_batch', 'resample', 'axis_weights', 'normalize_batch', 'to_size',
           'create_imagenet_transform']

Size = int | tuple[int, int]


def to_size(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def axis_weights(a: torch.Tensor, b: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """Resampling weights (B, n_out, n_in) for the 1-D maps ``p = a * (j + 1/2) + b`` (pixel units):
    triangle filter of half-width ``max(|a|, 1)`` around ``p``, renormalised over the input; rows whose
    ``p`` falls outside ``[0, n_in]`` are 0."""
    j = torch.arange(n_out, device=a.device, dtype=a.dtype) + 0.5
    k = torch.arange(n_in, device=a.device, dtype=a.dtype) + 0.5
    p = a[:, None] * j + b[:, None]
    support = a.abs().clamp(min=1.0)[:, None, None]
    w = (1 - (k - p[..., None]).abs() / support).clamp(min=0)
    inside = ((p >= 0) & (p <= n_in)).to(w.dtype)[..., None]
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12) * inside


def resample(x: torch.Tensor, ax: torch.Tensor, bx: torch.Tensor, ay: torch.Tensor, by: torch.Tensor,
             size: tuple[int, int]) -> torch.Tensor:
    """``out[b, c, i, j] = x[b, c]`` resampled at rows ``ay * (i + 1/2) + by`` and columns ``ax * (j + 1/2) + bx``."""
    h, w = size
    B, C, H, W = x.shape
    wy = axis_weights(ay.to(x.dtype), by.to(x.dtype), h, H)  # (B, h, H)
    wxt = axis_weights(ax.to(x.dtype), bx.to(x.dtype), w, W).transpose(1, 2).contiguous()  # (B, W, w)
    if C > 1:
        wy, wxt = wy.repeat_interleave(C, 0), wxt.repeat_interleave(C, 0)
    # plain 3-D bmm: broadcast matmuls with a transposed operand take a slow CPU path
    return torch.bmm(torch.bmm(wy, x.reshape(B * C, H, W)), wxt).view(B, C, h, w)


def _uniform(lo: float, hi: float, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


class BatchScaleAugment:
    """Random canvas placement + random resized crop + flip for a batch, one separable resampling."""

    def __init__(self, size: Size, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), canvas: Sequence[float] = (1.0, 2.0),
                 hflip: float = 0.5) -> None:
        self.size = to_size(size)
        self.scale, self.ratio, self.canvas = tuple(scale), tuple(ratio), tuple(canvas)
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f'scale must satisfy 0 < min <= max <= 1, got {self.scale}')
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f'ratio must satisfy 0 < min <= max, got {self.ratio}')
        if not (1 <= self.canvas[0] <= self.canvas[1]):
            raise ValueError(f'canvas must satisfy 1 <= min <= max (1 = no canvas), got {self.canvas}')
        if not 0 <= hflip <= 1:
            raise ValueError(f'hflip is a probability, got {hflip}')
        self.hflip = hflip

    def params(self, n: int, g: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per-sample maps ``x_in = A * u + B`` in normalised coordinates: ``(Ax, Bx, Ay, By)``."""
        c = _uniform(*self.canvas, n, g, device)
        half = 1 - 1 / c  # range of the item centre on the canvas
        tx, ty = (2 * torch.rand(2, n, generator=g, device=device) - 1) * half
        s = _uniform(*self.scale, n, g, device)
        r = torch.exp(_uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), n, g, device))
        w = torch.sqrt(s * r).clamp(max=1.0)
        h = torch.sqrt(s / r).clamp(max=1.0)
        cx = (2 * torch.rand(n, generator=g, device=device) - 1) * (1 - w)
        cy = (2 * torch.rand(n, generator=g, device=device) - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=g, device=device) < self.hflip, -1.0, 1.0)
        return c * flip * w, c * (cx - tx), c * h, c * (cy - ty)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``x``: float images (B, C, H, W) in [0, 1] -> (B, C, *size)."""
        Ax, Bx, Ay, By = self.params(x.shape[0], g, x.device)
        return resample(x, *_pixel_map(Ax, Bx, x.shape[-1], self.size[1]), *_pixel_map(Ay, By, x.shape[-2],
                                                                                        self.size[0]), self.size)


def _pixel_map(A: torch.Tensor, B: torch.Tensor, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised map ``x = A u + B`` as a pixel map ``p = a (j + 1/2) + b``."""
    return n_in * A / n_out, n_in / 2 * (1 + B - A)


def resize_batch(x: torch.Tensor, size: Size) -> torch.Tensor:
    """The evaluation view: the whole image resized to ``size`` (bilinear, antialiased when shrinking; equal
    to ``F.interpolate(..., mode='bilinear', antialias=True)``)."""
    h, w = to_size(size)
    if tuple(x.shape[-2:]) == (h, w):
        return x
    n = x.shape[0]
    one = torch.ones(n, device=x.device)
    zero = torch.zeros(n, device=x.device)
    return resample(x, *_pixel_map(one, zero, x.shape[-1], w), *_pixel_map(one, zero, x.shape[-2], h), (h, w))


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels: int = 3) -> torch.Tensor:
    """``(x - mean) / std`` per channel; a 1-channel input is repeated to ``channels`` first."""
    if x.shape[1] == 1 and channels > 1:
        x = x.expand(-1, channels, -1, -1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def create_imagenet_transform(
        is_training: bool,
        img_size: Size,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = 'bicubic',
        auto_augment: str | None = 'rand-m9-mstd0.5-inc1',
        color_jitter: float = 0.4,
        re_prob: float = 0.25,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        train_crop_mode: str | None = None,
        crop_pct: float = 0.875,
        crop_mode: str = 'center',
):
    """timm's ``create_transform`` with the recipe knobs (RandAugment ``rand-*``, DeiT-III 3-Augment ``3a``,
    random resized crop, colour jitter, random erasing); evaluation resizes the short side to
    ``size / crop_pct`` and centre-crops ``size``."""
    from timm.data import create_transform
    h, w = to_size(img_size)
    if is_training:
        return create_transform((3, h, w), is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
                                color_jitter=color_jitter, auto_augment=auto_augment or None,
                                interpolation=interpolation, mean=tuple(mean), std=tuple(std), re_prob=re_prob,
                                train_crop_mode=train_crop_mode)
    return create_transform((3, h, w), is_training=False, interpolation=interpolation, mean=tuple(mean),
                            std=tuple(std), crop_pct=crop_pct, crop_mode=crop_mode)
