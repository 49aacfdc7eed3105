"""``eval_resolution.py``: command line of the resolution-extrapolation evaluator.

Examples::

    python eval_resolution.py            # the train.py default model, Fashion-MNIST, 32..128 px
    python eval_resolution.py --models vit_ape_small vit_rope2d_small --checkpoints a.safetensors b.pth \\
        --data imagenet:/data/imagenet/val --resolutions 224 320 384 512 --crop-ratio 1.0
    python eval_resolution.py --checkpoints runs/x/checkpoints/last.ckpt --coord-modes index ref \\
        --rope-scaling none ntk --temperature off on
    python eval_resolution.py --checkpoints runs/x/checkpoints/last.ckpt --resolutions 32 48 32x64 64x32 --per-image
    python eval_resolution.py --study configs/study/fmnist_quick.yaml --workers 2   # train + sweep + report
    python eval_resolution.py --benchmark fmnist --aggregate   # = --study configs/study/fmnist.yaml
    python eval_resolution.py --task coco --models vit_rope2d_small --checkpoints det.ckpt --data coco:/data/coco \\
        --resolutions 512 800 1024
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .data import parse_size
from .engine import row_key
from .models import RANDOM, KnobSpace, ModelSource, known_knobs
from .runner import ALL, MAX_BAD_FRACTION, TASKS, EvalConfig, EvalResult, run_eval

__all__ = ['main', 'build_parser', 'config_from_args', 'default_checkpoint', 'DEFAULT_RUN']

log = logging.getLogger(__name__)
DEFAULT_RUN = Path('runs') / 'fmnist_vit_tiny' / 'checkpoints'
DEFAULT_RESOLUTIONS = (32, 48, 64, 96, 128)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='eval_resolution.py', allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Evaluate models at many resolutions (train at one, test at many) and write CSV, JSON, '
                    'Markdown and a PNG plot into a run folder.',
        epilog='With no arguments: the model trained by `python train.py` '
               f'({DEFAULT_RUN}/last.ckpt) on the Fashion-MNIST test set at 32 48 64 96 128 px.')
    p.add_argument('--task', choices=TASKS, default='cls', help='cls (classification) or coco (detection)')
    p.add_argument('--models', nargs='+', metavar='NAME', help='registered model names (visionpe or timm)')
    p.add_argument('--checkpoints', nargs='+', metavar='PATH',
                   help='one per model, same order: a train.py .ckpt, a timm/safetensors/upstream file, "none" '
                        f'(local weights from $VISIONPE_WEIGHTS_DIR) or "{RANDOM}" (random init). With .ckpt '
                        'files only, --models may be left out (the names are in the checkpoints)')
    p.add_argument('--model-kwargs', nargs='+', metavar='JSON',
                   help='extra timm.create_model keywords as JSON: one for all models or one per model '
                        '(e.g. the architecture of a bare safetensors file)')
    p.add_argument('--data', default='fmnist', help='fmnist | PATH (image folder PATH/<class>/<image>) | '
                   'imagenet:PATH | coco:PATH (COCO_ROOT/annotations/instances_val2017.json + val2017/)')
    p.add_argument('--resolutions', nargs='+', type=_size_arg, metavar='SIZE',
                   help='sizes in px: N (square) or HxW (height x width), e.g. 32 48 32x64 64x32; default 32 48 64 '
                        '96 128. Fashion-MNIST: the whole image resized to HxW; image folders: HxW centre-crops the '
                        'largest region of aspect H:W and resizes it to HxW; coco: N only, the shorter side')
    p.add_argument('--output', metavar='DIR', help='run folder (default runs/eval/<time>; --study: the study folder)')
    p.add_argument('--crop-ratio', type=float, default=None,
                   help='image folders: resize the short side to r / ratio, centre-crop r (default 1.0 as RoPE-ViT; '
                        '0.875 as timm/DeiT). Not for fmnist, which resizes the whole image as in training')
    p.add_argument('--keep-aspect', action='store_true',
                   help='image folders: keep each image\'s aspect ratio: a size N is the shorter side, the longer '
                        'side follows (rounded to a multiple of the patch size), nothing is cropped, images are '
                        'batched by shape')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--max-images', type=_count_or_all, default=None, metavar='N|all',
                   help='evaluate a fixed subset of this many images (default: all, except Fashion-MNIST on a CPU: '
                        '2000); "all": every image on any device')
    p.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')
    p.add_argument('--workers', type=int, default=None,
                   help='image-folder DataLoader workers (default 2); with --study: worker processes, one thread '
                        'each (default 1)')
    p.add_argument('--per-image', action='store_true',
                   help='classification: add `correct` to every row, the top-1 correctness of each image in test-set '
                        'order (base64 of packed bits, visionpe.study.stats.unpack_correct), for paired comparisons; '
                        'every row of a run covers the same images (a fixed subset)')
    p.add_argument('--train-res', type=parse_size, default=None, metavar='N|HxW',
                   help='training size, N or HxW (default: from the checkpoint or the model config)')
    p.add_argument('--max-bias-mb', type=float, default=1024.0,
                   help='attention bias budget in MiB (over VISIONPE_MAX_BIAS_MB): biases above it are built '
                        'by blocks of query rows; the 16 MiB library default makes batch-256 blocks a row or two')
    p.add_argument('--resume', action='store_true',
                   help=f'reuse the rows of earlier runs into the same --output ({PARTIAL_ROWS}) that have the '
                        'same label, checkpoint (path and content), size (HxW) and image count; measure only the '
                        'rest (rows are only ever appended to that file)')
    p.add_argument('--max-bad-fraction', type=float, default=MAX_BAD_FRACTION,
                   help='image folders: unreadable images are skipped and listed; stop when more than this '
                        f'fraction of them is unreadable (default {MAX_BAD_FRACTION}, as training)')
    p.add_argument('--trust-checkpoint', action='store_true',
                   help='load .ckpt files even if their pickle asks for more than tensors and plain values (it could '
                        'run code): only for files you made or trust')
    p.add_argument('--no-ema', action='store_true', help='train.py checkpoints: the raw weights, not the EMA ones')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    k = p.add_argument_group('test-time knobs (declared by the encodings and models; each is swept like a '
                             'resolution; a knob a model lacks is not applicable to it)')
    for knob in known_knobs().values():
        k.add_argument(knob.option, nargs='*' if knob.bare is not None else '+', dest=f'knob_{knob.name}',
                       metavar=knob.name.upper(), help=knob.help)
    b = p.add_argument_group('studies (python -m visionpe.study: train, sweep and report many models)')
    b.add_argument('--study', metavar='FILE', help='run the study file (configs/study/*.yaml): its pending jobs with '
                   '--workers processes, then its report')
    b.add_argument('--benchmark', choices=tuple(BENCHMARKS), help='shortcut: --benchmark fmnist is --study '
                   f'{BENCHMARKS["fmnist"]} (the Fashion-MNIST study)')
    b.add_argument('--aggregate', action='store_true', help='with --study: only build the report from finished rows')
    b.add_argument('--print_config', action='store_true', help='with --study: print the parsed study file (every '
                   'field, defaults included) and exit')
    b.add_argument('--emit-slurm', metavar='DIR', help='with --study: write a SLURM array script (one task per '
                   'pending job) into DIR instead of running')
    return p


BENCHMARKS = {'fmnist': 'configs/study/fmnist.yaml'}


def _size_arg(text: str):
    """``--resolutions`` items: ``N`` -> N, ``HxW`` -> (h, w) (argparse reports a bad one)."""
    from .data import parse_size
    try:
        h, w = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return h if h == w and 'x' not in text else (h, w)


def _count_or_all(text: str) -> int | str:
    return ALL if text == ALL else int(text)


def study_argv(args: argparse.Namespace) -> list[str]:
    """``--study`` / ``--benchmark`` as the arguments of ``python -m visionpe.study``."""
    from ..study.jobs import REPO
    study = args.study or BENCHMARKS[args.benchmark]
    if args.benchmark and args.study:
        raise ValueError('--benchmark is a shortcut for --study: give one of them')
    if not Path(study).is_file() and (REPO / study).is_file():
        study = str(REPO / study)
    if args.aggregate and args.emit_slurm:
        raise ValueError('--aggregate and --emit-slurm are two different steps: give one')
    ignored = [o for o, v in (('--models', args.models), ('--checkpoints', args.checkpoints),
                              ('--resolutions', args.resolutions), ('--max-images', args.max_images),
                              ('--per-image', args.per_image), ('--resume', args.resume),
                              ('--keep-aspect', args.keep_aspect),
                              *((k.option, getattr(args, f'knob_{n}', None) is not None)
                                for n, k in known_knobs().items())) if v]
    if ignored:
        raise ValueError(f'{" ".join(ignored)}: a study takes its models, sizes and images from its file ({study}); '
                         f'drop them or edit the file (python -m visionpe.study --config {study} --print_config)')
    cmd = 'aggregate' if args.aggregate else 'emit-slurm' if args.emit_slurm else 'run'
    argv = [cmd, '--config', study]
    if args.output:
        argv += ['--output', args.output]
    if args.device != 'auto':
        argv += ['--device', args.device]
    if args.print_config:
        return argv + ['--print_config']
    if args.emit_slurm:
        argv += ['--slurm-dir', args.emit_slurm]
    if cmd == 'run':
        argv += ['--workers', str(args.workers or 1)]
        if args.no_progress:
            argv.append('--no-progress')
    return argv


def default_checkpoint(run_dir: Path = DEFAULT_RUN) -> Path:
    """``last.ckpt`` of the default ``python train.py`` run, else its newest ``best-*.ckpt``."""
    last = run_dir / 'last.ckpt'
    if last.is_file():
        return last
    best = sorted(run_dir.glob('best-*.ckpt'), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    raise FileNotFoundError(
        f'no checkpoint in {run_dir} (looked for last.ckpt and best-*.ckpt): run `python train.py` first (it trains '
        f'the default Fashion-MNIST model there), or pass --models NAME --checkpoints PATH')


def _ckpt_model_name(path: str) -> str:
    from ..train.ckpt_io import checkpoint_hparams
    return checkpoint_hparams(path)['model_name']


def knob_space(args: argparse.Namespace) -> KnobSpace:
    """The knob flags (generated from the declarations) as a :class:`KnobSpace`."""
    axes = {}
    for name, knob in known_knobs().items():
        words = getattr(args, f'knob_{name}', None)
        if words is None:
            continue
        axes[name] = [knob.from_word(w) for w in words] if words else [knob.bare]
    return KnobSpace(**axes).validate()


def model_sources(args: argparse.Namespace) -> list[ModelSource]:
    """``--models`` / ``--checkpoints`` / ``--model-kwargs`` as sources (the train.py default when none given)."""
    names, ckpts = args.models, args.checkpoints
    if not names and not ckpts:
        ckpts = [str(default_checkpoint())]
    if ckpts and names and len(ckpts) != len(names):
        raise ValueError(f'--checkpoints has {len(ckpts)} entries for {len(names)} --models; give one per model '
                         f'(in the same order; "none" for local weights, "{RANDOM}" for random init)')
    if not names:
        names = [_ckpt_model_name(c) for c in ckpts]
    ckpts = [None if c in (None, 'none') else c for c in (ckpts or [None] * len(names))]
    kw_list: list[dict[str, Any]] = [{}] * len(names)
    if args.model_kwargs:
        try:
            parsed = [json.loads(s) for s in args.model_kwargs]
        except json.JSONDecodeError as e:
            raise ValueError(f'--model-kwargs must be JSON objects, e.g. \'{{"embed_dim": 96}}\': {e}') from None
        if not all(isinstance(d, dict) for d in parsed):
            raise ValueError('--model-kwargs must be JSON objects, e.g. \'{"embed_dim": 96}\'')
        if len(parsed) not in (1, len(names)):
            raise ValueError(f'--model-kwargs: give one JSON object for all models or one per model ({len(names)})')
        kw_list = parsed * len(names) if len(parsed) == 1 else parsed
    return [ModelSource(n, c, dict(kw), use_ema=not args.no_ema) for n, c, kw in zip(names, ckpts, kw_list)]


def config_from_args(args: argparse.Namespace, models: list[ModelSource]) -> EvalConfig:
    return EvalConfig(models=models, data=args.data, resolutions=args.resolutions or DEFAULT_RESOLUTIONS,
                      task=args.task, crop_ratio=args.crop_ratio, keep_aspect=args.keep_aspect,
                      batch_size=args.batch_size,
                      max_images=args.max_images, device=args.device, knobs=knob_space(args),
                      train_res=args.train_res, workers=2 if args.workers is None else args.workers,
                      progress=not args.no_progress, max_bias_mb=args.max_bias_mb,
                      max_bad_fraction=args.max_bad_fraction, per_image=args.per_image)


PARTIAL_ROWS = 'rows.partial.jsonl'


class RowLog:
    """Appends each result row to a JSON-lines file as soon as it is measured, so a sweep that is cut off
    keeps what it measured (the full reports are written at the end). The file is only ever appended to
    (never truncated or rewritten), and created by the first row, so a run that fails its checks touches
    nothing; rows already in it (``existing``, the ones ``--resume`` reuses) are not written again."""

    def __init__(self, path: Path, existing: Sequence[dict[str, Any]] = ()):
        self.path = path
        self.existing = {row_key(r) for r in existing}
        self.written = 0

    def __call__(self, row: dict[str, Any]) -> None:
        if row_key(row) in self.existing:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open('a') as f:
            f.write(json.dumps(row, default=str) + '\n')
            f.flush()
        self.written += 1


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``rows.partial.jsonl`` (none if it does not exist; a torn last line is dropped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning('--resume: skipping an unreadable line of %s', path)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluator; bad input ends with ``error: ...`` on stderr and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.study or args.benchmark:
        from ..study.__main__ import main as study_main
        try:
            sargv = study_argv(args)
        except ValueError as e:
            parser.exit(2, f'{parser.prog}: error: {e}\n')
        return study_main(sargv)
    if args.aggregate or args.emit_slurm or args.print_config:
        parser.exit(2, f'{parser.prog}: error: --aggregate / --emit-slurm / --print_config need --study FILE (or '
                       f'--benchmark fmnist)\n')
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    from ..train.ckpt_io import trusting
    try:
        with trusting(args.trust_checkpoint):  # every checkpoint read below: ckpt_io.read_checkpoint(trust=None)
            result, out = run_from_args(args, argv)
    except (ValueError, FileNotFoundError, TypeError, KeyError, RuntimeError) as e:
        parser.exit(2, f'{parser.prog}: error: {e}\n')
    except KeyboardInterrupt:
        where = Path(args.output or '.') / PARTIAL_ROWS
        parser.exit(130, f'{parser.prog}: interrupted; the rows measured so far are in {where} (rerun with --resume '
                         f'to measure only the rest)\n')
    return 0


def run_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None):
    """Parse-level work of :func:`main` (raises instead of exiting): ``(EvalResult, out dir)``."""
    from .report import markdown_table, write_reports
    extra: dict[str, Any] = {}
    out = Path(args.output) if args.output else None
    models = model_sources(args)
    cfg = config_from_args(args, models)
    out = out or Path('runs') / 'eval' / time.strftime('%Y%m%d-%H%M%S')
    args.output = str(out)  # where an interrupted run's rows are
    reuse = read_rows(out / PARTIAL_ROWS) if args.resume else []
    if args.resume:
        log.info('--resume: %d earlier rows in %s', len(reuse), out / PARTIAL_ROWS)
    t0 = time.perf_counter()
    result: EvalResult = run_eval(cfg, on_row=RowLog(out / PARTIAL_ROWS, reuse), reuse=reuse)
    extra['eval_wall_s'] = time.perf_counter() - t0
    cmd = ['eval_resolution.py', *(sys.argv[1:] if argv is None else argv)]
    paths = write_reports(result, out, cmd, extra)
    result.meta.update(extra)
    unit = 'px' if cfg.task == 'cls' else 'px (short side)'
    print(f"\n{result.headline} ({result.meta['data']}, {result.meta['subset_note']}); bold: best, †: training size\n")
    print(markdown_table(result.rows, result.headline, result.meta['resolutions'], unit))
    for s in result.meta.get('skipped', []):
        print(f"skipped {s['label']}: {s['reason']}")
    bad = result.meta.get('unreadable_images') or {}
    if bad.get('count'):
        print(f"skipped {bad['count']} unreadable image(s) (listed in results.json): "
              + ', '.join(i['path'] for i in bad['images'][:5]) + (' ...' if bad['count'] > 5 else ''))
    print('\nwrote ' + ', '.join(str(p) for p in paths.values()))
    return result, out
