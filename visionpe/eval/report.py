"""Run-folder outputs of a sweep: ``results.csv``, ``results.json``, ``results.md``, ``results.png``.

The Markdown tables have one row per model (knob settings as extra row labels) and one column per
resolution, best value per column in bold; the numbers are the JSON / CSV ones rounded by :data:`FORMATS`.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

from .data import size_order
from .engine import EvalResult

__all__ = ['write_reports', 'markdown_table', 'format_value', 'FORMATS', 'run_metadata', 'ordered_sizes']

# metric -> (title, format, higher is better)
FORMATS: dict[str, tuple] = {
    'top1': ('top-1 accuracy (%)', '{:.2f}', True),
    'top5': ('top-5 accuracy (%)', '{:.2f}', True),
    'loss': ('cross-entropy', '{:.4f}', False),
    'images_per_s': ('throughput (images/s)', '{:.1f}', True),
    'peak_mem_mb': ('peak memory (MiB)', '{:.1f}', False),
    'AP': ('COCO AP', '{:.4f}', True), 'AP50': ('AP50', '{:.4f}', True), 'AP75': ('AP75', '{:.4f}', True),
    'APs': ('AP small', '{:.4f}', True), 'APm': ('AP medium', '{:.4f}', True), 'APl': ('AP large', '{:.4f}', True),
}


@contextlib.contextmanager
def _replacing(path: Path):
    """Write to a temporary file beside ``path`` and rename it over ``path`` once complete (an interrupted
    write leaves the old file as it was)."""
    tmp = path.with_name(f'.{path.stem}.tmp{path.suffix}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def format_value(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    return FORMATS.get(metric, (metric, '{:.4g}', True))[1].format(value)


def _labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r['label'] for r in rows))


def ordered_sizes(resolutions: Sequence[int | str]) -> list[int | str]:
    """Row ``resolution`` values (``N`` or ``'HxW'``) in report order: by area, then height."""
    return sorted(dict.fromkeys(resolutions), key=size_order)


def markdown_table(rows: Sequence[dict[str, Any]], metric: str, resolutions: Sequence[int | str],
                   unit: str = 'px') -> str:
    """Rows: labels; columns: sizes ``N`` / ``HxW`` by area then height (training resolution marked with †);
    best per column in bold."""
    resolutions = ordered_sizes(resolutions)
    labels = _labels(rows)
    cell = {(r['label'], r['resolution']): r.get(metric) for r in rows}
    higher = FORMATS.get(metric, ('', '', True))[2]
    best: dict[int, str] = {}
    for res in resolutions:
        vals = [cell[(lab, res)] for lab in labels if cell.get((lab, res)) is not None]
        if vals:
            best[res] = format_value(metric, max(vals) if higher else min(vals))
    train = {r['label']: r.get('train_res') for r in rows}
    out = ['| model | ' + ' | '.join(f'{res} {unit}' for res in resolutions) + ' |',
           '|---|' + '---:|' * len(resolutions)]
    for lab in labels:
        cells = []
        for res in resolutions:
            text = format_value(metric, cell.get((lab, res)))
            if text != '-' and text == best.get(res):
                text = f'**{text}**'
            if train.get(lab) == res:
                text += ' †'
            cells.append(text)
        out.append(f'| {lab} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(out)


def run_metadata(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The exact command and the versions of everything that decides the numbers."""
    import shlex

    import numpy
    import timm
    import torch

    import visionpe
    argv = list(sys.argv if argv is None else argv)
    versions = dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
                    numpy=numpy.__version__, visionpe=getattr(visionpe, '__version__', 'unknown'))
    try:
        import lightning
        versions['lightning'] = lightning.__version__
    except ImportError:  # pragma: no cover
        pass
    return dict(command=' '.join(shlex.quote(a) for a in argv), argv=argv, versions=versions,
                platform=platform.platform())


