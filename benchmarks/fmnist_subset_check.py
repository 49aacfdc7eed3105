"""Is the Fashion-MNIST study's fixed 2,000-image test subset representative of all 10,000 test images?

For finished study jobs whose checkpoint is still in the study's ``work_dir`` and is, by SHA-256, the one the
committed rows measured, this reruns the job's own sweep command (``visionpe.study.jobs.eval_command``) on every
test image (``eval_images: null``) at a few sizes and every knob setting, then per cell (job, setting, size):

* ``full``: top-1 on all 10,000 images;
* ``subset``: the committed row's top-1 on the study's subset, and whether the 10,000-image run's per-image
  results on those same images (``visionpe.data.fashion_mnist.subset_indices``) reproduce it bit for bit;
* ``full - subset`` against its expected spread: the subset is a simple random sample without replacement, so
  ``SE = sqrt(p (1 - p) / n (1 - n / N))`` (Cochran, *Sampling Techniques*, 2.5: the finite-population correction).

About 5% of cells should have ``|z| > 1.96`` if the subset is an honest sample (the cells of one job share its
images, so they are not independent). Writes ``rows.jsonl`` (earlier runs' rows of other jobs are kept) and
``subset_check.md`` to ``--output`` and prints the table. A measurement, not a test (minutes per job on a CPU).

    python benchmarks/fmnist_subset_check.py --jobs rope2d_mixed_ape__fixed__s2 spiral__fixed__s2 nope__fixed__s2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from visionpe.data.fashion_mnist import subset_indices
from visionpe.eval.data import FMNIST_TEST_IMAGES as N_TEST
from visionpe.study.jobs import _row_fields, eval_command, file_sha256, job_dir, rows_path
from visionpe.study.spec import StudySpec, load_study
from visionpe.study.stats import unpack_correct

ROOT = Path(__file__).resolve().parents[1]


def _committed(spec: StudySpec, job) -> list[dict[str, Any]]:
    path = rows_path(spec, job)
    if not path.is_file():
        raise SystemExit(f'{job.id}: no committed rows at {path}; run the job first')
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_job(spec: StudySpec, full: StudySpec, job, threads: int) -> list[dict[str, Any]]:
    """Sweep ``job``'s checkpoint on every test image and compare each cell with its committed subset row."""
    committed = _committed(spec, job)
    ckpt = job_dir(spec, job) / 'checkpoints' / 'last.ckpt'
    if not ckpt.is_file():
        raise SystemExit(f'{job.id}: its checkpoint {ckpt} is gone (work dirs are not committed); pick a job '
                         'trained on this machine, or rerun it with `visionpe.study run --rerun`')
    sha = file_sha256(ckpt)
    if sha != committed[0]['checkpoint_sha256']:
        raise SystemExit(f'{job.id}: {ckpt} (sha256 {sha[:12]}) is not the checkpoint its committed rows measured '
                         f'({committed[0]["checkpoint_sha256"][:12]}); comparing them would mix two sets of weights')
    out = job_dir(spec, job) / 'eval_full'
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f'{job.id}: sweeping all {N_TEST} test images at {", ".join(full.sizes)} ...', flush=True)
    subprocess.run(eval_command(full, job, ckpt, out), check=True, env=env, cwd=ROOT)
    result = json.loads((out / 'results.json').read_text())
    mine = {(r['setting'], r['size']): r for r in committed}
    idx = subset_indices(N_TEST, spec.eval_images).numpy()
    rows = []
    for raw in result['rows']:
        r = _row_fields(raw)
        if int(r['n_images']) != N_TEST:
            raise SystemExit(f'{job.id}: the full sweep measured {r["n_images"]} images, not {N_TEST}')
        sub = mine.get((r['setting'], r['size']))
        if sub is None:
            raise SystemExit(f'{job.id}: no committed row for {r["setting"]} at {r["size"]}')
        c_full = unpack_correct(r['correct'], N_TEST)
        c_sub = unpack_correct(sub['correct'], int(sub['n_images']))
        p, n = c_full.mean(), int(sub['n_images'])
        se = 100.0 * math.sqrt(p * (1 - p) / n * (1 - n / N_TEST))
        diff = 100.0 * p - float(sub['top1'])
        rows.append(dict(job=job.id, encoding=job.encoding, seed=job.seed, setting=r['setting'], size=r['size'],
                         checkpoint_sha256=sha, top1_full=100.0 * p, top1_subset=float(sub['top1']),
                         subset_reproduced=bool(np.array_equal(c_full[idx], c_sub)),
                         subset_images_differing=int((c_full[idx] != c_sub).sum()),
                         full_minus_subset=diff, se=se, z=diff / se if se > 0 else 0.0, n_subset=n, n_full=N_TEST))
    return rows


