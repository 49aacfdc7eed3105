"""One sweep engine for every task: model sources x knob settings x resolutions, measured by a task.

A :class:`Plan` is one model source with the knob settings that apply to it; a :class:`Case` one
(plan, setting, resolution), i.e. one row. The engine owns what every task shares: building each model
once before any long work (every bad input fails first), rebuilding it for construction knobs, applying
and undoing the other knobs per resolution, the attention bias budget, reuse of earlier rows
(``--resume``), the progress bar and the run's metadata. A :class:`Task` (classification, COCO detection,
... in :mod:`.runner`) says how to build a model, what to check, how to measure one case and what its
metrics are.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..attention import bias_budget
from .data import parse_size, size_text, size_value
from .models import (KnobSpace, Knobs, ModelSource, apply_knobs, build_overrides, expand_knobs, is_native_setting,
                     knob_contexts, knob_support)

__all__ = ['Plan', 'Case', 'Task', 'EvalResult', 'sweep', 'row_key']

log = logging.getLogger(__name__)
Size = tuple[int, int]


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    headline: str
    metrics: tuple[str, ...]


@dataclass
class Plan:
    """One model source, built once, and the knob settings to measure it with."""
    source: ModelSource
    model: nn.Module | None   # the first build: used by the first setting that needs no rebuild
    info: dict[str, Any]
    support: dict[str, Any]      # :func:`knob_support`
    settings: list[Knobs]
    train_size: Size | None
    notes: list[str]
    label: str = ''              # the model's part of the row labels


@dataclass
class Case:
    """One row: a plan's model at one knob setting and one size ``(h, w)``."""
    plan: Plan
    knobs: Knobs
    size: Size

    @property
    def resolution(self) -> int | str:
        """The row's ``resolution``: ``N`` for a square size, ``'HxW'`` otherwise."""
        return size_value(self.size)

    @property
    def label(self) -> str:
        k = self.knobs.label()
        return f'{self.plan.label} [{k}]' if k else self.plan.label