def write_reports(result: EvalResult, out_dir: Path, argv: Sequence[str] | None = None,
                  extra_meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write CSV, JSON, Markdown and PNG into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, meta = result.rows, {**result.meta, **run_metadata(argv), **(extra_meta or {})}
    resolutions = meta['resolutions']
    paths = {k: out_dir / f'results.{k}' for k in ('csv', 'json', 'md', 'png')}

    keys = list(dict.fromkeys(k for r in rows for k in r)) or ['label', 'resolution', *result.metrics]
    with _replacing(paths['csv']) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        label_at = {lab: i for i, lab in enumerate(_labels(rows))}
        for r in sorted(rows, key=lambda r: (label_at[r['label']], size_order(r['resolution']))):  # by area
            w.writerow({k: ('' if r.get(k) is None else r.get(k)) for k in keys})

    with _replacing(paths['json']) as tmp, open(tmp, 'w') as f:
        json.dump(dict(meta=meta, headline=result.headline, metrics=list(result.metrics), rows=rows), f, indent=1,
                  default=str)

    unit = 'px' if meta.get('task') == 'cls' else 'px (short side)'
    md = [f"# Resolution sweep: {FORMATS[result.headline][0]}", '',
          f"Data: {meta['data']} ({meta.get('subset_note', '')}). Preprocessing: {meta.get('preprocessing', '')}.",
          f"Device: {meta['device']}. Command: `{meta['command']}`", '',
          'Bold: best per column; †: training resolution.', '',
          markdown_table(rows, result.headline, resolutions, unit)]
    for metric in result.metrics:
        if metric == result.headline:
            continue
        md += ['', f'## {FORMATS[metric][0]}', '', markdown_table(rows, metric, resolutions, unit)]
    if meta.get('skipped'):
        md += ['', '## Skipped', ''] + [f"- {s['label']}: {s['reason']}" for s in meta['skipped']]
    bad = meta.get('unreadable_images') or {}
    if bad.get('count'):
        md += ['', f"## Unreadable images ({bad['count']}, skipped)", ''] + [f"- {i['path']}: {i['error']}"
                                                                             for i in bad['images']]
    notes = [f"- {m['name']}: {'; '.join(m['notes'])}" for m in meta.get('models', []) if m.get('notes')]
    if notes:
        md += ['', '## Knobs not applicable', ''] + notes
    md += ['', f"Metrics: {meta.get('metrics_note', '')}", '']
    with _replacing(paths['md']) as tmp:
        tmp.write_text('\n'.join(md))

    plot(rows, result.headline, resolutions, paths['png'], title=f"{meta['data']}: {FORMATS[result.headline][0]}")
    return paths


def plot(rows: Sequence[dict[str, Any]], metric: str, resolutions: Sequence[int | str], path: Path,
         title: str = '') -> None:
    """Metric vs size, one line per label: one colour per model, one line style per knob setting of
    that model; each line's training resolution marked by a star and the training resolutions by dotted
    vertical lines. Square sizes only: x is the side in px; with ``HxW`` sizes, x is the size's rank (by area,
    then height), labelled with the size."""
    resolutions = ordered_sizes(resolutions)
    square = all(isinstance(r, int) for r in resolutions)
    xpos = {r: (r if square else i) for i, r in enumerate(resolutions)}
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    many = len(_labels(rows)) > 8
    fig, ax = plt.subplots(figsize=(11 if many else 7.5, 5.5 if many else 4.8), dpi=120)
    model_of = {r['label']: r.get('model', r['label']) for r in rows}
    models = list(dict.fromkeys(model_of[lab] for lab in _labels(rows)))
    palette = plt.get_cmap('tab20' if len(models) > 10 else 'tab10').colors
    settings: dict[str, int] = {}  # labels drawn so far per model
    train_sizes = set()
    for lab in _labels(rows):
        pts = sorted((xpos[r['resolution']], r[metric]) for r in rows
                     if r['label'] == lab and r.get(metric) is not None and r['resolution'] in xpos)
        if not pts:
            continue
        i = models.index(model_of[lab])
        k = settings[model_of[lab]] = settings.get(model_of[lab], -1) + 1
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=lab, color=palette[i % len(palette)],
                        ls=('-', '--', ':', '-.')[k % 4], marker='osD^v'[i // len(palette) % 5], ms=3)
        tr = xpos.get(next((r.get('train_res') for r in rows if r['label'] == lab), None))
        if tr is not None:
            train_sizes.add(tr)
            at = [p for p in pts if p[0] == tr]
            if at:
                ax.plot([tr], [at[0][1]], marker='*', ms=12, color=line.get_color())
    for tr in sorted(train_sizes):
        ax.axvline(tr, color='grey', ls=':', lw=1)
        ax.annotate(f'train {resolutions[tr] if not square else tr}', (tr, 0.02), xycoords=('data', 'axes fraction'), fontsize=8, color='grey')
    ax.set_xticks([xpos[r] for r in resolutions], [str(r) for r in resolutions])
    ax.set_xlabel('resolution (px)' if square else 'size (px, height x width; by area)')
    ax.set_ylabel(FORMATS.get(metric, (metric,))[0])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if many:  # outside the axes, so the lines stay readable
        ax.legend(fontsize=6, loc='upper left', bbox_to_anchor=(1.01, 1.0), ncol=1 + len(_labels(rows)) // 30)
    else:
        ax.legend(fontsize=7, loc='best')
    fig.tight_layout()
    with _replacing(Path(path)) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
