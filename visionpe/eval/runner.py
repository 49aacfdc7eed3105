"""The two tasks of the sweep engine (:mod:`.engine`): classification and COCO detection.

Classification metrics per row: ``top1`` / ``top5`` (percent; top-k with ``k = min(5, classes)``), ``loss``
(mean cross-entropy, which moves with any change of the logits), ``images_per_s`` (model forward only,
first batch excluded as warm-up when there are several) and ``peak_mem_mb`` (one forward of the first
batch: CUDA max allocated, or peak live tensor storage on CPU, :func:`visionpe.benchmark.peak_memory`);
``n_images`` evaluated and ``n_unreadable`` skipped (image folders: unreadable files are skipped, counted
and listed, and the run fails past ``max_bad_fraction``).

Detection (``task='coco'``) calls ``visionpe.det.evaluate`` (``load_detector`` / ``evaluate_detection``)
and reports COCO AP as the headline.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..benchmark import peak_memory
from ..models._base import nearest_multiples
from .data import FMNIST, DataSpec, EvalImages, Size, num_classes_of, parse_data, parse_size, size_text
from .engine import Case, EvalResult, Plan, Task, sweep
from .models import KnobSpace, ModelSource, known_knobs, patch_size_of, setting_patch_size, train_resolution

__all__ = ['EvalConfig', 'EvalResult', 'run_eval', 'evaluate_classifier', 'check_resolutions', 'TASKS',
           'CLS_METRICS', 'COCO_METRICS', 'CPU_FMNIST_SUBSET', 'ClassificationTask', 'DetectionTask',
           'TASK_TYPES']

log = logging.getLogger(__name__)
CLS_METRICS = ('top1', 'top5', 'loss', 'images_per_s', 'peak_mem_mb')
COCO_METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'images_per_s', 'peak_mem_mb')
CPU_FMNIST_SUBSET = 2000  # Fashion-MNIST on a CPU: a fixed 2,000-image test subset (full 10k on a GPU)
ALL = 'all'  # --max-images all: every image, on any device
MAX_BAD_FRACTION = 0.001  # as training (--data.max_bad_fraction)


@dataclass
class EvalConfig:
    models: list[ModelSource]
    data: str = FMNIST
    resolutions: Sequence[int | str | Size] = (32, 48, 64, 96, 128)  # N (square), 'HxW' or (h, w)
    task: str = 'cls'
    crop_ratio: float | None = None     # image folders: default 1.0 (RoPE-ViT); must stay unset for fmnist
    batch_size: int = 256
    max_images: int | str | None = None  # None: all (Fashion-MNIST on CPU: CPU_FMNIST_SUBSET); 'all': all, always
    device: str = 'auto'
    knobs: KnobSpace = field(default_factory=KnobSpace)
    train_res: int | str | Size | None = None  # N or HxW: overrides the training size found in the checkpoint
    workers: int = 2
    progress: bool = True
    max_bias_mb: float = 1024.0            # attention bias budget (visionpe.attention.bias_budget)
    max_bad_fraction: float = MAX_BAD_FRACTION  # image folders: fail when more images than this are unreadable
    per_image: bool = False             # classification: each row gets ``correct`` (per-image top-1, packed bits)
    keep_aspect: bool = False           # image folders: sizes are the shorter side, no crop, batched by shape


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
def evaluate_classifier(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        device: torch.device, topk: int = 5, per_image: bool = False) -> dict[str, Any]:
    """Top-1 / top-k accuracy (%), mean cross-entropy, images/s and peak memory of ``model`` on ``batches``;
    ``per_image``: also ``correct``, the top-1 correctness of every image in batch order, packed
    (:func:`visionpe.study.stats.pack_correct`)."""
    n = c1 = ck = 0
    hits: list[torch.Tensor] = []
    loss = 0.0
    times: list[tuple[int, float]] = []
    first: torch.Tensor | None = None
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
        if per_image:
            hits.append(hit[:, 0].cpu())
        ck += int(hit.any(-1).sum())
        loss += float(F.cross_entropy(logits.float(), y, reduction='sum'))
        n += x.shape[0]
    if n == 0:
        raise ValueError('the dataset yielded no images')
    timed = times[1:] if len(times) > 1 else times
    seconds = sum(t for _, t in timed)
    with peak_memory(device) as pm:
        model(first)
    out = dict(top1=100.0 * c1 / n, top5=100.0 * ck / n, loss=loss / n,
               images_per_s=sum(b for b, _ in timed) / seconds if seconds > 0 else float('inf'),
               peak_mem_mb=pm.mib, n_images=n)
    if per_image:
        from ..study.stats import pack_correct
        out['correct'] = pack_correct(torch.cat(hits).numpy())
    return out


def check_resolutions(resolutions: Sequence[int | str | Size], patch: tuple[int, int] | None, who: str) -> None:
    """Every size (``N``, ``'HxW'`` or (h, w)) must be positive and, per axis, a multiple of the patch size
    (else the patch grid would drop pixels)."""
    sizes = [parse_size(r) for r in resolutions]
    for h, w in sizes:
        if h <= 0 or w <= 0:
            raise ValueError(f'--resolutions must be positive, got {size_text((h, w))}')
    if patch is None:
        return
    bad = [(h, w) for h, w in sizes if h % patch[0] or w % patch[1]]
    if bad:
        def near(v: int, p: int) -> str:
            return ' or '.join(map(str, nearest_multiples(v, p)))
        sugg = '; '.join(f'{h} -> {near(h, max(patch))}' if h == w else
                         f'{size_text((h, w))} -> height {near(h, patch[0])}, width {near(w, patch[1])}'
                         for h, w in bad)
        shown = [h if h == w else size_text((h, w)) for h, w in bad]
        raise ValueError(f'resolution(s) {shown} not a multiple of the patch size {patch[0]}x{patch[1]} of {who} '
                         f'(per axis); nearest valid sizes: {sugg}')


def _norm_stats(info: dict[str, Any], spec: DataSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def _check_common(cfg: EvalConfig) -> DataSpec:
    if cfg.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    if not cfg.models:
        raise ValueError('no model to evaluate: pass --models NAME ... (and --checkpoints PATH ...)')
    if not cfg.resolutions:
        raise ValueError('no resolution: pass --resolutions R ...')
    cfg.resolutions = [parse_size(r) for r in cfg.resolutions]  # N / 'HxW' -> (h, w); a bad one fails here
    check_resolutions(cfg.resolutions, None, '')
    if cfg.batch_size <= 0:
        raise ValueError(f'--batch-size must be positive, got {cfg.batch_size}')
    if cfg.max_images not in (None, ALL) and (not isinstance(cfg.max_images, int) or cfg.max_images <= 0):
        raise ValueError(f'--max-images must be a positive number or "all", got {cfg.max_images!r}')
    if not 0 <= cfg.max_bad_fraction <= 1:
        raise ValueError(f'--max-bad-fraction must be in [0, 1], got {cfg.max_bad_fraction}')
    cfg.knobs.validate()
    spec = parse_data(cfg.data, cfg.task)
    for src in cfg.models:
        src.check(cfg.task)
    return spec


def run_eval(cfg: EvalConfig, on_row: Callable[[dict[str, Any]], None] | None = None,
             reuse: Sequence[dict[str, Any]] = ()) -> EvalResult:
    """Evaluate every model x knob setting x resolution (:func:`visionpe.eval.engine.sweep` with the task of
    ``cfg.task``); ``reuse``: rows of an earlier run of the same sweep, taken instead of measured again."""
    spec = _check_common(cfg)
    task = TASK_TYPES[cfg.task](cfg, spec)
    return sweep(task, cfg.models, cfg.resolutions, cfg.knobs, train_res=cfg.train_res, max_bias_mb=cfg.max_bias_mb,
                 progress=cfg.progress, on_row=on_row, reuse=reuse, device=task.model_device)


class ClassificationTask(Task):
    """Top-1 / top-5 / loss on an image folder or Fashion-MNIST (:func:`evaluate_classifier`)."""
    name, headline, metrics = 'cls', 'top1', CLS_METRICS

    def __init__(self, cfg: EvalConfig, spec: DataSpec):
        if spec.kind == FMNIST and cfg.crop_ratio not in (None, 1.0):
            raise ValueError('--crop-ratio does not apply to --data fmnist: as in training, the whole 28x28 image '
                             'is resized to each resolution (visionpe.data.fashion_mnist.eval_transform); drop the '
                             'option')
        self.cfg, self.spec = cfg, spec
        self.device = self.model_device = resolve_device(cfg.device)
        self.max_images = None if cfg.max_images == ALL else cfg.max_images
        if cfg.max_images is None and spec.kind == FMNIST and self.device.type == 'cpu':
            self.max_images = CPU_FMNIST_SUBSET
        self.n_classes = num_classes_of(spec)
        self.per_image = cfg.per_image
        self.n_per_image: int | None = None  # images of the first per-image row: every row must have as many
        self.images = EvalImages(spec, self.max_images, cfg.batch_size, crop_ratio=cfg.crop_ratio or 1.0,
                                 workers=cfg.workers, max_bad_fraction=cfg.max_bad_fraction,
                                 keep_aspect=cfg.keep_aspect)
        self.resize = 'short_side' if cfg.keep_aspect else None
        if cfg.keep_aspect:
            shown = [size_text(s) for s in map(parse_size, cfg.resolutions) if s[0] != s[1]]
            if shown:
                raise ValueError(f'--keep-aspect: sizes are the shorter side of each image; give N, not {shown}')

    def build(self, source: ModelSource, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
        return source.build(self.n_classes, **overrides)

    def train_size(self, model: nn.Module, info: dict[str, Any]) -> tuple[int, int] | None:
        return train_resolution(model, info)

    def check(self, plan: Plan) -> None:
        """Every size against the patch size of every setting (its own, or one a knob sets); ``--keep-aspect``:
        longer sides are rounded to a multiple of every such patch size (their lcm)."""
        for knobs in plan.settings:
            knob_patch = setting_patch_size(knobs, plan.support)
            patch = knob_patch or patch_size_of(plan.model)
            who = f'{plan.source.name} [{knobs.label()}]' if knob_patch else plan.source.name
            check_resolutions(self.cfg.resolutions, patch, who)
            if patch is not None:
                self.images.multiple = math.lcm(self.images.multiple, *patch)

    def expected_images(self) -> int | None:
        return self.images.n_requested

    def measure(self, model: nn.Module, case: Case) -> dict[str, Any]:
        mean, std = _norm_stats(case.plan.info, self.spec)
        batches = self.images.batches(case.size, mean, std, case.plan.info.get('interpolation') or 'bicubic')
        m = evaluate_classifier(model, batches, self.device, per_image=self.per_image)
        if self.per_image and self.resize:  # batched by shape: back to test-set order, so rows pair image by image
            from ..study.stats import pack_correct, unpack_correct
            m['correct'] = pack_correct(self.images.in_test_set_order(unpack_correct(m['correct'], m['n_images'])))
        if self.per_image:  # the same images in the same order for every row (fixed subset; unreadable ones
            # are dropped from the first pass on), so rows pair image by image across models and sizes
            if self.n_per_image is None:
                self.n_per_image = m['n_images']
            elif m['n_images'] != self.n_per_image:
                raise RuntimeError(f'--per-image: {case.label} at {size_text(case.size)} saw {m["n_images"]} images, '
                                   f'earlier rows {self.n_per_image}: the rows would not pair image by image')
        out = {**m, 'n_unreadable': self.images.n_unreadable}
        return {**out, 'resize': self.resize} if self.resize else out

    def model_meta(self, plan: Plan) -> dict[str, Any]:
        mean, std = _norm_stats(plan.info, self.spec)
        return dict(mean=list(mean), std=list(std), epoch=plan.info.get('epoch'),
                    global_step=plan.info.get('global_step'))

    def meta(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        where = 'CUDA max allocated' if self.device.type == 'cuda' else 'peak live tensor storage, CPU'
        return dict(data=self.spec.describe(), data_root=self.spec.root,
                    n_images=rows[0]['n_images'] if rows else 0, max_images=self.max_images,
                    subset_note=_subset_note(self.spec, self.max_images, self.device),
                    preprocessing=_preprocessing(self.spec, self.cfg.crop_ratio or 1.0, self.images),
                    batch_size=self.cfg.batch_size, unreadable_images=self.images.report(),
                    metrics_note='top1/top5 in %, top-k with k = min(5, classes); loss: mean cross-entropy; '
                                 'images_per_s: model forward only (first batch excluded when there are several); '
                                 f'peak_mem_mb: one forward of the first batch ({where})',
                    device=device_description(self.device))


class DetectionTask(Task):
    """COCO AP of a detector (``visionpe.det.evaluate``: ``load_detector`` / ``evaluate_detection``) per
    (model, shorter side)."""
    name, headline, metrics = 'coco', 'AP', COCO_METRICS
    model_device = None  # evaluate_detection moves the model

    def __init__(self, cfg: EvalConfig, spec: DataSpec):
        if any(cfg.knobs['temperature']):
            raise ValueError('--temperature is not supported with --task coco (the detector sees many sequence '
                             'lengths per image); drop it')
        if cfg.crop_ratio not in (None, 1.0):
            raise ValueError('--crop-ratio does not apply to --task coco (images are resized by their shorter side)')
        if cfg.keep_aspect:
            raise ValueError('--keep-aspect: --task coco keeps the aspect ratio already (sizes are the shorter side); '
                             'drop the option')
        patch_knobs = [k.option for n, k in known_knobs().items()
                       if k.patch is not None and any(v != k.default for v in cfg.knobs[n])]
        if patch_knobs:
            raise ValueError(f"{', '.join(patch_knobs)} does not apply to --task coco (the detector's feature pyramid "
                             f"is built for the trained patch stride); drop it")
        rect = [size_text(hw) for hw in map(parse_size, cfg.resolutions) if hw[0] != hw[1]]
        if rect:
            raise ValueError(f'--task coco: sizes are the shorter side of each image (aspect kept, as COCO does), so '
                             f'HxW sizes {rect} do not apply; give single numbers (e.g. 512 800)')
        if cfg.per_image:
            raise ValueError('--per-image is for classification (per-image top-1); drop it with --task coco')
        if cfg.max_images == ALL:
            cfg.max_images = None
        self.cfg, self.spec = cfg, spec
        self.device = resolve_device(cfg.device)

    def build(self, source: ModelSource, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
        from ..det.evaluate import load_detector  # lazy: the detection stack is optional here
        ckpt = source.checkpoint if source.checkpoint != 'random' else None
        return load_detector(source.name, ckpt, **{**source.kwargs, **overrides}), {}

    def expected_images(self) -> int | None:
        return self.cfg.max_images

    def measure(self, model: nn.Module, case: Case) -> dict[str, Any]:
        from ..det.evaluate import evaluate_detection
        m = evaluate_detection(model, self.spec.root, case.size[0], self.cfg.batch_size, self.device,
                               self.cfg.max_images)
        missing = [k for k in COCO_METRICS if k not in m]
        if missing:
            raise KeyError(f'evaluate_detection returned no {missing} (got {sorted(m)})')
        return {**{k: float(m[k]) for k in COCO_METRICS}, 'n_images': m.get('n_images', self.cfg.max_images)}

    def meta(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(data=self.spec.describe(), data_root=self.spec.root, max_images=self.cfg.max_images,
                    subset_note=_subset_note(self.spec, self.cfg.max_images, self.device),
                    preprocessing='resize the shorter side to r (the detector\'s own transform)',
                    batch_size=self.cfg.batch_size,
                    metrics_note='COCO AP (pycocotools COCOeval); resolutions are the shorter side',
                    device=device_description(self.device))


#: ``--task`` name -> its :class:`Task` (a new task: a subclass and one entry here)
TASK_TYPES: dict[str, type] = {'cls': ClassificationTask, 'coco': DetectionTask}
TASKS = tuple(TASK_TYPES)


def _subset_note(spec: DataSpec, max_images: int | None, device: torch.device) -> str:
    if max_images is None:
        return 'all images'
    why = ' (default for Fashion-MNIST on a CPU; --max-images to change)' if (
        spec.kind == FMNIST and device.type == 'cpu' and max_images == CPU_FMNIST_SUBSET) else ''
    return f'fixed subset of {max_images} images{why}'


def _preprocessing(spec: DataSpec, crop_ratio: float, images: EvalImages | None = None) -> str:
    if images is not None and images.keep_aspect:
        return (f'--keep-aspect: resize the shorter side to r, the longer side to r times the aspect ratio rounded '
                f'to a multiple of {images.multiple} (the patch sizes); no crop; batches of one shape; normalise')
    if spec.kind == FMNIST:
        return ('Fashion-MNIST training convention: the whole 28x28 image resized to h x w (bilinear, antialiased), '
                'repeated to 3 channels, normalised; no crop')
    return (f'square r: resize short side to r / {crop_ratio:g}, centre-crop r x r; HxW: centre-crop the largest '
            f'region of aspect H:W (times {crop_ratio:g}), resize to H x W; normalise')


def device_description(device: torch.device) -> str:
    import os
    import platform
    if device.type == 'cuda':
        return f'cuda: {torch.cuda.get_device_name(device)}'
    return f'cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads'


