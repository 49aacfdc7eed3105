"""Lightning parts for detection: :class:`ObjectDetector` (FCOS on a zoo backbone, ViTDet recipe) and
:class:`DetectionData` (COCO 2017 layout, also the generated Fashion-MNIST set).

Recipe (ViTDet, Li et al. 2022): AdamW, lr 1e-4, weight decay 0.1, layer-wise lr decay over the ViT
blocks (timm's ``param_groups_layer_decay`` on the trunk; the pyramid and head at the full lr), linear
warmup then cosine (``timm.scheduler.CosineLRScheduler`` per optimizer step), large-scale jitter in the
data (``lsj_size``). Validation: COCO AP through pycocotools on the ``val`` split at ``img_size``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..train.callbacks import save_final_last_checkpoints
from ..train.module import with_warmup_cosine
from ..train.resume import ResumeCheck
from .data import CocoDetectionSet, coco_num_classes, detection_collate, eval_transform, train_transform
from .detector import build_detector

__all__ = ['ObjectDetector', 'DetectionData', 'detector_param_groups']


def detector_param_groups(detector: nn.Module, weight_decay: float, layer_decay: Optional[float]) -> List[Dict]:
    """Parameter groups: no weight decay on 1-D parameters and on the trunk's ``no_weight_decay()`` names;
    with ``layer_decay`` the trunk's groups get timm's per-layer ``lr_scale`` (the rest keeps 1.0)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay
    backbone = detector.backbone
    trunk = backbone.trunk if hasattr(backbone, 'trunk') else backbone.features
    skip = set(trunk.no_weight_decay()) if hasattr(trunk, 'no_weight_decay') else set()
    if layer_decay is not None and hasattr(trunk, 'group_matcher'):
        groups = param_groups_layer_decay(trunk, weight_decay, skip, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(trunk, weight_decay, skip)
    trunk_ids = {id(p) for p in trunk.parameters()}

    class _Rest(nn.Module):  # the detector minus the trunk, for the weight-decay split
        def __init__(self, params):
            super().__init__()
            self.p = nn.ParameterList(params)

    rest = [p for p in detector.parameters() if id(p) not in trunk_ids]
    groups += param_groups_weight_decay(_Rest(rest), weight_decay)
    return [g for g in groups if g['params']]


class ObjectDetector(ResumeCheck, pl.LightningModule):
    """FCOS on a zoo backbone (see :func:`visionpe.det.detector.build_detector`).

    Args:
        model_name: backbone (``vit_rope2d_small``, ``swin_tiny`` ...), optionally prefixed ``fcos_``.
        model_kwargs: backbone overrides (``{"embed_dim": 64, "depth": 2, ...}``).
        num_classes, img_size, mean, std: set from the data module by the CLI (``img_size``: training
            shorter side; validation runs at the same size).
        fpn_channels, strides, out_indices, abs_pos, head_convs: detector options.
        opt, lr, weight_decay, layer_decay, warmup_epochs, warmup_lr, min_lr, sched: the optimizer recipe.

    Resuming checks the options against the checkpoint's as :class:`visionpe.train.VisionClassifier` does;
    only ``score_thresh`` (evaluation) may differ.
    """

    RESUME_FREE = ('score_thresh',)
    RESUME_OPT_IN: tuple[str, ...] = ()

    def __init__(
            self,
            model_name: str = 'vit_ape_base',
            model_kwargs: Optional[Dict[str, Any]] = None,
            num_classes: int = 91,
            img_size: int = 1024,
            mean: Tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
            std: Tuple[float, float, float] = IMAGENET_DEFAULT_STD,
            fpn_channels: int = 256,
            strides: Optional[List[int]] = None,
            out_indices: Optional[List[int]] = None,
            abs_pos: str = 'interp',
            head_convs: int = 4,
            score_thresh: float = 0.05,
            opt: str = 'adamw',
            lr: float = 1e-4,
            weight_decay: float = 0.1,
            layer_decay: Optional[float] = None,
            opt_betas: Optional[Tuple[float, float]] = None,
            sched: str = 'cosine',
            warmup_epochs: float = 1.0,
            warmup_lr: float = 1e-6,
            min_lr: float = 1e-6,
    ) -> None:
        super().__init__()
        if sched not in ('cosine', 'none'):
            raise ValueError(f"sched must be 'cosine' or 'none', got {sched!r}")
        if lr <= 0:
            raise ValueError(f'lr must be positive, got {lr}')
        self.save_hyperparameters()
        self.detector = build_detector(model_name, num_classes, img_size, model_kwargs=model_kwargs,
                                       fpn_channels=fpn_channels, strides=strides, out_indices=out_indices,
                                       abs_pos=abs_pos, head_convs=head_convs, mean=tuple(mean), std=tuple(std),
                                       score_thresh=score_thresh)
        self._results: List[Dict[str, Any]] = []

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        return self.detector(images, targets)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.detector(images, [{'boxes': t['boxes'].as_subclass(torch.Tensor), 'labels': t['labels']}
                                        for t in targets])
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f'detection loss is {loss.item()} at step {self.global_step}: lower the lr, '
                                     f'use gradient clipping (--trainer.gradient_clip_val) or check the boxes')
        n = len(images)
        self.log('train/loss', loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for k, v in losses.items():
            self.log(f'train/{k}', v, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def on_train_end(self) -> None:
        save_final_last_checkpoints(self.trainer)

    # ------------------------------------------------------------------ validation: COCO AP
    def on_validation_epoch_start(self) -> None:
        self._results = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        from .evaluate import to_coco_results
        images, targets = batch
        outputs = self.detector(images)
        self._results += to_coco_results(outputs, [int(t['image_id']) for t in targets])

    def on_validation_epoch_end(self) -> None:
        from .evaluate import coco_ap
        dm = getattr(self.trainer, 'datamodule', None)
        if dm is None or dm.val_set is None:
            return
        results = self._results
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank's detections
            gathered: List[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        stats = coco_ap(dm.val_set.coco, results, dm.val_set.ids)
        for k, v in stats.items():
            self.log(f'val/{k}', v if math.isfinite(v) else -1.0, prog_bar=k == 'AP')  # same on every rank
        self._results = []

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2
        hp = self.hparams
        kwargs: Dict[str, Any] = {}
        if hp.opt_betas is not None:
            kwargs['betas'] = tuple(hp.opt_betas)
        groups = detector_param_groups(self.detector, hp.weight_decay, hp.layer_decay)
        optimizer = create_optimizer_v2(groups, opt=hp.opt, lr=hp.lr, weight_decay=hp.weight_decay, **kwargs)
        return with_warmup_cosine(self, optimizer)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)


class DetectionData(pl.LightningDataModule):
    """COCO 2017 layout at ``root`` (COCO itself, or the set of ``python -m visionpe.det.make_fmnist_coco``).

    Args:
        root: dataset root (``annotations/instances_{train,val}2017.json``, ``{train,val}2017/``).
        img_size: training / validation shorter side (linked to the model).
        lsj_size: large-scale jitter crop size (ViTDet: 1024; None: off), ``lsj_scale`` its range.
        hflip: horizontal-flip probability.
        train_subset, val_subset: first N images of each split (None: all).
        mean, std: normalisation (linked to the model); ``'fmnist'`` in ``dataset`` picks Fashion-MNIST's.
    """

    def __init__(self, root: str = 'data/coco', img_size: int = 1024, batch_size: int = 2, eval_batch_size: int = 8,
                 num_workers: int = 0, lsj_size: Optional[int] = None, lsj_scale: Tuple[float, float] = (0.1, 2.0),
                 hflip: float = 0.5, train_subset: Optional[int] = None, val_subset: Optional[int] = None,
                 dataset: str = 'coco', mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        from ..data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
        if dataset not in ('coco', 'fmnist'):
            raise ValueError(f"dataset must be 'coco' or 'fmnist', got {dataset!r}")
        self.root, self.img_size, self.batch_size = root, img_size, batch_size
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.lsj_size, self.lsj_scale, self.hflip = lsj_size, tuple(lsj_scale), hflip
        self.train_subset, self.val_subset, self.dataset = train_subset, val_subset, dataset
        fm = dataset == 'fmnist'
        self.mean = tuple(mean) if mean is not None else (FMNIST_MEAN if fm else IMAGENET_DEFAULT_MEAN)
        self.std = tuple(std) if std is not None else (FMNIST_STD if fm else IMAGENET_DEFAULT_STD)
        self.train_set: Optional[CocoDetectionSet] = None
        self.val_set: Optional[CocoDetectionSet] = None

    @property
    def num_classes(self) -> int:
        return coco_num_classes(self.root, 'val')

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, 'fit') and self.train_set is None:
            self.train_set = CocoDetectionSet(self.root, 'train', train_transform(self.lsj_size, self.lsj_scale,
                                                                                 self.hflip), self.train_subset)
        if self.val_set is None:
            self.val_set = CocoDetectionSet(self.root, 'val', eval_transform(), self.val_subset)

    def _loader(self, ds, batch_size: int, shuffle: bool):
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
                                           num_workers=self.num_workers, collate_fn=detection_collate,
                                           persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        self.setup('fit')
        return self._loader(self.train_set, self.batch_size, True)

    def val_dataloader(self):
        self.setup('validate')
        return self._loader(self.val_set, self.eval_batch_size, False)
