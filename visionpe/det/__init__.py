"""COCO-style detection on any zoo backbone: ViTDet simple feature pyramid (plain ViTs) or
``features_only`` + FPN (hierarchical models) under torchvision FCOS; COCO / Fashion-MNIST data in the
COCO 2017 layout; Lightning training (``train.py --task det``) and pycocotools evaluation at any test size.
"""
from .backbone import (ABS_POS_MODES, HierarchicalFPNBackbone, SimpleFeaturePyramid, ViTDetBackbone,
                       build_backbone, tile_abs_pos)
from .data import CocoDetectionSet, coco_num_classes, make_fmnist_coco
from .detector import build_detector, set_test_size
from .evaluate import AP_KEYS, coco_ap, evaluate_detection, load_detector, to_coco_results

__all__ = ['ABS_POS_MODES', 'HierarchicalFPNBackbone', 'SimpleFeaturePyramid', 'ViTDetBackbone', 'build_backbone',
           'tile_abs_pos', 'CocoDetectionSet', 'coco_num_classes', 'make_fmnist_coco', 'build_detector',
           'set_test_size', 'AP_KEYS', 'coco_ap', 'evaluate_detection', 'load_detector', 'to_coco_results']
