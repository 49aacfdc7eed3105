"""Multi-scale backbones for detection, from any zoo model.

* Plain ViTs (``vit_<pe>_<size>``): ViTDet's simple feature pyramid (Li et al. 2022, "Exploring Plain
  Vision Transformer Backbones for Object Detection", detectron2 ``SimpleFeaturePyramid``): from the
  last block's map at stride ``p`` (the patch size), stride ``p/4`` by two 2x2 deconvolutions (LN +
  GELU between), ``p/2`` by one, ``p`` as is, ``2p`` by a 2x2 max pool; each followed by a 1x1 conv + LN
  and a 3x3 conv + LN to ``out_channels``; coarser strides by a stride-2 max pool of the previous level
  (ViTDet's ``LastLevelMaxPool`` for P6). The trunk runs at any input size (``dynamic_img_size=True``).
* Hierarchical models (``swin_*``, ``cswin_*``, ``rst_*``): timm ``features_only`` maps + torchvision's
  ``FeaturePyramidNetwork`` (+ max-pooled extra level).

Window-absolute position embedding (Bolya et al. 2023, "Window Attention is Bugged"): at an input
larger than the training one, a learned absolute table can be interpolated to the new grid (the ViT's
own ``resample_table``, ``abs_pos='interp'``) or tiled: the training-size table repeated once per
training-size window of tokens, cropped at the far edges (``abs_pos='tile'``), so every token keeps
an embedding the model has seen, relative to its window.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from ..models.vit import VisionTransformer
from ..pos.absolute import tile_table as tile_abs_pos

__all__ = ['SimpleFeaturePyramid', 'ViTDetBackbone', 'HierarchicalFPNBackbone', 'build_backbone', 'tile_abs_pos',
           'ABS_POS_MODES']

ABS_POS_MODES = VisionTransformer.ABS_POS_MODES


def _conv_ln(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), LayerNorm2d(cout))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over one map at stride ``in_stride``.

    Args:
        in_dim: channels of the map; in_stride: its stride (the ViT patch size).
        strides: output strides, increasing; each is ``in_stride * 2**k`` with ``k >= -2``; those above
            ``2 * in_stride`` come from a stride-2 max pool of the previous output.
        out_channels: channels of every output level.
    """

    def __init__(self, in_dim: int, in_stride: int, strides: Sequence[int] = (8, 16, 32, 64),
                 out_channels: int = 256) -> None:
        super().__init__()
        strides = [int(s) for s in strides]
        if not strides or sorted(set(strides)) != strides:
            raise ValueError(f'strides must be strictly increasing, got {strides}')
        for s in strides:
            r = s / in_stride
            if r not in (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64):
                raise ValueError(f'stride {s} is not in_stride ({in_stride}) times a power of two in 1/4..64')
        if strides[0] > 2 * in_stride:
            raise ValueError(f'the finest stride {strides[0]} must be at most 2 x the patch size ({2 * in_stride})')
        self.strides = strides
        self.out_channels = out_channels
        self.stages = nn.ModuleList()
        self.pooled: List[bool] = []
        for s in strides:
            r = s / in_stride
            if r > 2:  # from the previous level
                if s != 2 * self.strides[self.strides.index(s) - 1]:
                    raise ValueError(f'stride {s} above 2 x patch must be twice the previous stride')
                self.pooled.append(True)
                self.stages.append(nn.MaxPool2d(kernel_size=1, stride=2))
                continue
            if r == 0.25:
                ops: List[nn.Module] = [nn.ConvTranspose2d(in_dim, in_dim // 2, 2, stride=2), LayerNorm2d(in_dim // 2),
                                        nn.GELU(), nn.ConvTranspose2d(in_dim // 2, in_dim // 4, 2, stride=2)]
                dim = in_dim // 4
            elif r == 0.5:
                ops, dim = [nn.ConvTranspose2d(in_dim, in_dim // 2, 2, stride=2)], in_dim // 2
            elif r == 1:
                ops, dim = [], in_dim
            else:
                ops, dim = [nn.MaxPool2d(kernel_size=2, stride=2)], in_dim
            ops += [_conv_ln(dim, out_channels, 1), _conv_ln(out_channels, out_channels, 3)]
            self.pooled.append(False)
            self.stages.append(nn.Sequential(*ops))

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        prev = None
        for s, stage, pooled in zip(self.strides, self.stages, self.pooled):
            prev = stage(prev if pooled else x)
            out[f'p{int(math.log2(s))}'] = prev
        return out


class ViTDetBackbone(nn.Module):
    """A plain ViT trunk (last block, no final norm, no head) + :class:`SimpleFeaturePyramid`.
    ``out_channels`` and ``strides`` are what torchvision detectors read."""

    def __init__(self, trunk: nn.Module, strides: Sequence[int] = (8, 16, 32, 64), out_channels: int = 256,
                 abs_pos: str = 'interp') -> None:
        super().__init__()
        if not getattr(trunk, 'plain_trunk', False):
            raise TypeError(f'{type(trunk).__name__} is not a plain single-scale trunk (plain_trunk); use '
                            f'HierarchicalFPNBackbone')
        trunk.abs_pos = trunk.check_abs_pos(abs_pos, trunk.pos_embed_type)  # the ViT's own option
        trunk.prune_intermediate_layers(indices=1, prune_norm=True, prune_head=True)
        self.abs_pos = abs_pos
        self.trunk = trunk
        patch = trunk.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f'the simple feature pyramid needs a square patch, got {tuple(patch)}')
        self.fpn = SimpleFeaturePyramid(trunk.embed_dim, patch[0], strides, out_channels)
        self.out_channels = out_channels
        self.strides = self.fpn.strides

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        (feat,) = self.trunk.forward_intermediates(x, indices=1, norm=False, intermediates_only=True)
        return self.fpn(feat)


class HierarchicalFPNBackbone(nn.Module):
    """``features_only`` maps of a hierarchical model + torchvision ``FeaturePyramidNetwork`` with an
    extra max-pooled level (strides: the model's reductions, then twice the last)."""

    def __init__(self, features: nn.Module, out_channels: int = 256, extra_level: bool = True) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        info = features.feature_info
        self.features = features
        self.names = [f'p{int(math.log2(r))}' for r in info.reduction()]
        self.fpn = FeaturePyramidNetwork(list(info.channels()), out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_level else None)
        self.out_channels = out_channels
        self.strides = list(info.reduction()) + ([2 * info.reduction()[-1]] if extra_level else [])

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        maps = self.features(x)
        return self.fpn(OrderedDict(zip(self.names, maps)))


def build_backbone(model_name: str, img_size: int, model_kwargs: Optional[Dict[str, Any]] = None,
                   out_channels: int = 256, strides: Optional[Sequence[int]] = None, abs_pos: str = 'interp',
                   out_indices: Optional[Sequence[int]] = None) -> nn.Module:
    """The detection backbone for a zoo (or timm) model name: ViTDet pyramid for visionpe plain
    single-scale trunks (class attribute ``plain_trunk``), ``features_only`` + FPN otherwise. ``strides`` (plain ViTs): default (8, 16, 32, 64);
    ``out_indices`` (hierarchical): default every stage."""
    import timm
    from timm.models import model_entrypoint
    from ..models import check_model_name
    kwargs = dict(model_kwargs or {})
    for key in ('num_classes', 'features_only', 'img_size'):
        if key in kwargs:
            raise ValueError(f'model_kwargs must not set {key}: the detector sets it')
    check_model_name(model_name, 'backbone')
    kwargs.setdefault('dynamic_img_size', True)
    model_cls = getattr(model_entrypoint(model_name), 'model_cls', None)  # visionpe presets name their class
    if getattr(model_cls, 'plain_trunk', False):
        trunk = timm.create_model(model_name, num_classes=0, img_size=img_size, **kwargs)
        return ViTDetBackbone(trunk, strides or (8, 16, 32, 64), out_channels, abs_pos)
    if strides is not None:
        raise ValueError(f'strides is only for plain ViTs (the simple feature pyramid); {model_name} takes '
                         f'its strides from its stages (choose them with out_indices)')
    if abs_pos != 'interp':
        raise ValueError(f"abs_pos={abs_pos!r} is only for plain ViTs with a learned absolute table")
    fkw: Dict[str, Any] = dict(features_only=True, img_size=img_size, **kwargs)
    if out_indices is not None:
        fkw['out_indices'] = tuple(out_indices)
    features = timm.create_model(model_name, **fkw)
    return HierarchicalFPNBackbone(features, out_channels)
