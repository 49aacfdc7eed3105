"""What the 4-stage NHWC backbones share (CSWin, RST; Swin takes the classifier mixin).

``HierarchicalBase`` holds timm's housekeeping once: input checks, ``group_matcher``, gradient
checkpointing, ``set_input_size``, ``forward_intermediates`` / ``prune_intermediate_layers``, the
pooled classifier head and feature info, weight init (skipped on the meta device). ``ConvStem``
and ``ConvMerge`` are CSWin's stem (conv 7x7 / 4) and patch merging (conv 3x3 / 2), both NHWC out.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices

__all__ = ['HierarchicalBase', 'ClassifierHeadMixin', 'ConvStem', 'ConvMerge', 'IntOr4', 'to_4']

IntOr4 = Union[int, Sequence[int]]


def to_4(v: IntOr4, name: str) -> Tuple[int, ...]:
    t = (v,) * 4 if isinstance(v, (int, float)) else tuple(v)
    if len(t) != 4:
        raise ValueError(f'{name} needs one value per stage (4), got {v!r}')
    return t


class ConvStem(nn.Module):
    """Conv2d(in, dim, 7, stride 4, padding 2) + LayerNorm over channels; NCHW in, NHWC out."""

    def __init__(self, in_chans: int, dim: int, norm_layer: Callable[..., nn.Module]):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=2)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class ConvMerge(nn.Module):
    """Patch merging: Conv2d(dim, out, 3, stride 2, padding 1) + LayerNorm; NHWC in and out."""

    def __init__(self, dim: int, out_dim: int, norm_layer: Callable[..., nn.Module]):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous NCHW as upstream: a channels-last view picks another conv kernel (other rounding)
        return self.norm(self.conv(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1))


class ClassifierHeadMixin:
    """timm's classifier API over a ``timm.layers.ClassifierHead`` in ``self.head``."""

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features)
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)


class HierarchicalBase(ClassifierHeadMixin, nn.Module):
    """timm housekeeping shared by the 4-stage NHWC backbones (CSWin, RST).

    Subclasses set ``stem``, ``stages``, ``norm``, ``head``, ``feature_info``, ``num_features``,
    ``img_size`` and ``dynamic_img_size``.
    """
    output_fmt = 'NHWC'
    POOL_TYPES = ('', 'avg', 'max', 'avgmax', 'catavgmax')

    def _setup(self, in_chans: int, num_classes: int, global_pool: str, img_size: Union[int, Tuple[int, int]],
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

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}')
        H, W = x.shape[-2:]
        if H < 3 or W < 3:
            raise ValueError(f'image size {H}x{W} is too small: the 7x7 stride-4 stem needs at least 3x3 pixels')
        if not self.dynamic_img_size and (H, W) != tuple(self.img_size):
            h0, w0 = self.img_size
            raise ValueError(
                f'this model was built for {h0}x{w0} images and got {H}x{W}; create it with '
                f'dynamic_img_size=True (any size per call) or call model.set_input_size(({H}, {W}))')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Any] = None) -> None:
        """Change the default input size. Nothing here depends on it except the strict size check."""
        if patch_size is not None:
            raise ValueError(f'{type(self).__name__} has a fixed 7x7 stride-4 conv stem; patch_size cannot change')
        if img_size is not None:
            self.img_size = to_2tuple(img_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stages(self.stem(x))
        return self.norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's hierarchical API: NCHW stage outputs (final norm on the last one if ``norm``)."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW' for {type(self).__name__}, got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        num_stages = len(self.stages)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self.stem(x)
        i = -1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == num_stages - 1 else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        if i == num_stages - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

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
