"""The sweep: every (model, knob setting, resolution), with a progress bar, into report rows.

Classification metrics per row: ``top1`` / ``top5`` (percent; top-k with ``k = min(5, classes)``), ``loss``
(mean cross-entropy, which moves with any change of the logits), ``images_per_s`` (model forward only,
first batch excluded as warm-up when there are several) and ``peak_mem_mb`` (one forward of the first
batch: CUDA max allocated, or peak live tensor storage on CPU, :func:`visionpe.benchmark.peak_memory`).

Detection (``task='coco'``) calls ``visionpe.det.evaluate`` (``load_detector`` / ``evaluate_detection``)
and reports COCO AP as the headline.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import bias_budget
from ..benchmark import peak_memory
from ..models._base import nearest_multiples
from .data import FMNIST, DataSpec, eval_batches, num_classes_of, parse_data
from .models import (Knobs, KnobSpace, ModelSource, apply_knobs, build_overrides, expand_knobs, knob_support,
                     measure_tokens, patch_size_of, train_resolution)

__all__ = ['EvalConfig', 'EvalResult', 'run_eval', 'evaluate_classifier', 'check_resolutions', 'TASKS',
           'CLS_METRICS', 'COCO_METRICS', 'CPU_FMNIST_SUBSET']

log = logging.getLogger(__name__)
TASKS = ('cls', 'coco')
CLS_METRICS = ('top1', 'top5', 'loss', 'images_per_s', 'peak_mem_mb')
COCO_METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'images_per_s', 'peak_mem_mb')
CPU_FMNIST_SUBSET = 2000  # Fashion-MNIST on a CPU: a fixed 2,000-image test subset (full 10k on a GPU)


@dataclass
class EvalConfig:
    models: List[ModelSource]
    data: str = FMNIST
    resolutions: Sequence[int] = (32, 48, 64, 96, 128)
    task: str = 'cls'
    crop_ratio: Optional[float] = None     # image folders: default 1.0 (RoPE-ViT); must stay unset for fmnist
    batch_size: int = 256
    max_images: Optional[int] = None       # None: all (Fashion-MNIST on CPU: CPU_FMNIST_SUBSET)
    device: str = 'auto'
    knobs: KnobSpace = field(default_factory=KnobSpace)
    train_res: Optional[int] = None        # overrides the training resolution found in the checkpoint
    workers: int = 2
    progress: bool = True
    max_bias_mb: float = 1024.0            # attention bias budget (visionpe.attention.bias_budget)


@dataclass
class EvalResult:
    rows: List[Dict[str, Any]]
    meta: Dict[str, Any]
    headline: str
    metrics: Tuple[str, ...]


def resolve_device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dev = torch.device(name)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name}: CUDA is not available here; use --device cpu')
    return dev


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@torch.inference_mode()
def evaluate_classifier(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                        device: torch.device, topk: int = 5) -> Dict[str, float]:
    """Top-1 / top-k accuracy (%), mean cross-entropy, images/s and peak memory of ``model`` on ``batches``."""
    n = c1 = ck = 0
    loss = 0.0
    times: List[Tuple[int, float]] = []
    first: Optional[torch.Tensor] = None
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        logits = model(x)
        _sync(device)
        times.append((x.shape[0], time.perf_counter() - t0))
        if first is None:
            first = x
        k = min(topk, logits.shape[-1])
        hit = logits.topk(k, dim=-1).indices.eq(y[:, None])
        c1 += int(hit[:, 0].sum())
        ck += int(hit.any(-1).sum())
        loss += float(F.cross_entropy(logits.float(), y, reduction='sum'))
        n += x.shape[0]
    if n == 0:
        raise ValueError('the dataset yielded no images')
    timed = times[1:] if len(times) > 1 else times
    seconds = sum(t for _, t in timed)
    with peak_memory(device) as pm:
        model(first)
    return dict(top1=100.0 * c1 / n, top5=100.0 * ck / n, loss=loss / n,
                images_per_s=sum(b for b, _ in timed) / seconds if seconds > 0 else float('inf'),
                peak_mem_mb=pm.mib, n_images=n)


def check_resolutions(resolutions: Sequence[int], patch: Optional[Tuple[int, int]], who: str) -> None:
    """Every resolution must be a multiple of the patch size (else the patch grid would drop pixels)."""
    for r in resolutions:
        if r <= 0:
            raise ValueError(f'--resolutions must be positive, got {r}')
    if patch is None:
        return
    bad = [r for r in resolutions if r % patch[0] or r % patch[1]]
    if bad:
        sugg = '; '.join(f'{r} -> {" or ".join(map(str, nearest_multiples(r, max(patch))))}' for r in bad)
        raise ValueError(f'resolution(s) {bad} not a multiple of the patch size {patch[0]}x{patch[1]} of {who}; '
                         f'nearest valid sizes: {sugg}')


def _label(src: ModelSource, knobs: Knobs, names: List[str]) -> str:
    base = src.name
    if names.count(src.name) > 1 and src.checkpoint:
        from pathlib import Path
        base = f'{src.name} ({Path(src.checkpoint).stem})'
    k = knobs.label()
    return f'{base} [{k}]' if k else base


def _norm_stats(info: Dict[str, Any], spec: DataSpec) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Normalisation: the checkpoint's training statistics (``train.py``), else Fashion-MNIST's for
    ``fmnist``, else the model's ``pretrained_cfg``, else ImageNet's."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from ..data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
    if info.get('img_size') is not None and info.get('mean') and info.get('std'):  # a train.py checkpoint
        return tuple(info['mean']), tuple(info['std'])
    if spec.kind == FMNIST:
        return FMNIST_MEAN, FMNIST_STD
    if info.get('mean') and info.get('std'):
        return tuple(info['mean']), tuple(info['std'])
    return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def _prepare(cfg: EvalConfig) -> Tuple[DataSpec, torch.device, Optional[int]]:
    if cfg.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    if not cfg.models:
        raise ValueError('no model to evaluate: pass --models NAME ... (and --checkpoints PATH ...)')
    if not cfg.resolutions:
        raise ValueError('no resolution: pass --resolutions R ...')
    if cfg.batch_size <= 0:
        raise ValueError(f'--batch-size must be positive, got {cfg.batch_size}')
    if cfg.max_images is not None and cfg.max_images <= 0:
        raise ValueError(f'--max-images must be positive, got {cfg.max_images}')
    cfg.knobs.validate()
    spec = parse_data(cfg.data, cfg.task)
    if spec.kind == FMNIST and cfg.crop_ratio not in (None, 1.0):
        raise ValueError('--crop-ratio does not apply to --data fmnist: as in training, the whole 28x28 image is '
                         'resized to each resolution (visionpe.data.fashion_mnist.eval_transform); drop the option')
    for src in cfg.models:
        src.check()
    device = resolve_device(cfg.device)
    max_images = cfg.max_images
    if max_images is None and spec.kind == FMNIST and device.type == 'cpu':
        max_images = CPU_FMNIST_SUBSET
    return spec, device, max_images


def row_key(row: Dict[str, Any]) -> Tuple[str, str, int, int]:
    """What identifies a measured row for reuse: label, checkpoint, resolution, number of images."""
    return row['label'], str(row['checkpoint']), int(row['resolution']), int(row['n_images'])


def run_eval(cfg: EvalConfig, on_row: Optional[Callable[[Dict[str, Any]], None]] = None,
             reuse: Sequence[Dict[str, Any]] = ()) -> EvalResult:
    """Evaluate every model x knob setting x resolution; the rows and the run's metadata.

    ``reuse``: rows of an earlier run of the same sweep (``rows.partial.jsonl``); a (model, setting,
    resolution) with a row of the same label, checkpoint and image count is taken from it, not re-measured.
    """
    spec, device, max_images = _prepare(cfg)
    if cfg.task == 'coco':
        if reuse:
            raise ValueError('--resume reuses classification rows only; rerun the COCO sweep without it')
        return _run_coco(cfg, spec, device, max_images, on_row)
    from tqdm.auto import tqdm
    n_classes = num_classes_of(spec)
    names = [s.name for s in cfg.models]
    plans = []  # (source, base model, info, support, knob settings, train_hw, notes)
    for src in cfg.models:  # build everything once first: every bad input fails before any long work
        model, info = src.build(n_classes)
        check_resolutions(cfg.resolutions, patch_size_of(model), src.name)
        train_hw = (cfg.train_res, cfg.train_res) if cfg.train_res else train_resolution(model, info)
        support = knob_support(model)
        combos, notes = expand_knobs(cfg.knobs, support)
        if cfg.task == 'cls' and any(k.temperature for k in combos) and train_hw is None:
            raise ValueError(f'{src.name}: the temperature knob needs the training resolution; pass --train-res')
        plans.append([src, model, info, support, combos, train_hw, notes])
    total = sum(len(p[4]) for p in plans) * len(cfg.resolutions)
    rows: List[Dict[str, Any]] = []
    skipped: List[Dict[str, Any]] = []
    models_meta = []
    bar = tqdm(total=total, desc='eval', unit='run', disable=not cfg.progress, dynamic_ncols=True)
    earlier = {row_key(r): r for r in reuse}
    for src, base, info, support, combos, train_hw, notes in plans:
        mean, std = _norm_stats(info, spec)
        interp = info.get('interpolation') or 'bicubic'
        models_meta.append(dict(name=src.name, checkpoint=src.checkpoint, kwargs=src.kwargs,
                                train_res=list(train_hw) if train_hw else None, knobs=sorted(support),
                                notes=notes, mean=list(mean), std=list(std),
                                epoch=info.get('epoch'), global_step=info.get('global_step')))
        for knobs in combos:
            label = _label(src, knobs, names)
            overrides = build_overrides(knobs, support)
            try:
                model = base if not overrides and base is not None else src.build(n_classes, **overrides)[0]
            except (TypeError, ValueError) as e:  # e.g. a coordinate mode this encoding rejects
                skipped.append(dict(label=label, reason=str(e)))
                log.warning('skipping %s: %s', label, e)
                bar.update(len(cfg.resolutions))
                continue
            if model is base:
                base = None  # the base model is used once; later settings get a fresh build
            model.to(device).eval()
            ref_tokens = measure_tokens(model, train_hw, device) if knobs.temperature else None
            backend = knobs.backend
            for r in cfg.resolutions:
                bar.set_postfix_str(f'{label} @ {r}px')
                batches, n_images = eval_batches(spec, r, cfg.batch_size, max_images, mean, std,
                                                 crop_ratio=cfg.crop_ratio or 1.0, interpolation=interp,
                                                 workers=cfg.workers)
                old = earlier.get((label, str(src.checkpoint), r, n_images))
                if old is not None:
                    m = {k: old[k] for k in CLS_METRICS + ('n_images',) if k in old}
                else:
                    apply_knobs(model, knobs, (r, r), train_hw, ref_tokens)
                    with _backend_ctx(backend), bias_budget(cfg.max_bias_mb):
                        m = evaluate_classifier(model, batches, device)
                row = dict(label=label, model=src.name, checkpoint=src.checkpoint, **knobs.as_dict(),
                           resolution=r, train_res=train_hw[0] if train_hw else None, **m)
                rows.append(row)
                if on_row:
                    on_row(row)
                bar.update(1)
            del model
    bar.close()
    meta = dict(task='cls', data=spec.describe(), data_root=spec.root, n_images=rows[0]['n_images'] if rows else 0,
                max_images=max_images, subset_note=_subset_note(spec, max_images, device),
                preprocessing=_preprocessing(spec, cfg.crop_ratio or 1.0), batch_size=cfg.batch_size,
                resolutions=list(cfg.resolutions), models=models_meta, skipped=skipped,
                knob_space={k: list(v) for k, v in vars(cfg.knobs).items()},
                metrics_note='top1/top5 in %, top-k with k = min(5, classes); loss: mean cross-entropy; '
                             'images_per_s: model forward only (first batch excluded when there are several); '
                             'peak_mem_mb: one forward of the first batch ('
                             + ('CUDA max allocated' if device.type == 'cuda' else 'peak live tensor storage, CPU')
                             + ')',
                device=device_description(device))
    return EvalResult(rows, meta, 'top1', CLS_METRICS)


def _backend_ctx(backend: Optional[str]):
    if backend is None:
        return contextlib.nullcontext()
    from ..attention import use_backend
    return use_backend(backend)


def _subset_note(spec: DataSpec, max_images: Optional[int], device: torch.device) -> str:
    if max_images is None:
        return 'all images'
    why = ' (default for Fashion-MNIST on a CPU; --max-images to change)' if (
        spec.kind == FMNIST and device.type == 'cpu' and max_images == CPU_FMNIST_SUBSET) else ''
    return f'fixed subset of {max_images} images{why}'


def _preprocessing(spec: DataSpec, crop_ratio: float) -> str:
    if spec.kind == FMNIST:
        return ('Fashion-MNIST training convention: the whole 28x28 image resized to r x r (bilinear, antialiased), '
                'repeated to 3 channels, normalised; no crop')
    return f'resize short side to r / {crop_ratio:g}, centre-crop r x r, normalise'


def device_description(device: torch.device) -> str:
    import os
    import platform
    if device.type == 'cuda':
        return f'cuda: {torch.cuda.get_device_name(device)}'
    return f'cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads'


# ---------------------------------------------------------------------------------------------- COCO
def _run_coco(cfg: EvalConfig, spec: DataSpec, device: torch.device, max_images: Optional[int],
              on_row: Optional[Callable[[Dict[str, Any]], None]]) -> EvalResult:
    """Detection: ``visionpe.det.evaluate.load_detector`` / ``evaluate_detection`` per (model, short side)."""
    from tqdm.auto import tqdm
    if any(cfg.knobs.temperature):
        raise ValueError('--temperature is not supported with --task coco (the detector sees many sequence '
                         'lengths per image); drop it')
    if cfg.crop_ratio not in (None, 1.0):
        raise ValueError('--crop-ratio does not apply to --task coco (images are resized by their shorter side)')
    from ..det.evaluate import evaluate_detection, load_detector  # lazy: the detection stack is optional here
    names = [s.name for s in cfg.models]
    rows: List[Dict[str, Any]] = []
    skipped: List[Dict[str, Any]] = []
    models_meta = []
    plans = []
    for src in cfg.models:
        det = load_detector(src.name, src.checkpoint if src.checkpoint != 'random' else None, **src.kwargs)
        support = knob_support(det)
        combos, notes = expand_knobs(cfg.knobs, support)
        train_hw = (cfg.train_res, cfg.train_res) if cfg.train_res else None
        plans.append((src, det, support, combos, train_hw, notes))
        models_meta.append(dict(name=src.name, checkpoint=src.checkpoint, kwargs=src.kwargs,
                                train_res=list(train_hw) if train_hw else None, knobs=sorted(support), notes=notes))
    bar = tqdm(total=sum(len(p[3]) for p in plans) * len(cfg.resolutions), desc='eval coco', unit='run',
               disable=not cfg.progress, dynamic_ncols=True)
    for src, det, support, combos, train_hw, notes in plans:
        for knobs in combos:
            label = _label(src, knobs, names)
            overrides = build_overrides(knobs, support)
            try:
                model = det if not overrides and det is not None else load_detector(
                    src.name, src.checkpoint if src.checkpoint != 'random' else None, **{**src.kwargs, **overrides})
            except (TypeError, ValueError) as e:
                skipped.append(dict(label=label, reason=str(e)))
                bar.update(len(cfg.resolutions))
                continue
            if model is det:
                det = None
            for r in cfg.resolutions:
                bar.set_postfix_str(f'{label} @ {r}px')
                apply_knobs(model, knobs, (r, r), train_hw)
                with _backend_ctx(knobs.backend), bias_budget(cfg.max_bias_mb):
                    m = evaluate_detection(model, spec.root, r, cfg.batch_size, device, max_images)
                missing = [k for k in COCO_METRICS if k not in m]
                if missing:
                    raise KeyError(f'evaluate_detection returned no {missing} (got {sorted(m)})')
                row = dict(label=label, model=src.name, checkpoint=src.checkpoint, **knobs.as_dict(), resolution=r,
                           train_res=train_hw[0] if train_hw else None, **{k: float(m[k]) for k in COCO_METRICS},
                           n_images=m.get('n_images', max_images))
                rows.append(row)
                if on_row:
                    on_row(row)
                bar.update(1)
    bar.close()
    meta = dict(task='coco', data=spec.describe(), data_root=spec.root, max_images=max_images,
                subset_note=_subset_note(spec, max_images, device),
                preprocessing='resize the shorter side to r (the detector\'s own transform)',
                batch_size=cfg.batch_size, resolutions=list(cfg.resolutions), models=models_meta, skipped=skipped,
                knob_space={k: list(v) for k, v in vars(cfg.knobs).items()},
                metrics_note='COCO AP (pycocotools COCOeval); resolutions are the shorter side',
                device=device_description(device))
    return EvalResult(rows, meta, 'AP', COCO_METRICS)
