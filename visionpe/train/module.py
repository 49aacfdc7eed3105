"""LightningModule over any timm model: the DeiT-III / RoPE-ViT recipe from timm's own parts.

* model: ``timm.create_model(model_name, num_classes=..., img_size=..., **model_kwargs)``
  (``import visionpe`` registers the visionpe models; any timm name works);
* Mixup / CutMix: ``timm.data.Mixup`` (soft targets with label smoothing);
* loss: ``timm.loss.SoftTargetCrossEntropy`` (with mixup), ``LabelSmoothingCrossEntropy``, or
  ``BinaryCrossEntropy`` (DeiT-III's BCE) with ``bce_loss=True``;
* optimizer: ``timm.optim.create_optimizer_v2`` (``adamw``, ``lamb``, ``sgd``, ...) with timm's
  no-weight-decay groups: every 1-D parameter (norms, biases) and every name the model lists in
  ``no_weight_decay()`` (position tables, RoPE frequencies ...); optional layer-wise lr decay;
* schedule: ``timm.scheduler.CosineLRScheduler`` stepped per optimizer step with the absolute
  step count (``step_update(global_step)``), so a resumed run continues on the same curve;
* EMA: ``timm.utils.ModelEmaV3`` as the submodule ``model_ema`` (saved and restored with the
  checkpoint, evaluated next to the raw weights when ``ema_eval``);
* randomness: before each training step the global RNGs (python, numpy, torch: dropout, drop-path,
  mixup) are seeded from ``(seed, rank, epoch, batch_idx)``, so a resumed run draws what an
  uninterrupted one would without restoring generator states.
"""
from __future__ import annotations

import copy

import logging
import math
from typing import Any, Dict, Optional, Tuple

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..data.sampling import mix_seed, seed_everything_from
from .callbacks import save_final_last_checkpoints
from .resume import ResumeCheck

__all__ = ['VisionClassifier', 'build_model', 'with_warmup_cosine']

log = logging.getLogger(__name__)


