"""Speed and memory of every encoding, as ratios to timm's own models measured in the same run.

    python benchmarks/throughput.py                        # every vit_<pe>_small + hierarchical tiny
    python benchmarks/throughput.py --models 'vit_rope2d*_small' --sizes 224 --no-memory
    python benchmarks/throughput.py --device cuda --batch 64 --out runs/bench
    python benchmarks/throughput.py --memory-only --mem-size 1024  # peak memory alone (exact anywhere)
    python benchmarks/throughput.py --models rst_tiny --sizes 448 --batch 1 --no-backward --no-memory

ViT rows are compared with timm's ``vit_small_patch16_224`` (plain ViT-S/16, learned APE); rows
that have a timm twin (``vit_rope2d_small`` vs ``vit_small_patch16_rope_224``, ...) also show the
ratio to that twin. Hierarchical rows are compared with timm's ``swin_tiny_patch4_window7_224``.
Columns: forward images/s at each size, forward+backward images/s at the first size, and peak
memory of one inference at ``--mem-size`` px (see ``visionpe.benchmark.peak_memory``). A ratio
above 1 means faster (speed) or more memory (memory). Timing runs in rounds: after one warm-up
each, every model of a group is called once per round, ``--repeats`` rounds, and the median (or,
with ``--stat min``, the fastest: for a CPU that stalls) is kept. The baseline appears twice, as two
separately built models (``(again)``): the gap between its two rows is the noise of the run.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import timm
import torch

import visionpe
from visionpe.benchmark import STATS, images_per_second, peak_memory, time_interleaved

VIT_BASELINE = 'vit_small_patch16_224'
HIER_BASELINE = 'swin_tiny_patch4_window7_224'
TIMM_TWINS = {
    'vit_rope2d_small': 'vit_small_patch16_rope_224',
    'vit_rope2d_mixed_small': 'vit_small_patch16_rope_mixed_224',
    'vit_ape_small': 'deit3_small_patch16_224',
    'vit_rope2d_ape_small': 'vit_small_patch16_rope_ape_224',
    'vit_rope2d_mixed_ape_small': 'vit_small_patch16_rope_mixed_ape_224',
    'vit_rope2d_dinov3_small': 'vit_small_patch16_dinov3',
    'swin_tiny': 'swin_tiny_patch4_window7_224',
}


def build(name: str, device: torch.device) -> torch.nn.Module:
    kwargs = dict(dynamic_img_size=True)
    if name.startswith('swin_') and not visionpe.models._registry._MODELS.get(name):
        kwargs = dict(strict_img_size=False)  # timm's Swin: pads to the window, any size
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError:
        model = timm.create_model(name)
    return model.to(device)


def set_mode(models: Dict[str, torch.nn.Module], size: int, training: bool) -> None:
    """Train or eval mode, and the input size for models that are not dynamic-size."""
    for m in models.values():
        m.train(training)
        if hasattr(m, 'set_input_size') and not getattr(m, 'dynamic_img_size', True):
            m.set_input_size(img_size=(size, size))


def measure_group(names: List[str], args, device: torch.device,
                  on_column: Callable[[Dict[str, Dict[str, Optional[float]]]], None] = lambda rows: None,
                  ) -> Dict[str, Dict[str, Optional[float]]]:
    """Every column for every model of one group. Timing is interleaved
    (:func:`visionpe.benchmark.time_interleaved`): each round runs every model once, so the ratios
    compare models under the same machine conditions. ``on_column(rows)`` runs after every column
    (the script saves what it has, so a long run that is stopped keeps its measured columns)."""
    models = {name: build(name.replace(' (again)', ''), device) for name in names}
    rows = {name: {'params_m': sum(p.numel() for p in m.parameters()) / 1e6} for name, m in models.items()}
    for size in [] if args.memory_only else args.sizes:
        batch = max(1, args.batch * (args.sizes[0] ** 2) // (size ** 2))
        x = torch.randn(batch, 3, size, size, device=device)
        set_mode(models, size, training=False)
        with torch.inference_mode():
            secs = time_interleaved({n: (lambda m=m: m(x)) for n, m in models.items()},
                                    repeats=args.repeats, device=device, stat=args.stat)
        report(rows, f'fwd_{size}', {n: images_per_second(s, batch) for n, s in secs.items()}, on_column)
    if not (args.memory_only or args.no_backward):
        size = args.sizes[0]
        x = torch.randn(args.batch, 3, size, size, device=device)

        def step(m: torch.nn.Module) -> None:
            m(x).float().sum().backward()
            m.zero_grad(set_to_none=True)  # no model keeps its gradients while the others run
        set_mode(models, size, training=True)
        secs = time_interleaved({n: (lambda m=m: step(m)) for n, m in models.items()},
                                repeats=args.repeats, device=device, stat=args.stat)
        report(rows, f'fwdbwd_{size}', {n: images_per_second(s, args.batch) for n, s in secs.items()}, on_column)
    if not args.no_memory:
        x = torch.randn(1, 3, args.mem_size, args.mem_size, device=device)
        mems = {}
        for name, m in models.items():
            m.eval()
            try:
                with torch.inference_mode(), peak_memory(device) as mem:
                    m(x)
                mems[name] = mem.mib
                print(f'  {name}: peak {mem.mib:.1f} MiB at {args.mem_size} px', file=sys.stderr, flush=True)
            except (RuntimeError, ValueError) as e:  # e.g. a fixed-size reference model
                print(f'  {name}: memory at {args.mem_size} px failed: {str(e).splitlines()[0]}', file=sys.stderr)
                mems[name] = None
        report(rows, f'mem_{args.mem_size}_mib', mems, on_column)
    return rows


def report(rows: Dict[str, Dict[str, Optional[float]]], col: str, values: Dict[str, Optional[float]],
           on_column: Callable[[Dict[str, Dict[str, Optional[float]]]], None]) -> None:
    """Store one measured column, print it at once and hand the rows to ``on_column``."""
    for name, v in values.items():
        rows[name][col] = v
    print(f'  measured {col}: ' + ', '.join(f'{n} {v:.4g}' for n, v in values.items() if v is not None),
          file=sys.stderr, flush=True)
    on_column(rows)


def table(rows: Dict[str, Dict[str, Optional[float]]], baseline: str, cols: List[str]) -> str:
    base = rows[baseline]
    head = ['model', 'params (M)'] + [f'{c} ({"MiB" if c.startswith("mem") else "img/s"})' for c in cols] + \
        [f'{c} / base' for c in cols] + ['vs timm twin (fwd)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, r in rows.items():
        vals = [f"{r['params_m']:.1f}"] + [f'{r[c]:.1f}' if r.get(c) is not None else 'n/a' for c in cols]
        ratios = [f'{r[c] / base[c]:.2f}' if r.get(c) and base.get(c) else 'n/a' for c in cols]
        twin = TIMM_TWINS.get(name)
        c0 = cols[0]
        twin_ratio = f'{r[c0] / rows[twin][c0]:.2f} ({twin})' if twin in rows and r.get(c0) else ''
        lines.append('| ' + ' | '.join([name] + vals + ratios + [twin_ratio]) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--models', nargs='*', default=['vit_*_small', 'swin*_tiny', 'cswin_tiny', 'rst_tiny'],
                    help='visionpe model names or glob patterns')
    ap.add_argument('--sizes', nargs='*', type=int, default=[224, 448])
    ap.add_argument('--batch', type=int, default=8, help='batch at the first size (scaled down for larger sizes)')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--stat', choices=STATS, default='median',
                    help='per-call time: median of the repeats, or their minimum (a CPU that stalls)')
    ap.add_argument('--mem-size', type=int, default=1024)
    ap.add_argument('--no-memory', action='store_true')
    ap.add_argument('--no-backward', action='store_true', help='skip the forward+backward column (forward only)')
    ap.add_argument('--memory-only', action='store_true',
                    help='only the peak memory (exact on any machine; timing needs an idle one)')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--out', type=Path, default=None, help='folder for results.json / results.csv')
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    ours = [n for n in visionpe.list_models() if any(fnmatch.fnmatch(n, p) for p in args.models)]
    vit = [n for n in ours if n.startswith('vit_')]
    hier = [n for n in ours if not n.startswith('vit_')]
    if args.memory_only and args.no_memory:
        ap.error('--memory-only and --no-memory leave nothing to measure')
    cols = ([] if args.memory_only else [f'fwd_{s}' for s in args.sizes]
            + ([] if args.no_backward else [f'fwdbwd_{args.sizes[0]}'])) + \
        ([] if args.no_memory else [f'mem_{args.mem_size}_mib'])
    print(f'# visionpe throughput on {device} ({platform.processor() or platform.machine()}, '
          f'{torch.get_num_threads()} threads), torch {torch.__version__}, timm {timm.__version__}, '
          f'{args.stat} of {args.repeats} timed calls')
    results = {}
    for group, baseline in ((vit, VIT_BASELINE), (hier, HIER_BASELINE)):
        if not group:
            continue
        twins = [TIMM_TWINS[n] for n in group if n in TIMM_TWINS]
        order = [baseline] + twins + group + ([] if args.memory_only else [baseline + ' (again)'])
        t0 = time.time()
        rows = measure_group(order, args, device,
                             on_column=lambda rows: save(args.out, device, cols, {**results, **rows}))
        print(f'  {len(order)} models measured in {time.time() - t0:.0f} s', file=sys.stderr)
        results.update(rows)
        print(f'\n## vs timm {baseline}\n')
        print(table(rows, baseline, cols))
    return 0


def save(out: Optional[Path], device: torch.device, cols: List[str], results: Dict[str, Dict]) -> None:
    """results.json and results.csv in ``out`` (nothing without ``--out``)."""
    if not out:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / 'results.json').write_text(json.dumps(
        dict(device=str(device), torch=torch.__version__, timm=timm.__version__, argv=sys.argv, rows=results),
        indent=2))
    with open(out / 'results.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['model'] + ['params_m'] + cols)
        for n, r in results.items():
            w.writerow([n, r['params_m']] + [r.get(c) for c in cols])


if __name__ == '__main__':
    sys.exit(main())