class Task:
    """What a task adds to the engine (override the methods; see :mod:`.runner`)."""
    name: str = ''
    headline: str = ''
    metrics: tuple[str, ...] = ()
    #: how images are brought to a size when it is not the task's usual way (rows carry it, rows are reused
    #: only under the same one): ``'short_side'`` for ``--keep-aspect``; None: the usual way
    resize: str | None = None

    def build(self, source: ModelSource, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
        """The model of ``source`` (eval mode) and info (``img_size``, ...); ``overrides``: construction knobs."""
        raise NotImplementedError

    def train_size(self, model: nn.Module, info: dict[str, Any]) -> Size | None:
        return None

    def check(self, plan: Plan) -> None:
        """Fail before any long work (e.g. a resolution the model cannot take)."""

    def expected_images(self) -> int | None:
        """How many images a case will use (part of the key of a reusable row)."""
        return None

    def measure(self, model: nn.Module, case: Case) -> dict[str, Any]:
        """The metrics of one case (and ``n_images``)."""
        raise NotImplementedError

    def model_meta(self, plan: Plan) -> dict[str, Any]:
        return {}

    def meta(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {}


def row_size(row: dict[str, Any]) -> Size:
    """A row's ``(height, width)`` (rows written before non-square sizes have ``resolution`` only)."""
    if row.get('height') is not None and row.get('width') is not None:
        return int(row['height']), int(row['width'])
    return parse_size(row['resolution'])


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies a measured row for reuse: label, checkpoint path and content digest, size (h, w),
    the number of images asked for (evaluated + unreadable), whether it has per-image results and how images
    were resized (``resize``)."""
    n = row.get('n_images')
    n = None if n is None else int(n) + int(row.get('n_unreadable') or 0)
    return (row['label'], str(row['checkpoint']), row.get('checkpoint_sha256'), row_size(row), n,
            'correct' in row, row.get('resize'))


def _plan(task: Task, source: ModelSource, space: KnobSpace, train_res: int | str | Size | None, label: str) -> Plan:
    model, info = task.build(source)
    train = parse_size(train_res) if train_res else task.train_size(model, info)
    support = knob_support(model)
    settings, notes = expand_knobs(space, support)
    for knobs in settings:
        for name, value in knobs.changed().items():
            for k, _ in support[name]:
                if train is None and k.needs_train_size(value):
                    raise ValueError(f'{source.name}: {k.option} {value} needs the training resolution; '
                                     f'pass --train-res')
    plan = Plan(source, model, info, support, settings, train, notes, label)
    task.check(plan)
    return plan


def sweep(task: Task, models: Sequence[ModelSource], resolutions: Sequence[int | str | Size], space: KnobSpace,
          *, train_res: int | str | Size | None = None, max_bias_mb: float = 1024.0, progress: bool = True,
          on_row: Callable[[dict[str, Any]], None] | None = None, reuse: Sequence[dict[str, Any]] = (),
          device: torch.device | None = None) -> EvalResult:
    """Measure every model x knob setting x size with ``task``; the rows and the run's metadata.

    ``resolutions``: sizes ``N``, ``'HxW'`` or ``(h, w)``. Every row has ``resolution`` (``N`` for a square
    size, ``'HxW'`` otherwise), ``height``, ``width`` and ``size`` (``'HxW'``).
    ``reuse``: rows of an earlier run (``rows.partial.jsonl``); a case with a row of the same label,
    checkpoint (path and content), resolution and image count is taken from it, not measured again.
    ``on_row`` gets every row as soon as it is measured (or reused).
    """
    from tqdm.auto import tqdm
    space.validate()
    sizes = [parse_size(r) for r in resolutions]
    names = [s.name for s in models]
    labels = [f'{s.name} ({Path(s.checkpoint).stem})' if names.count(s.name) > 1 and s.checkpoint else s.name
              for s in models]  # one name twice: told apart by the checkpoint
    plans = [_plan(task, s, space, train_res, lab) for s, lab in zip(models, labels)]  # every check first
    earlier = {row_key(r): r for r in reuse}
    n_expected = task.expected_images()
    per_image = bool(getattr(task, 'per_image', False))
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    reused = 0
    bar = tqdm(total=sum(len(p.settings) for p in plans) * len(sizes), desc=f'eval {task.name}', unit='run',
               disable=not progress, dynamic_ncols=True)
    for plan in plans:
        src = plan.source
        digest = src.fingerprint()
        for knobs in plan.settings:
            cases = [Case(plan, knobs, hw) for hw in sizes]
            keys = [(c.label, str(src.checkpoint), digest, c.size, n_expected, per_image, task.resize) for c in cases]
            model = None
            if not all(k in earlier for k in keys):  # something to measure: the model at this setting
                overrides = build_overrides(knobs, plan.support)
                try:
                    model = plan.model if not overrides and plan.model is not None else task.build(src, **overrides)[0]
                except (TypeError, ValueError) as e:  # e.g. a coordinate mode this encoding rejects
                    skipped.append(dict(label=cases[0].label, reason=str(e)))
                    log.warning('skipping %s: %s', cases[0].label, e)
                    bar.update(len(cases))
                    continue
                if model is plan.model:
                    plan.model = None  # the first build is used once; later settings get a fresh one
                if device is not None:
                    model.to(device)
                model.eval()
            memo: dict[str, Any] = {}
            for case, key in zip(cases, keys):
                bar.set_postfix_str(f'{case.label} @ {size_text(case.size)}px')
                old = earlier.get(key)
                if old is not None:
                    m = {k: old[k] for k in (*task.metrics, 'n_images', 'n_unreadable', 'correct', 'resize') if k in old}
                    reused += 1
                else:
                    undo = apply_knobs(model, knobs, case.size, plan.train_size, memo)
                    try:
                        with knob_contexts(knobs), bias_budget(max_bias_mb):
                            m = task.measure(model, case)
                    finally:
                        undo()
                row = dict(label=case.label, model=src.name, checkpoint=src.checkpoint, checkpoint_sha256=digest,
                           **knobs.as_dict(), native=is_native_setting(knobs, plan.support), resolution=case.resolution, height=case.size[0], width=case.size[1],
                           size=size_text(case.size), train_res=size_value(plan.train_size) if plan.train_size else None, **m)
                rows.append(row)
                if on_row:
                    on_row(row)
                bar.update(1)
            del model
    bar.close()
    if reuse:
        log.info('--resume: reused %d of %d rows (%d measured now)', reused, len(rows), len(rows) - reused)
    models_meta = [dict(name=p.source.name, checkpoint=p.source.checkpoint, checkpoint_sha256=p.source.fingerprint(),
                        kwargs=p.source.kwargs, train_res=list(p.train_size) if p.train_size else None,
                        knobs=sorted(p.support), notes=p.notes, **task.model_meta(p)) for p in plans]
    meta = dict(task=task.name, resolutions=[size_value(hw) for hw in sizes], sizes=[size_text(hw) for hw in sizes],
                models=models_meta, skipped=skipped,
                knob_space=space.as_dict(), reused_rows=reused, **task.meta(rows))
    return EvalResult(rows, meta, task.headline, task.metrics)