def write_report(rows: list[dict[str, Any]], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / 'rows.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    n = len(rows)
    big = sum(abs(r['z']) > 1.96 for r in rows)
    same = sum(r['subset_reproduced'] for r in rows)
    lines = ['# Is the 2,000-image subset representative of the full Fashion-MNIST test set?', '',
             f'{n} cells ({len({r["job"] for r in rows})} jobs x knob settings x sizes). Top-1 % on all '
             f'{N_TEST:,} test images against the committed subset row of the same checkpoint (SHA-256 checked). '
             'SE: the spread of a simple random subset of that size without replacement.', '',
             f'- The full run reproduces the committed subset results image for image in {same} of {n} cells.',
             f'- |full - subset| > 1.96 SE in {big} of {n} cells (about 5% expected); largest |full - subset| '
             f'{max(abs(r["full_minus_subset"]) for r in rows):.2f} points; mean full - subset '
             f'{np.mean([r["full_minus_subset"] for r in rows]):+.2f}.', '',
             '| job | setting | size | all 10,000 | subset (committed) | full - subset | SE | z | subset reproduced |',
             '|---|---|---|---:|---:|---:|---:|---:|---|']
    for r in rows:
        same_images = 'yes' if r['subset_reproduced'] else f'no ({r["subset_images_differing"]} images)'
        lines.append(f'| {r["job"]} | {r["setting"]} | {r["size"]} | {r["top1_full"]:.2f} | {r["top1_subset"]:.2f} | '
                     f'{r["full_minus_subset"]:+.2f} | {r["se"]:.2f} | {r["z"]:+.2f} | {same_images} |')
    text = '\n'.join(lines) + '\n'
    (out / 'subset_check.md').write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--config', default=str(ROOT / 'configs/study/fmnist.yaml'))
    ap.add_argument('--jobs', nargs='+', required=True, help='finished job ids whose checkpoints are still here')
    ap.add_argument('--sizes', nargs='+', default=['32', '64', '128', '32x64'])
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--output', default=str(ROOT / 'benchmarks/results/fmnist_subset_check'))
    args = ap.parse_args(argv)
    spec = load_study(args.config)
    if spec.eval_images is None:
        raise SystemExit(f'{args.config} already evaluates every test image: nothing to check')
    full = load_study(args.config, ['--eval_images', 'null', '--sizes', json.dumps(args.sizes)])
    by_id = {j.id: j for j in spec.jobs()}
    unknown = [j for j in args.jobs if j not in by_id]
    if unknown:
        raise SystemExit(f'unknown job(s) {unknown}; `python -m visionpe.study list-jobs --config {args.config}`')
    out = Path(args.output)
    rows = [r for j in args.jobs for r in check_job(spec, full, by_id[j], args.threads)]
    print(write_report(merge_rows(out / 'rows.jsonl', rows), out))


def merge_rows(path: Path, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier runs' rows (``path``) for other jobs, then ``new``: checking more jobs later loses nothing, and a
    job checked again replaces its own rows."""
    jobs = {r['job'] for r in new}
    old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in old if r['job'] not in jobs] + new


if __name__ == '__main__':
    main()
