"""Running a study's jobs: one job = train one model (``train.py``), sweep it (``eval_resolution.py``), write
``<study dir>/rows/<job>.jsonl``.

Both steps are the project's own command lines run as child processes, so a job runs the same way in a
local worker, in a SLURM array task (``--emit-slurm``: each task runs ``python -m visionpe.study run-job``;
multi-GPU training goes through Lightning's own strategies via the recipe's ``trainer`` settings) or by
hand. A finished training is marked by ``train_done.json``; an unfinished one resumes from its
``last.ckpt``. The rows file is written atomically when the sweep is complete, with the checkpoint's
SHA-256, the package versions and the device, so rows from several machines can be merged and committed
without checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from ..eval.cli import PARTIAL_ROWS
from ..eval.data import size_text
from .spec import Job, StudySpec, parse_size

__all__ = ['train_command', 'eval_command', 'run_job', 'run_local', 'emit_slurm', 'rows_path', 'job_dir',
           'file_sha256', 'pending_jobs']

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


def job_dir(spec: StudySpec, job: Job) -> Path:
    return spec.work_path / job.id


def rows_path(spec: StudySpec, job: Job) -> Path:
    return spec.out_dir / 'rows' / f'{job.id}.jsonl'


def pending_jobs(spec: StudySpec) -> list[Job]:
    """Jobs whose rows file does not exist yet."""
    return [j for j in spec.jobs() if not rows_path(spec, j).is_file()]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _script(name: str) -> str:
    path = REPO / name
    if not path.is_file():
        raise FileNotFoundError(f'{path} not found: studies run from a visionpe source checkout')
    return str(path)


def _config_path(config: str) -> str:
    """A recipe's config file: as given when it exists from here, else relative to the source checkout."""
    for path in (Path(config), REPO / config):
        if path.is_file():
            return str(path.resolve())
    raise FileNotFoundError(f'recipe config {config} not found (looked here and in {REPO})')


def train_command(spec: StudySpec, job: Job, resume: Path | None = None) -> list[str]:
    """The ``train.py fit`` command of ``job`` (its run folder, model, seed and the recipe's overrides)."""
    cmd = [sys.executable, _script('train.py'), 'fit', '--config', _config_path(job.recipe.config),
           '--model.model_name', job.model, '--seed_everything', str(job.seed),
           '--trainer.default_root_dir', str(job_dir(spec, job)), '--test_after_fit', 'false']
    if spec.epochs is not None:
        cmd += ['--trainer.max_epochs', str(spec.epochs)]
    if spec.device != 'cpu':
        cmd += ['--trainer.accelerator', 'gpu' if spec.device.startswith('cuda') else spec.device]
    cmd += [*job.recipe.args, *spec.train_args]
    if resume is not None:
        cmd += ['--ckpt_path', str(resume)]
    return cmd


def eval_command(spec: StudySpec, job: Job, checkpoint: Path, out: Path) -> list[str]:
    """The ``eval_resolution.py`` sweep of ``job``'s checkpoint: every size and knob, per-image results;
    ``--resume`` reuses the rows a cut-off sweep of the same checkpoint (by content digest) already measured."""
    cmd = [sys.executable, _script('eval_resolution.py'), '--checkpoints', str(checkpoint), '--data', spec.data,
           '--resolutions', *spec.sizes, '--train-res', size_text(parse_size(spec.train_size)),
           '--output', str(out), '--device', spec.device, '--batch-size', str(spec.eval_batch_size),
           '--per-image', '--no-progress', '--resume']
    cmd += ['--max-images', 'all' if spec.eval_images is None else str(spec.eval_images)]  # all: the full set
    for flag, values in spec.knobs.items():
        cmd += [f'--{flag}', *[str(v) for v in values]]
    return cmd + list(spec.eval_args)


def _run(cmd: list[str], log_file: Path, threads: int | None) -> None:
    env = dict(os.environ)
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, 'a') as f:
        f.write(f'$ {shlex.join(cmd)}\n')
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f'command failed (exit {proc.returncode}); see {log_file}: {shlex.join(cmd)}')


def _versions() -> dict[str, str]:
    import timm
    import torch
    import visionpe
    return dict(visionpe=visionpe.__version__, torch=torch.__version__, timm=timm.__version__,
                python=platform.python_version(), commit=_source_commit())


