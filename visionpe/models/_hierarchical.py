"""What the 4-stage NHWC backbones share (CSWin, RST; Swin takes the classifier mixin).

``HierarchicalBase`` adds to :class:`~visionpe.models._base.TimmBackbone` (the timm contract) the
conv-stem specifics: ``group_matcher``, ``set_input_size``, the pooled classifier head and feature
info, weight init (skipped on the meta device). ``ConvStem`` and ``ConvMerge`` are CSWin's stem
(conv 7x7 / 4) and patch merging (conv 3x3 / 2), both NHWC out.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, calculate_drop_path_rates, to_2tuple, trunc_normal_

from ..attention import check_backend
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

    The constructor takes the arguments every such model shares and builds the stem; a subclass
    passes them on (``**kwargs``), builds ``stages`` from the stored options (``dims``, ``mlp_ratio``,
    ``qkv_bias``, ``proj_drop_rate``, ``attn_drop_rate``, ``drop_path_rate``, ``norm_layer``,
    ``attn_backend``) and calls :meth:`_finish`. The timm contract comes from
    :class:`~visionpe.models._base.TimmBackbone`.

    Args:
        img_size: default input size (strict unless ``dynamic_img_size``: any size per call).
        embed_dim: stage-1 width; stage i has ``embed_dim * 2**i`` channels.
        norm_eps: LayerNorm epsilon (upstream 1e-5).
        attn_backend: ``auto | math | sdpa | xformers | flex`` (:mod:`visionpe.attention`).
    """
    output_fmt = 'NHWC'
    POOL_TYPES = ('', 'avg', 'max', 'avgmax', 'catavgmax')
    min_input_side = 3
    min_input_reason = 'the 7x7 stride-4 stem needs at least 3x3 pixels'

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0., proj_drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
            norm_eps: float = 1e-5,
            dynamic_img_size: bool = False,
            attn_backend: str = 'auto',
            coord_aug: None = None,
    ) -> None:
        super().__init__()
        if coord_aug is not None:
            raise ValueError(f"coord_aug does not apply to {type(self).__name__}: its position encoding (convolutions "
                             f"and strip bias tables indexed by integer offsets) reads no continuous token coordinates; "
                             f"remove coord_aug (it applies to ViTs and to Swin with a rotary pe, e.g. "
                             f"swin_rope2d_mixed_tiny)")
        if global_pool not in self.POOL_TYPES:
            raise ValueError(f"global_pool must be one of {', '.join(map(repr, self.POOL_TYPES))}; got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.img_size = to_2tuple(img_size)
        self.dynamic_img_size = dynamic_img_size
        self.embed_dim = embed_dim
        self.dims = [embed_dim * 2 ** i for i in range(4)]
        self.mlp_ratio, self.qkv_bias = mlp_ratio, qkv_bias
        self.drop_rate, self.proj_drop_rate, self.attn_drop_rate = drop_rate, proj_drop_rate, attn_drop_rate
        self.drop_path_rate = drop_path_rate
        self.attn_backend = check_backend(attn_backend)
        self.norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.stem = ConvStem(in_chans, embed_dim, self.norm_layer)

    def drop_path_rates(self, depth: Sequence[int]) -> list[list[float]]:
        """Stochastic depth per block, rising linearly over all blocks, grouped by stage."""
        dpr = calculate_drop_path_rates(self.drop_path_rate, list(depth), stagewise=False)
        starts = [sum(depth[:i]) for i in range(len(depth))]
        return [dpr[a:a + d] for a, d in zip(starts, depth)]

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

    def _finish(self) -> None:
        """Final norm, head, feature info from ``self.dims`` and weight init (call at the end of __init__)."""
        self.num_features = self.dims[-1]
        self.norm = self.norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, self.num_classes, pool_type=self.global_pool,
                                   drop_rate=self.drop_rate, input_fmt=self.output_fmt)
        self.head_hidden_size = self.head.num_features
        self.feature_info = [dict(num_chs=d, reduction=4 * 2 ** i, module=f'stages.{i}')
                             for i, d in enumerate(self.dims)]
        if not next(self.parameters()).is_meta:  # on the meta device there are no values to initialise
            self.apply(self._init_weights)
