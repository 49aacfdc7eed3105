#!/usr/bin/env python
"""Refresh the generated parts of the README's study section from the committed study report.

The README's "Results so far" section holds four generated blocks, each between ``<!-- study:NAME -->`` and
``<!-- /study:NAME -->`` markers: ``status`` (how many jobs and which seeds are in), ``leaderboard`` (the table
of ``report/leaderboard.md``), ``anchors`` (one bullet per anchor check of ``report/cells.json``) and ``seeds``
(the training noise of ``report/seeds.md``). Everything else in the section is written by hand. Run after
``python -m visionpe.study aggregate``::

    python scripts/readme_results.py            # rewrite the blocks in README.md
    python scripts/readme_results.py --check    # exit 1 if README.md or the report is stale (used by the tests)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from visionpe.study.report import compute_text, recipe_counts
from visionpe.study.stats import t_quantile

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / 'benchmarks' / 'results' / 'fmnist_study'
REFERENCE_RECIPE = 'fixed'


def _code_list(names: list[str]) -> str:
    return ', '.join(f'`{n}`' for n in names)


def _seed_words(seeds: tuple[int, ...]) -> str:
    return ('seed ' if len(seeds) == 1 else 'seeds ') + ', '.join(map(str, seeds))


def fixed_seeds(jobs: list[str]) -> dict[str, tuple[int, ...]]:
    """encoding -> the seeds of the reference recipe finished, from job ids ``<encoding>__<recipe>__s<seed>``."""
    out: dict[str, list[int]] = {}
    for job in jobs:
        enc, recipe, seed = job.split('__')
        if recipe == REFERENCE_RECIPE:
            out.setdefault(enc, []).append(int(seed[1:]))
    return {e: tuple(sorted(s)) for e, s in out.items()}


def seed_groups(seeds: dict[str, tuple[int, ...]]) -> list[tuple[tuple[int, ...], list[str]]]:
    """The encodings grouped by their finished seeds, most seeds first."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for enc, s in seeds.items():
        groups.setdefault(s, []).append(enc)
    return sorted(((s, sorted(e)) for s, e in groups.items()), key=lambda g: (-len(g[0]), g[0]))


def _seed_phrase(seeds: dict[str, tuple[int, ...]], planned_encodings: list[str]) -> str:
    groups = seed_groups(seeds)
    missing = sorted(set(planned_encodings) - set(seeds))
    parts = []
    for i, (s, encs) in enumerate(groups):
        if i == len(groups) - 1 and not missing and len(groups) > 1 and len(encs) > 1:
            parts.append(f'{_seed_words(s)} of the other {len(encs)} encodings')
        else:
            parts.append(f'{_seed_words(s)} of {_code_list(encs)}')
    if missing:
        parts.append(f'no finished job yet for {_code_list(missing)}')
    return '; '.join(parts)


def status_block(meta: dict[str, Any]) -> str:
    jobs, planned = meta['jobs'], meta['planned']
    seeds = fixed_seeds(jobs)
    planned_encs = sorted({j.split('__')[0] for j in planned if j.split('__')[1] == REFERENCE_RECIPE})
    counts = sorted({len(s) for s in seeds.values() if len(s) > 1})
    t_note = '; '.join(f'{n} seeds: t = {t_quantile(0.975, n - 1):.2f} at {n - 1} degree{"s" if n > 2 else ""} of '
                       'freedom' for n in counts)
    text = (f'**{len(jobs)} of its {len(planned)} jobs have finished** ({recipe_counts(jobs, planned)}). '
            f'With the {REFERENCE_RECIPE} recipe: {_seed_phrase(seeds, planned_encs)}.')
    if t_note:
        text += (f' Where an encoding has several seeds, its interval combines Student\'s t over the seeds, still '
                 f'wide with so few seeds ({t_note}), with the binomial interval over the test images.')
    compute = compute_text(meta.get('compute', []))
    return text + (' ' + compute if compute else '')


def leaderboard_block(leaderboard_md: str) -> str:
    return '\n'.join(line for line in leaderboard_md.splitlines() if line.startswith('|'))


def _signed(x: float) -> str:
    return f'{x:+.1f}'


def _difference(d: dict[str, Any], with_unit: str) -> str:
    text = f'{_signed(d["difference"])} [{_signed(d["lo"])}, {_signed(d["hi"])}]{with_unit}'
    per_seed = d.get('per_seed') or {}
    if len(per_seed) > 1:
        text += ', by seed ' + ', '.join(_signed(per_seed[k]) for k in sorted(per_seed, key=int))
    return text


def _compared(d: dict[str, Any]) -> str:
    return f'{d["a"]} [{d["a_setting"]}] − {d["b"]} [{d["b_setting"]}]'