def _source_commit() -> str:
    """The source checkout's git commit (``+dirty`` with uncommitted changes), or ``unknown`` outside git."""
    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return 'unknown'
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ('+dirty' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def _device_name(device: str) -> str:
    if device.startswith('cuda'):
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else device
    return f'cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'


def run_job(spec: StudySpec, job: Job, threads: int | None = 1, dry_run: bool = False) -> Path | list[list[str]]:
    """Train (or reuse) and sweep ``job``; returns its rows file (``dry_run``: the commands it would run)."""
    run = job_dir(spec, job)
    last = run / 'checkpoints' / 'last.ckpt'
    done = run / 'train_done.json'
    sweep = run / 'eval'
    if dry_run:
        return [train_command(spec, job), eval_command(spec, job, last, sweep)]
    t0 = time.perf_counter()
    if not (done.is_file() and last.is_file()):
        resume = last if last.is_file() else None
        if resume:
            log.info('%s: resuming the unfinished training from %s', job.id, last)
        _run(train_command(spec, job, resume), run / 'train.log', threads)
        if not last.is_file():
            raise RuntimeError(f'{job.id}: training wrote no {last}')
        done.write_text(json.dumps(dict(seconds=time.perf_counter() - t0, resumed=resume is not None)))
    trained = json.loads(done.read_text())  # seconds of the last training segment; resumed: it was not the first
    t1 = time.perf_counter()
    resumed = (sweep / PARTIAL_ROWS).is_file()  # a sweep of this job was cut off: its rows are reused
    _run(eval_command(spec, job, last, sweep), run / 'eval.log', threads)
    result = json.loads((sweep / 'results.json').read_text())
    base = dict(study=spec.name, job=job.id, encoding=job.encoding, model=job.model, recipe=job.recipe.name,
                seed=job.seed, train_size=spec.train_size, checkpoint_sha256=file_sha256(last),
                train_s=trained.get('seconds'), train_resumed=bool(trained.get('resumed')),
                eval_s=time.perf_counter() - t1, sweep_resumed=resumed, versions=_versions(),
                device=_device_name(spec.device), host=platform.node(), finished=time.strftime('%Y-%m-%dT%H:%M:%S'))
    out = rows_path(spec, job)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix('.jsonl.tmp')
    with open(tmp, 'w') as f:
        for row in result['rows']:
            f.write(json.dumps({**base, **_row_fields(row)}) + '\n')
    os.replace(tmp, out)  # a job's rows appear whole or not at all
    return out


_ROW_KEYS = ('label', 'resolution', 'size', 'knobs', 'native', 'top1', 'top5', 'loss', 'n_images', 'correct', 'images_per_s',
             'resize')


def _row_fields(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in _ROW_KEYS if k in row}
    out['size'] = size_text(parse_size(out.get('size', row.get('resolution'))))  # 'HxW', square sizes included
    knobs = out.get('knobs')
    if knobs is None:  # evaluator rows carry each knob as a column
        skip = {'label', 'model', 'checkpoint', 'checkpoint_sha256', 'native', 'resolution', 'height', 'width',
                'train_res', 'size', 'top1', 'top5', 'loss', 'images_per_s', 'peak_mem_mb', 'n_images', 'n_unreadable',
                'correct', 'bad_images', 'resize'}
        knobs = {k: v for k, v in row.items() if k not in skip}
    out['knobs'] = knobs
    out['setting'] = _knob_label(knobs)
    return out


def _knob_label(knobs: dict[str, Any]) -> str:
    parts = [f'{k}={v}' for k, v in sorted(knobs.items()) if v not in (None, '', 'none', False)]
    return ', '.join(parts) or 'default'


def run_local(spec: StudySpec, workers: int = 1, jobs: list[Job] | None = None, rerun: bool = False,
              progress: bool = True) -> dict[str, str]:
    """Run the study's pending jobs with ``workers`` worker processes (one thread each); a failed job is
    reported and the others go on. Returns ``{job id: error}`` for the failures."""
    todo = jobs if jobs is not None else (spec.jobs() if rerun else pending_jobs(spec))
    if rerun:
        for j in todo:
            rows_path(spec, j).unlink(missing_ok=True)
            shutil.rmtree(job_dir(spec, j) / 'eval', ignore_errors=True)  # measure anew, reuse no earlier sweep
    failed: dict[str, str] = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc=f'study {spec.name}', unit='job')
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(run_job, spec, j, 1): j for j in todo}
        for fut in as_completed(futures):
            j = futures[fut]
            try:
                fut.result()
                log.info('%s: rows written to %s', j.id, rows_path(spec, j))
            except Exception as e:  # noqa: BLE001  (one broken job must not stop a study of hours)
                failed[j.id] = f'{type(e).__name__}: {e}'
                log.error('%s failed: %s', j.id, failed[j.id])
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return failed


def emit_slurm(spec: StudySpec, study_file: Path, out_dir: Path, *, gpus: int = 0, cpus: int = 4,
               time_limit: str = '12:00:00', partition: str | None = None, only_pending: bool = True) -> Path:
    """Write ``out_dir/jobs.txt`` (one job id a line) and ``out_dir/study.sbatch``: a SLURM array with one task
    per job, each running ``python -m visionpe.study run-job`` for its line. Returns the script path."""
    jobs = pending_jobs(spec) if only_pending else spec.jobs()
    if not jobs:
        raise ValueError(f'study {spec.name!r}: every job has rows already (nothing to submit)')
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'logs').mkdir(exist_ok=True)
    listing = out_dir / 'jobs.txt'
    listing.write_text(''.join(f'{j.id}\n' for j in jobs))
    device = 'cuda' if gpus else 'cpu'
    lines = ['#!/bin/bash', f'#SBATCH --job-name=visionpe-{spec.name}', f'#SBATCH --array=0-{len(jobs) - 1}',
             f'#SBATCH --cpus-per-task={cpus}', f'#SBATCH --time={time_limit}',
             f'#SBATCH --output={out_dir.resolve()}/logs/%A_%a.out']
    if gpus:
        lines.append(f'#SBATCH --gres=gpu:{gpus}')
    if partition:
        lines.append(f'#SBATCH --partition={partition}')
    lines += ['set -euo pipefail', f'cd {shlex.quote(str(REPO))}',
              f'JOB=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(listing.resolve()))})',
              f'srun {shlex.quote(sys.executable)} -m visionpe.study run-job --config '
              f'{shlex.quote(str(Path(study_file).resolve()))} --output {shlex.quote(str(spec.out_dir.resolve()))} '
              f'--device {device} --threads {cpus} --job "$JOB"', '']
    script = out_dir / 'study.sbatch'
    script.write_text('\n'.join(lines))
    return script
