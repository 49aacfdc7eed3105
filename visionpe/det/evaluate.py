"""COCO evaluation of a detector at a test size (the evaluator's detection side).

* :func:`load_detector`: rebuild the detector of a ``train.py`` detection checkpoint (Lightning ``.ckpt``)
  or of a plain state-dict file;
* :func:`evaluate_detection`: COCO bbox AP / AP50 / AP75 / APs / APm / APl (pycocotools ``COCOeval``,
  the standard protocol) on ``ROOT/annotations/instances_val2017.json`` + ``ROOT/val2017/`` with the
  images resized to shorter side ``size`` (detections mapped back to the original pixels, as COCO
  scores them), throughput (images/s over the detector calls, data loading excluded) and peak memory
  (:func:`visionpe.benchmark.peak_memory`: CUDA max allocated, or live tensor storage on CPU).

AP values are fractions in [0, 1]; ``nan`` where pycocotools reports -1 (no ground truth in that area
range).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..train.ckpt_io import read_checkpoint
from .data import CocoDetectionSet, detection_collate, eval_transform
from .detector import build_detector, set_test_size, split_name

__all__ = ['load_detector', 'evaluate_detection', 'coco_ap', 'to_coco_results', 'AP_KEYS']

AP_KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')  # COCOeval.stats[0:6]
_DETECTOR_ARGS = set(inspect.signature(build_detector).parameters) - {'model_name'}
_HPARAM_ARGS = ('num_classes', 'img_size', 'model_kwargs', 'fpn_channels', 'strides', 'out_indices', 'abs_pos',
                'head_convs', 'mean', 'std', 'score_thresh')


def to_coco_results(outputs: Sequence[Dict[str, torch.Tensor]], image_ids: Sequence[int]) -> List[Dict[str, Any]]:
    """torchvision detections (XYXY boxes in original pixels) as COCO result records (XYWH)."""
    out = []
    for det, image_id in zip(outputs, image_ids):
        boxes = det['boxes'].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, det['scores'].tolist(), det['labels'].tolist()):
            out.append(dict(image_id=int(image_id), category_id=int(label), bbox=[round(v, 3) for v in box],
                            score=float(score)))
    return out


def coco_ap(coco_gt: Any, results: List[Dict[str, Any]], image_ids: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """Standard COCO bbox evaluation of ``results`` on ``coco_gt`` (restricted to ``image_ids``)."""
    from pycocotools.cocoeval import COCOeval
    if not results:  # loadRes cannot take an empty list; no detections score 0 where there is ground truth
        return {k: 0.0 for k in AP_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its summary
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, 'bbox')
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (float(v) if v >= 0 else math.nan) for k, v in zip(AP_KEYS, ev.stats[:6])}


def load_detector(model_name: str, checkpoint: Optional[str] = None, *, trust: bool | None = None,
                  **overrides: Any) -> nn.Module:
    """The detector (eval mode) of ``checkpoint``: a ``train.py`` detection ``.ckpt`` (its hyper-parameters
    rebuild the model) or a state-dict file of :func:`build_detector` (then ``overrides`` must give what
    the model was built with: ``num_classes``, ``model_kwargs`` ...). ``checkpoint=None``: random weights.

    ``model_name``: the backbone (``vit_rope2d_small``) or detector name (``fcos_vit_rope2d_small``).
    ``overrides``: :func:`build_detector` keywords (e.g. ``abs_pos='tile'``, ``img_size``); any other
    keyword is a backbone option merged into ``model_kwargs`` (e.g. ``window_policy='scale'``).
    The file is read by :func:`visionpe.train.ckpt_io.read_checkpoint` (code-running pickles refused unless
    ``trust``; ``None``: the enclosing ``ckpt_io.trusting`` block's choice).
    """
    det_kw = {k: v for k, v in overrides.items() if k in _DETECTOR_ARGS}
    backbone_kw = {k: v for k, v in overrides.items() if k not in _DETECTOR_ARGS}
    state = None
    if checkpoint is not None:
        path = Path(checkpoint)
        ckpt = read_checkpoint(path, 'cpu', trust=trust)
        if 'hyper_parameters' in ckpt and 'state_dict' in ckpt:
            hp = ckpt['hyper_parameters']
            if split_name(hp.get('model_name', '')) != split_name(model_name):
                raise ValueError(f'{path} holds a detector on {hp.get("model_name")!r}, not {model_name!r}')
            if 'fpn_channels' not in hp:
                raise ValueError(f'{path} is not a detection checkpoint (a classifier? use '
                                 f'visionpe.train.load_model_from_checkpoint)')
            det_kw = {**{k: hp[k] for k in _HPARAM_ARGS if k in hp}, **det_kw}
            state = {k[len('detector.'):]: v for k, v in ckpt['state_dict'].items() if k.startswith('detector.')}
        else:
            state = ckpt.get('state_dict', ckpt)
            if not isinstance(state, dict):
                raise ValueError(f'{path} is neither a train.py checkpoint nor a state dict')
    if backbone_kw:
        det_kw['model_kwargs'] = {**(det_kw.get('model_kwargs') or {}), **backbone_kw}
    if 'num_classes' not in det_kw:
        raise ValueError('num_classes is needed to build a detector without a train.py checkpoint '
                         '(max category id + 1: 91 for COCO, 11 for the Fashion-MNIST set)')
    det_kw.setdefault('model_kwargs', {})
    if isinstance(det_kw.get('mean'), list):
        det_kw['mean'], det_kw['std'] = tuple(det_kw['mean']), tuple(det_kw['std'])
    model = build_detector(model_name, **det_kw)
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise RuntimeError(f'{checkpoint}: weights do not fit the detector on {model_name} '
                               f'{det_kw.get("model_kwargs")}: {str(e)[:1000]}') from e
        if missing or unexpected:
            raise RuntimeError(f'{checkpoint}: weights do not fit the detector on {model_name}: missing '
                               f'{missing[:5]}, unexpected {unexpected[:5]}')
    return model.eval()


@torch.no_grad()
def evaluate_detection(model: nn.Module, data_root: str, size: int, batch_size: int = 8,
                       device: Union[str, torch.device] = 'cpu', max_images: Optional[int] = None) -> Dict[str, float]:
    """COCO AP of ``model`` on ``data_root``'s val split at test shorter side ``size``.

    Returns ``AP, AP50, AP75, APs, APm, APl, images_per_s, peak_mem_mb`` (``max_images``: the first N
    val images, else all). The model's own test size is restored afterwards."""
    from ..benchmark import peak_memory
    if batch_size < 1:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    if str(data_root).startswith('coco:'):
        data_root = str(data_root)[len('coco:'):]
    device = torch.device(device)
    ds = CocoDetectionSet(data_root, 'val', eval_transform(), max_images)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=detection_collate)
    old = (model.transform.min_size, model.transform.max_size)
    was_training = model.training
    model.eval().to(device)
    set_test_size(model, size)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    try:
        results: List[Dict[str, Any]] = []
        seconds, n_images, first = 0.0, 0, None
        for i, (images, targets) in enumerate(loader):
            images = [im.to(device) for im in images]
            if i == 0:
                first = images
                model(images)  # warm-up (caches, kernels): not timed
            sync()
            t0 = time.perf_counter()
            outputs = model(images)
            sync()
            seconds += time.perf_counter() - t0
            n_images += len(images)
            results += to_coco_results(outputs, [int(t['image_id']) for t in targets])
        if first is None:
            raise ValueError(f'{data_root}: the val split has no images')
        with peak_memory(device) as mem:
            model(first)
        stats = coco_ap(ds.coco, results, ds.ids)
    finally:
        model.transform.min_size, model.transform.max_size = old
        model.train(was_training)
    return {**stats, 'images_per_s': n_images / seconds, 'peak_mem_mb': mem.mib}
