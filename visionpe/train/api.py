"""``visionpe.train.fit``: train from a config file in Python, as ``python train.py fit --config ...`` does.

    from visionpe.train import fit
    result = fit('configs/fmnist_vit_tiny.yaml', model={'model_name': 'vit_rope2d_tiny'},
                 trainer={'max_epochs': 1, 'default_root_dir': 'runs/rope'})
    result.last_checkpoint      # runs/rope/checkpoints/last.ckpt (the final step)
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ['FitResult', 'fit', 'override_args']


@dataclass
class FitResult:
    """What a :func:`fit` run left: its folder, checkpoints (None where no callback writes one), final step,
    the last logged metrics (floats) and the wall time of the run in seconds."""
    run_dir: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def override_args(overrides: dict[str, Any]) -> list[str]:
    """Keyword overrides as command-line options: ``trainer={'max_epochs': 1}`` or ``**{'trainer.max_epochs': 1}``
    -> ``--trainer.max_epochs 1``; a top-level option (``test_after_fit=False``) -> ``--test_after_fit false``.
    Values are JSON (a dict stays one option: ``model={'model_kwargs': {...}}``)."""
    out: list[str] = []
    for key, value in overrides.items():
        if isinstance(value, dict) and '.' not in key and key in ('trainer', 'model', 'data'):
            for sub, v in value.items():
                out += [f'--{key}.{sub}', _value(v)]
        else:
            out += [f'--{key}', _value(value)]
    return out


def fit(config: str | Path, *, args: Sequence[str] = (), ckpt_path: str | Path | None = None,
        trust_checkpoint: bool = False, **overrides: Any) -> FitResult:
    """Run ``fit`` on ``config`` (a ``train.py`` YAML; ``task: det`` in it selects detection) with
    ``overrides`` (see :func:`override_args`) and extra command-line ``args`` (applied last), resuming from
    ``ckpt_path`` if given. Errors are raised (a bad option: ``SystemExit`` from the parser, as ``train.py``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .cli import main
    argv = ['fit', '--config', str(config), *override_args(overrides), *args]
    if ckpt_path is not None:
        argv += ['--ckpt_path', str(ckpt_path)]
    if trust_checkpoint:
        argv.append('--trust-checkpoint')
    t0 = time.perf_counter()
    cli = main(argv)
    seconds = time.perf_counter() - t0
    trainer = cli.trainer
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    last = next((cb.last_model_path for cb in callbacks if cb.save_last and cb.last_model_path), None)
    best = next((cb.best_model_path for cb in callbacks if cb.monitor and cb.best_model_path), None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, 'numel', lambda: 1)() == 1}
    return FitResult(run_dir=Path(trainer.default_root_dir), last_checkpoint=Path(last) if last else None,
                     best_checkpoint=Path(best) if best else None, global_step=trainer.global_step,
                     metrics=metrics, seconds=seconds)
