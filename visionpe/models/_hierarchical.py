"""What the 4-stage NHWC backbones share (CSWin, RST; Swin takes the classifier mixin).

``HierarchicalBase`` adds to :class:`~visionpe.models._base.TimmBackbone` (the timm contract) the
conv-stem specifics: ``group_matcher``, ``set_input_size``, the pooled classifier head and feature
info, weight init (skipped on the meta device). ``ConvStem`` and ``ConvMerge`` are CSWin's stem
(conv 7x7 / 4) and patch merging (conv 3x3 / 2), both NHWC out.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, to_2tuple, trunc_normal_

from ._base import TimmBackbone

__all__ = ['HierarchicalBase', 'ClassifierHeadMixin', 'ConvNorm', 'ConvStem', 'ConvMerge', 'IntOr4', 'to_4']

IntOr4 = int | Sequence[int]


def to_4(v: IntOr4, name: str) -> tuple[int, ...]:
    t = (v,) * 4 if isinstance(v, (int, float)) else tuple(v)
    if len(t) != 4:
        raise ValueError(f'{name} needs one value per stage (4), got {v!r}')
    return t


class ConvNorm(nn.Module):
    """Conv2d + LayerNorm over channels, NHWC out; the input is NCHW images or (``nhwc_in``) an NHWC map."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: int, padding: int,
                 norm_layer: Callable[..., nn.Module], nhwc_in: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=kernel_size, stride=stride, padding=padding)
        self.norm = norm_layer(out_dim)
        self.nhwc_in = nhwc_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc_in:
            # contiguous NCHW as upstream: a channels-last view picks another conv kernel (other rounding)
            x = x.permute(0, 3, 1, 2).contiguous()
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class ConvStem(ConvNorm):
    """CSWin's stem: Conv2d(in, dim, 7, stride 4, padding 2) + LayerNorm; NCHW in, NHWC out."""

    def __init__(self, in_chans: int, dim: int, norm_layer: Callable[..., nn.Module]):
        super().__init__(in_chans, dim, 7, 4, 2, norm_layer, nhwc_in=False)


class ConvMerge(ConvNorm):
    """Patch merging: Conv2d(dim, out, 3, stride 2, padding 1) + LayerNorm; NHWC in and out."""

    def __init__(self, dim: int, out_dim: int, norm_layer: Callable[..., nn.Module]):
        super().__init__(dim, out_dim, 3, 2, 1, norm_layer, nhwc_in=True)


class ClassifierHeadMixin:
    """timm's classifier API over a ``timm.layers.ClassifierHead`` in ``self.head``."""

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features)
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)


class HierarchicalBase(ClassifierHeadMixin, TimmBackbone):
    """The 4-stage NHWC backbones with a conv stem (CSWin, RST): ``stem``, then ``stages``.

    Subclasses call :meth:`_setup` first and :meth:`_finish` last in ``__init__`` and set ``stem``,
    ``stages`` and ``norm``; the timm contract comes from :class:`~visionpe.models._base.TimmBackbone`.
    """
    output_fmt = 'NHWC'
    POOL_TYPES = ('', 'avg', 'max', 'avgmax', 'catavgmax')
    min_input_side = 3
    min_input_reason = 'the 7x7 stride-4 stem needs at least 3x3 pixels'

    def _setup(self, in_chans: int, num_classes: int, global_pool: str, img_size: int | tuple[int, int],
               dynamic_img_size: bool, embed_dim: int) -> None:
        """The common constructor attributes (call first in __init__); stage widths double per stage."""
        if global_pool not in self.POOL_TYPES:
            raise ValueError(f"global_pool must be one of {', '.join(map(repr, self.POOL_TYPES))}; got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.img_size = to_2tuple(img_size)
        self.dynamic_img_size = dynamic_img_size
        self.embed_dim = embed_dim
        self.dims = [embed_dim * 2 ** i for i in range(4)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ])

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: Any = None) -> None:
        """Change the default input size. Nothing here depends on it except the strict size check."""
        if patch_size is not None:
            raise ValueError(f'{type(self).__name__} has a fixed 7x7 stride-4 conv stem; patch_size cannot change')
        if img_size is not None:
            self.img_size = to_2tuple(img_size)

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.stem(x), None

    def _unit(self, i: int, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.stages[i](x)

    def _init_weights(self, m: nn.Module) -> None:
        # upstream: trunc_normal(.02) Linear weights with zero bias, LayerNorm 1 / 0, convs PyTorch default
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _finish(self, num_classes: int, global_pool: str, drop_rate: float) -> None:
        """Head, feature info from ``self.dims`` and weight init (call at the end of __init__)."""
        self.num_features = self.dims[-1]
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt=self.output_fmt)
        self.head_hidden_size = self.head.num_features
        self.feature_info = [dict(num_chs=d, reduction=4 * 2 ** i, module=f'stages.{i}')
                             for i, d in enumerate(self.dims)]
        if not next(self.parameters()).is_meta:  # on the meta device there are no values to initialise
            self.apply(self._init_weights)
