"""Callbacks: images/s throughput, and a checkpoint on pre-emption signals.

Pre-emption: a cluster sends SIGTERM (or SIGUSR1, e.g. SLURM ``--signal=USR1@120``) some time before
it kills a job. :class:`PreemptionCheckpoint` lets the current optimizer step finish, writes
``last.ckpt`` in the checkpoint folder (exactly the state a periodic ``ModelCheckpoint`` writes at the
end of a step, so ``--ckpt_path last`` resumes exactly) and exits with status ``128 + signal``.
SIGTERM is read from Lightning's own handler (``trainer.received_sigterm``); SIGUSR1 gets a handler
here, except under SLURM with Lightning's auto-requeue, which owns SIGUSR1 (it writes an
``hpc_ckpt_*.ckpt``, requeues the job and resumes from it by itself).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

__all__ = ['ImagesPerSecond', 'PreemptionCheckpoint', 'save_final_last_checkpoints']

log = logging.getLogger(__name__)


def save_final_last_checkpoints(trainer: pl.Trainer) -> None:
    """Make every ``ModelCheckpoint(save_last=True)``'s ``last.ckpt`` hold the final step once ``fit`` ends.

    Lightning writes ``last.ckpt`` at the end of fit only if no ``last.ckpt`` was saved yet in that run, so
    with ``every_n_train_steps=200`` a run of 859 steps kept step 800 as its "last" model. The modules call
    this from ``on_train_end`` (on every rank: saving is collective); a callback that already saved at the
    final step is left alone.
    """
    for cb in trainer.checkpoint_callbacks:
        if (isinstance(cb, ModelCheckpoint) and cb.save_last and trainer.global_step > 0
                and cb._last_global_step_saved != trainer.global_step):
            cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))


def _batch_size(batch: Any) -> int:
    if isinstance(batch, (tuple, list)) and batch and hasattr(batch[0], 'shape'):
        return int(batch[0].shape[0])
    if hasattr(batch, 'shape'):
        return int(batch.shape[0])
    return 0


class ImagesPerSecond(Callback):
    """Logs ``train/images_per_sec`` (all ranks together, data loading included) every ``window`` steps and
    ``train/epoch_images_per_sec`` per epoch."""

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f'window must be >= 1, got {window}')
        self.window = window
        self._t0: Optional[float] = None
        self._n = 0
        self._epoch_t0: Optional[float] = None
        self._epoch_n = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = self._epoch_t0 = time.perf_counter()
        self._n = self._epoch_n = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = _batch_size(batch) * trainer.world_size
        self._n += n
        self._epoch_n += n
        if (batch_idx + 1) % self.window == 0 and self._t0 is not None:
            now = time.perf_counter()
            pl_module.log('train/images_per_sec', self._n / max(now - self._t0, 1e-9), on_step=True, on_epoch=False,
                          prog_bar=True, rank_zero_only=True)
            self._t0, self._n = now, 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch_t0 is not None and self._epoch_n:
            dt = time.perf_counter() - self._epoch_t0
            pl_module.log('train/epoch_images_per_sec', self._epoch_n / max(dt, 1e-9), on_step=False, on_epoch=True,
                          rank_zero_only=True)


class _SignalFlag:
    """A signal handler that records the signal and chains the previous handler; once deactivated it
    behaves as the previous handler (or the default action) would."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        previous = signal.getsignal(signum)
        while isinstance(previous, _SignalFlag):  # never chain into a flag of an earlier run
            previous = previous.previous
        self.previous = previous
        self.active = True
        self.received = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.active:
            self.received = True
            log.warning('received signal %d: a checkpoint is written at the end of this training step', signum)
        if callable(self.previous):
            self.previous(signum, frame)
        elif not self.active and self.previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


class PreemptionCheckpoint(Callback):
    """On SIGTERM / SIGUSR1: finish the step, write ``<checkpoint dir>/last.ckpt``, exit ``128 + signal``.

    Args:
        signals: which signals to act on (names).
        dirpath: where to write; default the folder of the trainer's ``ModelCheckpoint``
            (else ``<default_root_dir>/checkpoints``).
        filename: checkpoint file name (``last.ckpt`` is what ``--ckpt_path last`` finds).
    """

    def __init__(self, signals: Sequence[str] = ('SIGTERM', 'SIGUSR1'), dirpath: Optional[str] = None,
                 filename: str = 'last.ckpt') -> None:
        for name in signals:
            if name not in ('SIGTERM', 'SIGUSR1', 'SIGUSR2', 'SIGINT'):
                raise ValueError(f'unsupported signal {name!r}: use SIGTERM, SIGUSR1, SIGUSR2 or SIGINT')
        self.signals = tuple(signals)
        self.dirpath, self.filename = dirpath, filename
        self._flags: dict = {}
        self.saved_path: Optional[str] = None

    def _lightning_owns(self, trainer: pl.Trainer, name: str) -> bool:
        from lightning.fabric.plugins.environments import SLURMEnvironment
        if name == 'SIGTERM':
            return True  # Lightning installs a SIGTERM handler for every run: read trainer.received_sigterm
        env = getattr(trainer._accelerator_connector, 'cluster_environment', None)
        return (isinstance(env, SLURMEnvironment) and env.auto_requeue
                and getattr(env, 'requeue_signal', signal.SIGUSR1) == getattr(signal, name))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signals:
            if self._lightning_owns(trainer, name):
                continue
            signum = getattr(signal, name)
            flag = _SignalFlag(signum)
            signal.signal(signum, flag)
            self._flags[name] = flag

    def _restore(self) -> None:
        for name, flag in self._flags.items():
            flag.active = False
            if signal.getsignal(flag.signum) is flag:
                signal.signal(flag.signum, flag.previous)
        self._flags = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _received(self, trainer: pl.Trainer) -> Optional[int]:
        if 'SIGTERM' in self.signals and trainer.received_sigterm:
            return signal.SIGTERM
        for flag in self._flags.values():
            if flag.received:
                return flag.signum
        return None

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / self.filename
        cb = trainer.checkpoint_callback
        if cb is not None and getattr(cb, 'dirpath', None):
            return Path(cb.dirpath) / self.filename
        return Path(trainer.default_root_dir) / 'checkpoints' / self.filename

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signum = self._received(trainer)
        if trainer.world_size > 1:  # every rank must take the same branch (save_checkpoint is collective)
            stop = trainer.strategy.reduce_boolean_decision(signum is not None, all=False)
            if stop and signum is None:
                signum = signal.SIGTERM
        if signum is None:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(str(path))
        self.saved_path = str(path)
        log.warning('pre-emption: saved %s at step %d; resume with --ckpt_path last (or %s)', path,
                    trainer.global_step, path)
        raise SystemExit(128 + int(signum))
