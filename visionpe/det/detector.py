"""torchvision FCOS (Tian et al. 2019, anchor-free, one stage) around a zoo backbone.

FCOS is chosen because it trains fastest on a CPU: no proposals, one point per location, and its
size ranges follow the pyramid (torchvision assigns a box to the level whose anchor size, set here to
the level's stride, satisfies ``4 * stride < max(l, t, r, b) < 8 * stride``; the finest level takes all
smaller boxes, the coarsest all larger ones).

torchvision's ``GeneralizedRCNNTransform`` inside the detector normalises, resizes every image so its
shorter side is ``min_size`` (longer side at most ``max_size``), pads the batch to a multiple of the
coarsest stride, and maps the detections back to the input pixels: the test size is a setting
(:func:`set_test_size`), not a data transform.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .backbone import build_backbone

__all__ = ['build_detector', 'set_test_size', 'COCO_MAX_RATIO', 'split_name']

COCO_MAX_RATIO = 1333 / 800  # COCO's test setting: shorter side 800, longer side at most 1333
DETECTOR_PREFIX = 'fcos_'


def split_name(model_name: str) -> str:
    """The backbone of a detector name: ``fcos_vit_ape_tiny`` or ``vit_ape_tiny`` -> ``vit_ape_tiny``."""
    return model_name[len(DETECTOR_PREFIX):] if model_name.startswith(DETECTOR_PREFIX) else model_name


def set_test_size(detector: nn.Module, size: int, max_size: Optional[int] = None) -> None:
    """Resize inputs so the shorter side is ``size`` (longer side at most ``max_size``, default
    ``size * 1333 / 800``)."""
    if size < 1:
        raise ValueError(f'size must be positive, got {size}')
    detector.transform.min_size = (int(size),)
    detector.transform.max_size = int(max_size or round(size * COCO_MAX_RATIO))


def build_detector(
        model_name: str,
        num_classes: int,
        img_size: int = 1024,
        max_size: Optional[int] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        fpn_channels: int = 256,
        strides: Optional[Sequence[int]] = None,
        out_indices: Optional[Sequence[int]] = None,
        abs_pos: str = 'interp',
        head_convs: int = 4,
        mean: Tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: Tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        center_sampling_radius: float = 1.5,
) -> nn.Module:
    """FCOS on ``model_name`` (a backbone name, optionally prefixed ``fcos_``).

    ``num_classes`` counts class 0 (COCO ids: 91; Fashion-MNIST: 11). ``img_size``: shorter side the
    images are resized to (training size; change with :func:`set_test_size`). Head: torchvision's
    ``FCOSHead`` with ``head_convs`` conv + GroupNorm(32) layers per branch (``fpn_channels`` must be a
    multiple of 32). ``score_thresh`` 0.05 (torchvision's default 0.2 is for display, not for AP).
    """
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    if num_classes < 2:
        raise ValueError(f'num_classes counts the unused class 0 (max category id + 1), got {num_classes}')
    if fpn_channels % 32:
        raise ValueError(f'fpn_channels must be a multiple of 32 (GroupNorm(32) in the FCOS head), got {fpn_channels}')
    backbone = build_backbone(split_name(model_name), img_size, model_kwargs, fpn_channels, strides, abs_pos,
                              out_indices)
    anchors = AnchorGenerator(tuple((int(s),) for s in backbone.strides), ((1.0,),) * len(backbone.strides))
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs)
    model = FCOS(backbone, num_classes, min_size=img_size, max_size=max_size or round(img_size * COCO_MAX_RATIO),
                 image_mean=list(mean), image_std=list(std), anchor_generator=anchors, head=head,
                 score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                 center_sampling_radius=center_sampling_radius)
    # pad to a multiple of the coarsest stride, so every level's stride is exact
    model.transform.size_divisible = max(32, max(backbone.strides))
    return model

