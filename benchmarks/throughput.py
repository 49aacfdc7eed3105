"""Speed and memory of every encoding, as ratios to timm's own models measured in the same run.

    python benchmarks/throughput.py                        # every vit_<pe>_small + hierarchical tiny
    python benchmarks/throughput.py --models 'vit_rope2d*_small' --sizes 224 --no-memory
    python benchmarks/throughput.py --device cuda --batch 64 --out runs/bench
    python benchmarks/throughput.py --memory-only --mem-size 1024  # peak memory alone (exact anywhere)

ViT rows are compared with timm's ``vit_small_patch16_224`` (plain ViT-S/16, learned APE); rows
that have a timm twin (``vit_rope2d_small`` vs ``vit_small_patch16_rope_224``, ...) also show the
ratio to that twin. Hierarchical rows are compared with timm's ``swin_tiny_patch4_window7_224``.
Columns: forward images/s at each size, forward+backward images/s at the first size, and peak
memory of one inference at ``--mem-size`` px (see ``visionpe.benchmark.peak_memory``). A ratio
above 1 means faster (speed) or more memory (memory). Timing is the median of ``--repeats`` runs
after one warm-up (``--stat min``: the fastest, for a CPU that stalls); on a shared CPU expect a few
percent of noise (the baseline is measured at the start and at the end of the run, and both are
printed).
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
from typing import Dict, List, Optional

import timm
import torch

import visionpe
from visionpe.benchmark import images_per_second, peak_memory, time_call

VIT_BASELINE = 'vit_small_patch16_224'
HIER_BASELINE = 'swin_tiny_patch4_window7_224'
TIMM_TWINS = {
    'vit_rope2d_small': 'vit_small_patch16_rope_224',
    'vit_rope2d_mixed_small': 'vit_small_patch16_rope_mixed_224',
    'vit_ape_small': 'deit3_small_patch16_224',
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


def measure(name: str, args, device: torch.device) -> Dict[str, Optional[float]]:
    model = build(name, device)
    row: Dict[str, Optional[float]] = {'params_m': sum(p.numel() for p in model.parameters()) / 1e6}
    model.eval()
    for size in [] if args.memory_only else args.sizes:
        batch = max(1, args.batch * (args.sizes[0] ** 2) // (size ** 2))
        x = torch.randn(batch, 3, size, size, device=device)
        if hasattr(model, 'set_input_size') and not getattr(model, 'dynamic_img_size', True):
            model.set_input_size(img_size=(size, size))
        with torch.inference_mode():
            sec = time_call(lambda: model(x), warmup=1, repeats=args.repeats, device=device, stat=args.stat)
        row[f'fwd_{size}'] = images_per_second(sec, batch)
    size = args.sizes[0]
    model.train()
    x = torch.randn(args.batch, 3, size, size, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).float().sum().backward()
    if not args.memory_only:
        sec = time_call(step, warmup=1, repeats=args.repeats, device=device, stat=args.stat)
        row[f'fwdbwd_{size}'] = images_per_second(sec, args.batch)
    if not args.no_memory:
        model.eval()
        x = torch.randn(1, 3, args.mem_size, args.mem_size, device=device)
        try:
            with torch.inference_mode(), peak_memory(device) as mem:
                model(x)
            row[f'mem_{args.mem_size}_mib'] = mem.mib
        except (RuntimeError, ValueError) as e:  # e.g. a fixed-size reference model
            print(f'  {name}: memory at {args.mem_size} px failed: {str(e).splitlines()[0]}', file=sys.stderr)
            row[f'mem_{args.mem_size}_mib'] = None
    return row


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
    ap.add_argument('--stat', choices=('median', 'min'), default='median',
                    help='per-call time: median of the repeats, or their minimum (a CPU that stalls)')
    ap.add_argument('--mem-size', type=int, default=1024)
    ap.add_argument('--no-memory', action='store_true')
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
    cols = ([] if args.memory_only else [f'fwd_{s}' for s in args.sizes] + [f'fwdbwd_{args.sizes[0]}']) + \
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
        rows: Dict[str, Dict[str, Optional[float]]] = {}
        for name in order:
            t0 = time.time()
            real = name.replace(' (again)', '')
            rows[name] = measure(real, args, device)
            values = ', '.join(f'{c} {rows[name][c]:.4g}' for c in cols if rows[name].get(c) is not None)
            print(f'  measured {name} in {time.time() - t0:.0f} s: {values}', file=sys.stderr, flush=True)
            results[name] = rows[name]
            save(args.out, device, cols, results)  # a long run keeps what it has measured
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