def anchors_block(anchors: list[dict[str, Any]], jobs: list[str]) -> str:
    seeds = fixed_seeds(jobs)
    lines = []
    for a in anchors:
        where = (' points pooled above the training size' if len(a['sizes']) > 1
                 else f' points at {a["sizes"][0]}')
        if a.get('difference') is None:
            lines.append(f'- {a["claim"]}, from {a["source"]}: **{a["verdict"]}**.')
            continue
        text = f'- {a["claim"]}, from {a["source"]}: **{a["verdict"]}** ({_compared(a)}: {_difference(a, where)})'
        t = a.get('tuned')
        if t and t.get('difference') is not None:
            same = all(t[k] == a[k] for k in ('a', 'b', 'a_setting', 'b_setting'))
            text += ('; the same pair at the best knobs.' if same else
                     f'; at the best knobs **{t["verdict"]}** ({_compared(t)}: {_difference(t, "")}).')
        else:
            text += '.'
        lines.append(text)
    groups = seed_groups(seeds)
    seed_note = '; '.join(f'{_seed_words(s)} for {_code_list(e)}' for s, e in groups if len(s) > 1)
    head = ('Each comparison uses the seeds both sides have run'
            + (f' ({seed_note}; seed 0 for the others)' if seed_note else '') + ':')
    return head + '\n\n' + '\n'.join(lines)


def seeds_block(spread: list[dict[str, Any]]) -> str:
    """One paragraph on training noise from the report's seed spread (``report/seeds.md``)."""
    if not spread:
        return 'No encoding has several seeds yet, so the study cannot yet say how much training noise moves a figure.'
    def rng(key, digits=1):
        lo, hi = (f'{v:.{digits}f}' for v in (min(s[key] for s in spread), max(s[key] for s in spread)))
        return f'{lo}-{hi}' if lo != hi else lo
    worst = sorted(spread, key=lambda s: -s['off_max'])[:3]
    where = '; '.join(f"{s['encoding']} [{s['off_max_at']['setting']}] at {s['off_max_at']['size']}: "
                      + ' vs '.join(f'{v:.1f}' for v in s['off_max_at']['top1']) + '%' for s in worst)
    return (f'**Seed noise** ([`seeds.md`](benchmarks/results/fmnist_study/report/seeds.md); {len(spread)} encodings '
            f'with several seeds of the {REFERENCE_RECIPE} recipe): at the training size their seeds agree within '
            f'{rng("train", 2)} points (max - min); off it they differ by a median of {rng("off_median")} points per '
            f'encoding over the knob settings and sizes, and by up to {worst[0]["off_max"]:.1f} ({where}). That is '
            'training noise, far beyond the ±2-point binomial interval of one seed, which covers test-set sampling '
            'only: read single-seed gaps of a few points off the training size as unresolved.')


def blocks(study: Path | None = None) -> dict[str, str]:
    report = (study or STUDY) / 'report'
    data = json.loads((report / 'cells.json').read_text())
    meta = data['meta']
    return {'status': status_block(meta),
            'leaderboard': leaderboard_block((report / 'leaderboard.md').read_text()),
            'anchors': anchors_block(data['anchors'], meta['jobs']),
            'seeds': seeds_block(data.get('seed_spread', []))}


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf'(<!-- study:{name} -->)(.*?)(<!-- /study:{name} -->)', re.S)


def render(readme: str, new: dict[str, str]) -> str:
    for name, body in new.items():
        pat = _pattern(name)
        if not pat.search(readme):
            raise SystemExit(f'README.md has no <!-- study:{name} --> ... <!-- /study:{name} --> block: add the '
                             f'markers where the generated {name} should go')
        readme = pat.sub(lambda m: f'{m.group(1)}\n{body}\n{m.group(3)}', readme)
    return readme


def stale_report(study: Path | None = None) -> list[str]:
    """Problems that make the committed report disagree with the committed rows (empty when consistent)."""
    study = study or STUDY
    rows = sorted(p.stem for p in (study / 'rows').glob('*.jsonl'))
    meta = json.loads((study / 'report' / 'cells.json').read_text())['meta']
    problems = []
    if rows != sorted(meta['jobs']):
        extra = sorted(set(rows) - set(meta['jobs']))
        gone = sorted(set(meta['jobs']) - set(rows))
        problems.append(f'report/cells.json covers other jobs than rows/ (rows not in the report: {extra}; report '
                        f'jobs without rows: {gone}): run `python -m visionpe.study aggregate --config '
                        f'configs/study/fmnist.yaml`, then this script')
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--check', action='store_true', help='only check; exit 1 if README.md or the report is stale')
    ap.add_argument('--readme', type=Path, default=ROOT / 'README.md')
    args = ap.parse_args(argv)
    problems = stale_report()
    readme = args.readme.read_text()
    fresh = render(readme, blocks())
    if args.check:
        if fresh != readme:
            problems.append(f'{args.readme.name} study blocks differ from the report: run scripts/readme_results.py')
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    for p in problems:
        print('warning:', p, file=sys.stderr)
    if fresh != readme:
        args.readme.write_text(fresh)
        print(f'updated {args.readme}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