def build_model(model_name: str, num_classes: int, img_size: Optional[int] = None,
                model_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """``timm.create_model`` for any timm or visionpe name; ``img_size`` is passed when the model takes it."""
    import timm
    import visionpe  # registers the visionpe models
    kwargs = dict(model_kwargs or {})
    if 'num_classes' in kwargs:
        raise ValueError('model_kwargs must not set num_classes: it comes from the data (--data.num_classes)')
    visionpe.check_model_name(model_name)
    user_size = 'img_size' in kwargs
    if img_size is not None and not user_size:
        kwargs['img_size'] = img_size
    try:
        return timm.create_model(model_name, num_classes=num_classes, **kwargs)
    except TypeError as e:
        if not user_size and 'img_size' in str(e):  # a model without an input size (e.g. a CNN)
            kwargs.pop('img_size')
            return timm.create_model(model_name, num_classes=num_classes, **kwargs)
        raise TypeError(f'{model_name}: bad model_kwargs {kwargs}: {e}') from e


def with_warmup_cosine(module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> Any:
    """``configure_optimizers``' return value for ``module.hparams.sched``: the optimizer alone (``'none'``) or
    with timm's ``CosineLRScheduler`` stepped per optimizer step: linear warm-up over ``warmup_epochs`` (from
    ``warmup_lr``), then cosine to ``min_lr`` over the rest of the run. A warm-up that is not shorter than the
    run (a smoke test with a few ``max_steps``) is clamped to half the run, with a warning."""
    from timm.scheduler import CosineLRScheduler
    hp = module.hparams
    if hp.sched == 'none':
        return optimizer
    trainer = module.trainer
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError('a cosine schedule needs a finite run: set --trainer.max_epochs or --trainer.max_steps')
    total = int(total)
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()  # the epoch length (not loaded when only max_steps is set)
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError('the training loader has no length: cannot convert warmup_epochs into steps')
    warmup = int(round(hp.warmup_epochs * math.ceil(batches / trainer.accumulate_grad_batches)))
    if total <= warmup:
        log.warning('the warm-up of %d steps (%s epochs) is not shorter than the run of %d optimizer steps: warming '
                    'up over %d steps (half the run) instead; lower --model.warmup_epochs to choose', warmup,
                    hp.warmup_epochs, total, total // 2)
        warmup = total // 2
    scheduler = CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=hp.min_lr, warmup_t=warmup,
                                  warmup_lr_init=hp.warmup_lr, warmup_prefix=True, t_in_epochs=False)
    return {'optimizer': optimizer, 'lr_scheduler': {'scheduler': scheduler, 'interval': 'step'}}


class VisionClassifier(ResumeCheck, pl.LightningModule):
    """Image classifier wrapping ``timm.create_model(model_name, **model_kwargs)``.

    Hyper-parameters (all saved in the checkpoint; ``visionpe.train.load_model_from_checkpoint``
    rebuilds the model from them):

    Args:
        model_name: timm / visionpe model name, e.g. ``vit_rope2d_tiny``.
        model_kwargs: keyword overrides for the model (``{"embed_dim": 96, "depth": 6, ...}``).
        num_classes, img_size, mean, std, dataset: set from the data module by the CLI.
        opt, lr, weight_decay, momentum, opt_eps, opt_betas, layer_decay: ``create_optimizer_v2``.
        warmup_epochs, warmup_lr, min_lr, sched: cosine schedule with linear warmup (``sched='none'``: constant).
        smoothing, bce_loss, bce_target_thresh: loss.
        mixup, cutmix, mixup_prob, mixup_switch_prob, mixup_mode: ``timm.data.Mixup`` (off at 0, 0).
        ema_decay, ema_warmup, ema_eval: ``ModelEmaV3`` (off at 0); ``ema_eval`` also validates the EMA.
        compile: ``torch.compile`` the model in place (``nn.Module.compile``: state-dict keys unchanged).
        grad_checkpointing: activation checkpointing through timm's ``set_grad_checkpointing``.
        seed: seed of the per-step RNG streams (dropout, drop-path, mixup).

    Resuming (``--ckpt_path``) checks the options against the checkpoint's
    (:func:`visionpe.train.resume.check_resume_hparams`): ``RESUME_FREE`` may differ, ``RESUME_OPT_IN`` may
    differ when named in ``allow_changed`` (``--allow_changed``), any other difference is an error.
    """

    RESUME_FREE = ('compile', 'grad_checkpointing', 'ema_eval')
    RESUME_OPT_IN = ('smoothing', 'bce_loss', 'bce_target_thresh', 'mixup', 'cutmix', 'mixup_prob',
                     'mixup_switch_prob', 'mixup_mode', 'seed')

    def __init__(
            self,
            model_name: str = 'vit_ape_tiny',
            model_kwargs: Optional[Dict[str, Any]] = None,
            num_classes: int = 1000,
            img_size: int = 224,
            mean: Tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
            std: Tuple[float, float, float] = IMAGENET_DEFAULT_STD,
            dataset: str = 'imagenet',
            opt: str = 'adamw',
            lr: float = 1e-3,
            weight_decay: float = 0.05,
            momentum: float = 0.9,
            opt_eps: Optional[float] = None,
            opt_betas: Optional[Tuple[float, float]] = None,
            layer_decay: Optional[float] = None,
            sched: str = 'cosine',
            warmup_epochs: float = 5.0,
            warmup_lr: float = 1e-6,
            min_lr: float = 1e-5,
            smoothing: float = 0.1,
            bce_loss: bool = False,
            bce_target_thresh: Optional[float] = None,
            mixup: float = 0.0,
            cutmix: float = 0.0,
            mixup_prob: float = 1.0,
            mixup_switch_prob: float = 0.5,
            mixup_mode: str = 'batch',
            ema_decay: float = 0.0,
            ema_warmup: bool = False,
            ema_eval: bool = True,
            compile: bool = False,
            grad_checkpointing: bool = False,
            seed: int = 0,
    ) -> None:
        super().__init__()
        if sched not in ('cosine', 'none'):
            raise ValueError(f"sched must be 'cosine' or 'none', got {sched!r}")
        if not 0 <= ema_decay < 1:
            raise ValueError(f'ema_decay must be in [0, 1) (0 disables EMA), got {ema_decay}')
        if lr <= 0:
            raise ValueError(f'lr must be positive, got {lr}')
        self.save_hyperparameters()
        self.hparams.update(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
        self._hparams_initial = copy.deepcopy(self._hparams)  # what Lightning logs and merges with the data's
        self.model = build_model(model_name, num_classes, img_size, model_kwargs)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.model_ema: Optional[nn.Module] = None
        if ema_decay > 0:
            from timm.utils import ModelEmaV3
            self.model_ema = ModelEmaV3(self.model, decay=ema_decay, use_warmup=ema_warmup)
            self.model_ema.requires_grad_(False)
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup
            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                                  switch_prob=mixup_switch_prob, mode=mixup_mode, label_smoothing=smoothing,
                                  num_classes=num_classes)
        self.train_loss = self._train_loss()
        self._stats: Dict[str, torch.Tensor] = {}


    # ------------------------------------------------------------------ setup
    def _train_loss(self) -> nn.Module:
        from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        hp = self.hparams
        if hp.bce_loss:
            # with mixup the targets are already smoothed by Mixup
            return BinaryCrossEntropy(smoothing=0.0 if self.mixup_fn else hp.smoothing,
                                      target_threshold=hp.bce_target_thresh)
        if self.mixup_fn is not None:
            return SoftTargetCrossEntropy()
        if hp.smoothing > 0:
            return LabelSmoothingCrossEntropy(smoothing=hp.smoothing)
        return nn.CrossEntropyLoss()

    def configure_model(self) -> None:
        if self.hparams.compile and not getattr(self, '_compiled', False):
            self.model.compile()
            self._compiled = True

    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2
        hp = self.hparams
        kwargs: Dict[str, Any] = {}
        if hp.opt_eps is not None:
            kwargs['eps'] = hp.opt_eps
        if hp.opt_betas is not None:
            kwargs['betas'] = tuple(hp.opt_betas)
        optimizer = create_optimizer_v2(self.model, opt=hp.opt, lr=hp.lr, weight_decay=hp.weight_decay,
                                        momentum=hp.momentum, layer_decay=hp.layer_decay, **kwargs)
        return with_warmup_cosine(self, optimizer)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        scheduler.step_update(num_updates=self.global_step)

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_everything_from(int(mix_seed(self.hparams.seed, self.global_rank, self.current_epoch, batch_idx)))

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        if batch is None:  # every image of the batch was unreadable
            return None
        x, y = batch
        target = y
        if self.mixup_fn is not None:
            if x.shape[0] % 2:
                raise ValueError(f'mixup/cutmix need an even batch size, got {x.shape[0]}')
            x, target = self.mixup_fn(x, y)
        logits = self.model(x)
        loss = self.train_loss(logits, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f'training loss is {loss.item()} at step {self.global_step}: lower the lr, '
                                     f'use gradient clipping (--trainer.gradient_clip_val) or check the data')
        self.log('train/loss', loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        if self.mixup_fn is None:
            acc = (logits.argmax(-1) == y).float().mean()
            self.log('train/acc', acc, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.model_ema is not None:
            self.model_ema.update(self.model, step=self.global_step)

    def on_train_epoch_end(self) -> None:
        self._check_data()
        dm = getattr(self.trainer, 'datamodule', None)
        if dm is not None and hasattr(dm, 'monitor'):  # unreadable images skipped so far (image folders, shards)
            self.log('data/skipped_images', float(dm.monitor.bad), on_step=False, on_epoch=True, reduce_fx='sum',
                     sync_dist=True)

    def on_train_end(self) -> None:
        save_final_last_checkpoints(self.trainer)

    def _check_data(self) -> None:
        dm = getattr(self.trainer, 'datamodule', None)
        if dm is not None and hasattr(dm, 'check_bad_samples'):
            dm.check_bad_samples()

    # ------------------------------------------------------------------ evaluation
    def _eval_models(self) -> Dict[str, nn.Module]:
        out = {'': self.model}
        if self.model_ema is not None and self.hparams.ema_eval:
            out['_ema'] = self.model_ema.module
        return out

    def _eval_step(self, batch: Any, stage: str) -> None:
        if batch is None:
            return
        x, y = batch
        for suffix, model in self._eval_models().items():
            logits = model(x).float()
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            stats = torch.stack([F.cross_entropy(logits, y, reduction='sum'),
                                 (top5[:, 0] == y).sum().float(),
                                 (top5 == y[:, None]).any(-1).sum().float(),
                                 torch.tensor(float(y.shape[0]), device=y.device)])
            key = stage + suffix
            self._stats[key] = self._stats.get(key, torch.zeros_like(stats)) + stats

    def _eval_epoch_end(self, stage: str) -> None:
        for key in [k for k in self._stats if k.startswith(stage)]:
            stats = self.trainer.strategy.reduce(self._stats.pop(key), reduce_op='sum')
            suffix = key[len(stage):]
            n = stats[3].clamp(min=1)
            self.log_dict({f'{stage}/loss{suffix}': stats[0] / n, f'{stage}/acc{suffix}': stats[1] / n,
                           f'{stage}/acc5{suffix}': stats[2] / n}, prog_bar=(suffix == ''), sync_dist=False)
        if stage == 'val':
            self._check_data()

    def on_validation_epoch_start(self) -> None:
        self._stats = {k: v for k, v in self._stats.items() if not k.startswith('val')}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, 'val')

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end('val')

    def on_test_epoch_start(self) -> None:
        self._stats = {k: v for k, v in self._stats.items() if not k.startswith('test')}

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, 'test')

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end('test')

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        model = self.model_ema.module if self.model_ema is not None and self.hparams.ema_eval else self.model
        probs = model(x).float().softmax(-1)
        out = {'probs': probs, 'pred': probs.argmax(-1)}
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            out['label'] = batch[1]
        return out
