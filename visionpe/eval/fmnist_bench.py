"""The Fashion-MNIST resolution benchmark: train every ``vit_<pe>_tiny`` with one tiny recipe at 32 px
(patch 4, ``configs/fmnist_vit_tiny.yaml``) through ``train.py``'s code, cache the checkpoints in
``<bench_dir>/<pe>/checkpoints/last.ckpt`` (training is skipped once it has finished; an
unfinished one resumes from its last checkpoint), then sweep the
resolutions (default 32, 48, 64, 96, 128) under every coordinate mode an encoding supports.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ['BENCH_DIR', 'BENCH_RESOLUTIONS', 'BENCH_COORD_MODES', 'bench_encodings', 'bench_config',
           'train_encoding', 'train_all']

log = logging.getLogger(__name__)
BENCH_DIR = Path('runs') / 'fmnist_bench'
BENCH_RESOLUTIONS = (32, 48, 64, 96, 128)
#: swept as a knob; each model keeps those of its own coordinate family (visionpe.grid.COORD_FAMILIES):
#: index-trained models index and ref, ComRoPE normalized and normalized_ref, polar RoPE polar
BENCH_COORD_MODES = ('index', 'ref', 'normalized', 'normalized_ref', 'polar')


def bench_encodings(selected: Sequence[str] | None = None) -> list[str]:
    """Encodings of the benchmark: ``selected`` (checked) or every key of ``VIT_ENCODINGS``."""
    from ..models.vit import VIT_ENCODINGS
    if not selected:
        return list(VIT_ENCODINGS)
    unknown = [e for e in selected if e not in VIT_ENCODINGS]
    if unknown:
        raise ValueError(f"unknown encoding(s) {unknown} for --bench-encodings; choose from {', '.join(VIT_ENCODINGS)}")
    return list(dict.fromkeys(selected))


def bench_config(pe: str, run_dir: Path, epochs: int | None) -> dict[str, Any]:
    """``configs/fmnist_vit_tiny.yaml`` for ``vit_<pe>_tiny`` with every output under ``run_dir`` (its loggers
    and checkpoints follow ``trainer.default_root_dir``)."""
    from ..train.cli import DEFAULT_CONFIG
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg['model']['model_name'] = f'vit_{pe}_tiny'
    cfg['test_after_fit'] = False  # the benchmark evaluates afterwards, at every resolution
    cfg['trainer']['default_root_dir'] = str(run_dir)
    if epochs is not None:
        cfg['trainer']['max_epochs'] = int(epochs)
    return cfg


def train_encoding(pe: str, bench_dir: Path = BENCH_DIR, epochs: int | None = None,
                   train_args: Sequence[str] = (), retrain: bool = False) -> tuple[Path, float | None]:
    """Train ``vit_<pe>_tiny`` unless it finished before; ``(last.ckpt, training seconds or None if cached)``.

    A finished training is marked by ``train_time.json`` (written after ``fit`` returns). ``last.ckpt`` alone
    is not: the periodic checkpoint rewrites it every 200 steps, so a run that was killed or is still running
    in another process also has one. Such a run is resumed from it (``--ckpt_path``, exact resume), never
    taken for a finished model."""
    run_dir = Path(bench_dir) / pe
    last = run_dir / 'checkpoints' / 'last.ckpt'
    done = run_dir / 'train_time.json'
    if done.is_file() and last.is_file() and not retrain:
        log.info('vit_%s_tiny: using the cached checkpoint %s', pe, last)
        return last, None
    from ..train import fit
    run_dir.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    resume: Path | None = None
    if last.is_file():
        if retrain:
            last.unlink()
        else:
            log.info('vit_%s_tiny: resuming the unfinished training from %s', pe, last)
            resume = last
    config = run_dir / 'config.yaml'
    config.write_text(yaml.safe_dump(bench_config(pe, run_dir, epochs), sort_keys=False))
    t0 = time.perf_counter()
    fit(config, args=train_args, ckpt_path=resume)
    seconds = time.perf_counter() - t0
    if not last.is_file():
        raise RuntimeError(f'training vit_{pe}_tiny wrote no {last} (check the ModelCheckpoint callbacks in {config})')
    done.write_text(json.dumps(dict(seconds=seconds, args=list(train_args), resumed=resume is not None)))
    return last, seconds


def train_all(encodings: Sequence[str], bench_dir: Path = BENCH_DIR, epochs: int | None = None,
              train_args: Sequence[str] = (), retrain: bool = False
              ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Train (or reuse) every encoding; an encoding that fails is reported and the others go on.
    Returns ``({pe: {checkpoint, train_s, cached}}, {pe: error})``; ``train_s`` of a cached checkpoint is
    the one recorded when it was trained (None if unknown)."""
    trained: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for pe in encodings:
        try:
            ckpt, seconds = train_encoding(pe, bench_dir, epochs, train_args, retrain)
        except Exception as e:  # noqa: BLE001  (one broken encoding must not stop an hours-long benchmark)
            log.error('training vit_%s_tiny failed: %s: %s', pe, type(e).__name__, e)
            failed[pe] = f'{type(e).__name__}: {e}'
            continue
        cached = seconds is None
        if cached:
            timing = Path(bench_dir) / pe / 'train_time.json'
            seconds = json.loads(timing.read_text()).get('seconds') if timing.is_file() else None
        trained[pe] = dict(checkpoint=str(ckpt), train_s=seconds, cached=cached)
    return trained, failed
