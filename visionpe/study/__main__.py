"""``python -m visionpe.study --config configs/study/fmnist.yaml [--workers N | --job ID | --emit-slurm DIR |
--aggregate | --list-jobs | --print_config]``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .jobs import emit_slurm, pending_jobs, rows_path, run_job, run_local
from .report import write_report
from .spec import load_study, study_parser

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m visionpe.study', allow_abbrev=False,
                                description='Run, scale out and report a resolution-extrapolation study.')
    p.add_argument('command', nargs='?', default='run', choices=('run', 'run-job', 'aggregate', 'emit-slurm', 'list-jobs'),
                   help='run (pending jobs locally, then aggregate; default) | run-job (one job: --job) | '
                        'aggregate (report from finished rows) | emit-slurm (array script into --slurm-dir) | list-jobs')
    p.add_argument('--config', required=True, metavar='FILE', help='the study YAML (configs/study/*.yaml)')
    p.add_argument('--output', metavar='DIR', help="the study folder (default: the file's output, else runs/study/<name>)")
    p.add_argument('--device', metavar='DEV', help='cpu | cuda (overrides the file)')
    p.add_argument('--workers', type=int, default=1, help='local worker processes, one thread each')
    p.add_argument('--threads', type=int, default=1, help='run-job: threads of the job (OMP_NUM_THREADS)')
    p.add_argument('--job', metavar='ID', help='run-job: the job id (see list-jobs)')
    p.add_argument('--jobs', nargs='+', metavar='ID', help='run: only these job ids')
    p.add_argument('--rerun', action='store_true', help='run: run jobs again even when their rows exist')
    p.add_argument('--dry-run', action='store_true', help='run-job: print the train and sweep commands only')
    p.add_argument('--slurm-dir', metavar='DIR', help='emit-slurm: where to write study.sbatch and jobs.txt')
    p.add_argument('--gpus', type=int, default=0, help='emit-slurm: GPUs per task (0: CPU tasks)')
    p.add_argument('--cpus', type=int, default=4, help='emit-slurm: CPUs per task')
    p.add_argument('--time', default='12:00:00', help='emit-slurm: time limit per task')
    p.add_argument('--partition', help='emit-slurm: SLURM partition')
    p.add_argument('--no-plots', action='store_true', help='aggregate: tables only')
    p.add_argument('--print_config', action='store_true', help='print the parsed study (every field) and exit')
    p.add_argument('--no-progress', action='store_true')
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    overrides = []
    if args.output:
        overrides += ['--output', args.output]
    if args.device:
        overrides += ['--device', args.device]
    if args.print_config:
        p = study_parser()
        cfg = p.parse_args(['--config', args.config, *overrides])
        cfg.pop('config', None)
        print(p.dump(cfg), end='')
        return 0
    spec = load_study(args.config, overrides)
    reference = spec.recipes[0].name
    if args.command == 'list-jobs':
        for j in spec.jobs():
            print(j.id, 'done' if rows_path(spec, j).is_file() else 'pending')
        return 0
    if args.command == 'run-job':
        if not args.job:
            raise SystemExit('run-job needs --job ID (list-jobs lists them)')
        result = run_job(spec, spec.job(args.job), threads=args.threads, dry_run=args.dry_run)
        if args.dry_run:
            import shlex
            for cmd in result:
                print(shlex.join(cmd))
        else:
            print(result)
        return 0
    if args.command == 'emit-slurm':
        if not args.slurm_dir:
            raise SystemExit('emit-slurm needs --slurm-dir DIR')
        script = emit_slurm(spec, Path(args.config), Path(args.slurm_dir), gpus=args.gpus, cpus=args.cpus,
                            time_limit=args.time, partition=args.partition)
        print(f'{script}: submit with `sbatch {script}`, then `python -m visionpe.study aggregate --config {args.config}`')
        return 0
    if args.command == 'run':
        jobs = [spec.job(j) for j in args.jobs] if args.jobs else None
        todo = jobs if jobs is not None else (spec.jobs() if args.rerun else pending_jobs(spec))
        print(f'study {spec.name}: {len(spec.jobs())} jobs, {len(todo)} to run with {args.workers} worker(s)')
        failed = run_local(spec, args.workers, todo, rerun=args.rerun, progress=not args.no_progress)
        if failed:
            print(json.dumps(failed, indent=1), file=sys.stderr)
    paths = write_report(spec.out_dir, spec.train_size, reference, plots=not args.no_plots,
                         planned=[j.id for j in spec.jobs()])
    print(paths['leaderboard'].read_text())
    print(paths['anchors'].read_text())
    print(paths['recipes'].read_text())
    print('report:', ', '.join(str(p) for p in paths.values()))
    return 1 if args.command == 'run' and failed else 0


if __name__ == '__main__':
    raise SystemExit(main())
