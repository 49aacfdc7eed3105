"""The report of a study, built from its job rows only (``rows/*.jsonl``): no checkpoint is needed.

Outputs in ``<study dir>/report/``: ``cells.csv`` / ``cells.json`` (every (encoding, recipe, knob setting,
size) with mean, 95% interval, seeds, retention), ``leaderboard.md`` (each encoding at its best recipe and
knob setting, plus its fixed-recipe default row; the training size marked; cells not significantly below
the column's best marked), ``anchors.md`` (published claims checked), and three plots: ``families.png``
(one panel per encoding family, a line per recipe / knob setting, interval bands), ``best.png`` (each
encoding's best setting) and ``retention.png`` (retention heatmap, encodings x sizes).

The best setting is chosen by its mean accuracy over the sizes other than the training size, on the same
test images the table reports: an optimistic choice, stated in the leaderboard, that the fixed-recipe
default row lets a reader discount.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..eval.data import size_order
from .spec import parse_size
from .stats import Interval, paired_bootstrap, retention, summarize, t_interval, unpack_correct

__all__ = ['load_rows', 'Cell', 'build_cells', 'leaderboard', 'anchor_checks', 'seed_spread', 'write_report',
           'ANCHORS', 'FAMILIES', 'FAMILY_ORDER', 'family_of', 'family_rank', 'coverage', 'recipe_counts',
           'compute_by_device', 'compute_text']

#: encoding-name prefix -> family (the panels of families.png); the first matching prefix wins
FAMILIES: tuple[tuple[str, str], ...] = (
    ('rope2d_mixed_ape', 'RoPE + learned APE'), ('rope2d_ape', 'RoPE + learned APE'), ('rope2d_mixed', 'RoPE-Mixed'),
    ('rope2d_dinov3', 'other 2-D RoPEs'), ('rope2d_polar', 'other 2-D RoPEs'), ('spiral', 'other 2-D RoPEs'),
    ('rope2d', 'RoPE-Axial'), ('comrope', 'ComRoPE / LieRE'), ('liere', 'ComRoPE / LieRE'),
    ('lookhere', 'LookHere'), ('alibi', 'distance biases'), ('fire', 'distance biases'), ('irpe', 'iRPE'),
    ('pape', 'PaPE'), ('pope', 'PoPE'), ('cpvt', 'CPVT (conditional)'), ('lape', 'absolute'), ('ape', 'absolute'),
    ('sincos', 'absolute'), ('nope', 'absolute'),
)


def family_of(encoding: str) -> str:
    for prefix, fam in FAMILIES:
        if encoding.startswith(prefix):
            return fam
    return encoding.split('_')[0]


#: the order of the families in tables and panels: the absolute baselines, then rotary, then bias-based
FAMILY_ORDER: tuple[str, ...] = ('absolute', 'CPVT (conditional)', 'RoPE-Axial', 'RoPE-Mixed', 'RoPE + learned APE',
                                 'other 2-D RoPEs', 'ComRoPE / LieRE', 'PaPE', 'PoPE', 'LookHere', 'iRPE',
                                 'distance biases')


def family_rank(family: str) -> tuple[int, str]:
    """Sort key of a family: its place in :data:`FAMILY_ORDER`, unknown families last."""
    return (FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER), family)


def load_rows(study_dir: Path) -> list[dict[str, Any]]:
    """Every row of every finished job (``rows/*.jsonl``), in file order."""
    rows = []
    for path in sorted((Path(study_dir) / 'rows').glob('*.jsonl')):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


_size_key = size_order  # sizes by area, then height (as the evaluator's reports)


@dataclass
class Cell:
    """One (encoding, recipe, setting, size) over its seeds."""
    encoding: str
    recipe: str
    setting: str
    size: str
    acc: Interval
    retention: Interval | None
    seeds: list[int]
    n_images: int | None

    def as_row(self) -> dict[str, Any]:
        r = dict(encoding=self.encoding, family=family_of(self.encoding), recipe=self.recipe, setting=self.setting,
                 size=self.size, top1=self.acc.mean, lo=self.acc.lo, hi=self.acc.hi, sd=self.acc.sd,
                 interval=self.acc.method, seeds=len(self.seeds), n_images=self.n_images)
        if self.retention is not None:
            r.update(retention=self.retention.mean, retention_lo=self.retention.lo, retention_hi=self.retention.hi,
                     retention_interval=self.retention.method)
        return r


Key = tuple[str, str, str]  # (encoding, recipe, setting)


def is_native(setting: str) -> bool:
    """Whether a setting label (``'coord_mode=index, rope_scaling=ntk'``) is the model's own, read from the
    label alone (rows written before the evaluator marked ``native``): no knob changed except the coordinate
    mode named as the one it was trained with (a mode not ending in ``ref``: position interpolation is the
    test-time alternative)."""
    if setting == 'default':
        return True
    pairs = [p.split('=', 1) for p in setting.split(', ')]
    return all(k == 'coord_mode' and not v.endswith('ref') for k, v in pairs)


def _is_native_key(grouped, key: Key) -> bool:
    """Whether ``key``'s rows are the model's own setting: the evaluator's ``native`` mark where the rows carry
    it (the value the model was built with), else the label (:func:`is_native`)."""
    marks = [r['native'] for seeds in grouped[key].values() for r in seeds.values() if 'native' in r]
    return all(marks) if marks else is_native(key[2])


def _reference(grouped, enc: str, recipe: str) -> Key | None:
    """The reference key of ``enc`` under ``recipe``: its native knob setting (:func:`_is_native_key`)."""
    keys = [k for k in grouped if k[0] == enc and k[1] == recipe and _is_native_key(grouped, k)]
    return keys[0] if keys else None


def _by_setting(rows: list[dict[str, Any]]) -> dict[Key, dict[str, dict[int, dict[str, Any]]]]:
    """``{(encoding, recipe, setting): {size: {seed: row}}}``; a later row of the same cell and seed wins."""
    out: dict[Key, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        h, w = parse_size(r['size'])
        out[(r['encoding'], r['recipe'], r.get('setting', 'default'))][f'{h}x{w}'][int(r['seed'])] = r
    return out


def build_cells(rows: list[dict[str, Any]], train_size: str) -> list[Cell]:
    th, tw = parse_size(train_size)
    train = f'{th}x{tw}'
    cells = []
    for (enc, recipe, setting), sizes in _by_setting(rows).items():
        base = sizes.get(train, {})
        for size in sorted(sizes, key=_size_key):
            seeds = sorted(sizes[size])
            acc = [float(sizes[size][s]['top1']) for s in seeds]
            n_img = sizes[size][seeds[0]].get('n_images')
            ret = None
            paired = [s for s in seeds if s in base]
            if paired and all(float(base[s]['top1']) > 0 for s in paired):
                at, at_train = [sizes[size][s] for s in paired], [base[s] for s in paired]
                cx, cy = [_correct(r) for r in at], [_correct(r) for r in at_train]
                per_image = all(c is not None for c in cx + cy)
                ret = retention([float(r['top1']) for r in at], [float(r['top1']) for r in at_train],
                                cx if per_image else None, cy if per_image else None)
            cells.append(Cell(enc, recipe, setting, size, summarize(acc, n_img), ret, seeds, n_img))
    return cells


def _correct(row: dict[str, Any]) -> np.ndarray | None:
    packed, n = row.get('correct'), row.get('n_images')
    return unpack_correct(packed, int(n)) if packed and n else None


def compare(rows_a: dict[int, dict[str, Any]], rows_b: dict[int, dict[str, Any]]) -> Interval | None:
    """``acc(a) - acc(b)`` over their shared seeds: a paired bootstrap over images when both rows carry per-image
    results for the same images, else a t interval of the per-seed differences (None: no shared seed)."""
    seeds = sorted(set(rows_a) & set(rows_b))
    if not seeds:
        return None
    ca = [_correct(rows_a[s]) for s in seeds]
    cb = [_correct(rows_b[s]) for s in seeds]
    if all(x is not None for x in ca + cb) and all(x.shape == y.shape for x, y in zip(ca, cb)):
        return paired_bootstrap(ca, cb)
    return t_interval([float(rows_a[s]['top1']) - float(rows_b[s]['top1']) for s in seeds])


def per_seed_differences(rows_a: dict[int, dict[str, Any]], rows_b: dict[int, dict[str, Any]]) -> dict[int, float]:
    """``acc(a) - acc(b)`` in points for each seed both have."""
    return {s: float(rows_a[s]['top1']) - float(rows_b[s]['top1']) for s in sorted(set(rows_a) & set(rows_b))}


SEEDS_DISAGREE = 'inconclusive (seeds disagree)'


def signed_verdict(iv: Interval, per_seed: dict[int, float], above: str, below: str) -> str:
    """``above`` / ``below`` when the interval lies above / below 0 *and* every seed's difference has that sign;
    ``inconclusive (seeds disagree)`` when the interval excludes 0 but a seed goes the other way (the paired
    interval covers test-image sampling, not training noise, which off the training size can be larger);
    else ``inconclusive``."""
    if not iv.excludes_zero():
        return 'inconclusive'
    sign = 1.0 if iv.lo > 0 else -1.0
    if any(d * sign <= 0 for d in per_seed.values()):
        return SEEDS_DISAGREE
    return above if sign > 0 else below


def _fmt_difference(d: dict[str, Any] | None) -> str:
    """``+3.5 [+2.9, +4.0]``, then each seed's difference when there are several (``; seeds +5.9, +1.1``)."""
    if d is None or d.get('difference') is None:
        return '–'
    text = f"{d['difference']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]"
    seeds = d.get('per_seed') or {}
    if len(seeds) > 1:
        text += '; seeds ' + ', '.join(f'{v:+.1f}' for _, v in sorted(seeds.items()))
    return text


_SEED_RULE = ('With several seeds the cell also lists each seed\'s difference (seeds in order), and a verdict needs '
              'each seed to have the sign of the interval: otherwise it reads *inconclusive (seeds disagree)*, '
              'since the paired interval covers test-image sampling, not training noise.')


def _mean_above(sizes: dict[str, dict[int, dict[str, Any]]], train: str) -> float:
    th = _size_key(train)
    vals = [np.mean([float(r['top1']) for r in by_seed.values()]) for s, by_seed in sizes.items()
            if _size_key(s) > th]
    return float(np.mean(vals)) if vals else float('-inf')


def _best_settings(grouped, train: str, reference_recipe: str) -> list[tuple[Key, str]]:
    """Per encoding: its best (recipe, setting) by mean accuracy above the training size, and the reference
    (first recipe, default setting) row when it differs."""
    out = []
    for enc in sorted({k[0] for k in grouped}, key=lambda e: (family_rank(family_of(e)), e)):
        keys = [k for k in grouped if k[0] == enc]
        best = max(keys, key=lambda k: _mean_above(grouped[k], train))
        out.append((best, 'best'))
        ref = _reference(grouped, enc, reference_recipe)
        if ref is not None and ref != best:
            out.append((ref, 'reference'))
    return out


def _fmt(iv: Interval) -> str:
    """``mean ± half-width``; ``mean [lo, hi]`` for an interval cut at 0 or 100 % (no longer symmetric)."""
    if iv.method == 'none':
        return f'{iv.mean:.1f}'
    if iv.lo <= 0.0 or iv.hi >= 100.0:
        return f'{iv.mean:.1f} [{iv.lo:.1f}, {iv.hi:.1f}]'
    return f'{iv.mean:.1f} ± {iv.half_width:.1f}'


def leaderboard(rows: list[dict[str, Any]], train_size: str, reference_recipe: str) -> str:
    """Markdown leaderboard: each encoding at its best recipe / knob setting (and its reference row)."""
    th, tw = parse_size(train_size)
    train = f'{th}x{tw}'
    grouped = _by_setting(rows)
    if not grouped:
        return '(no finished jobs yet)\n'
    sizes = sorted({s for v in grouped.values() for s in v}, key=_size_key)
    chosen = _best_settings(grouped, train, reference_recipe)
    # the best row of each column (by mean), then each row compared with it
    col_best: dict[str, Key] = {}
    for s in sizes:
        have = [k for k, _ in chosen if s in grouped[k]]
        col_best[s] = max(have, key=lambda k: np.mean([float(r['top1']) for r in grouped[k][s].values()]))
    seeds = sorted({int(r['seed']) for r in rows})
    head = ['encoding', 'recipe', 'knobs', 'seeds'] + [f'{s}{" (train)" if s == train else ""}' for s in sizes]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * 3 + '---:|' * (len(sizes) + 1)]
    for key, kind in chosen:
        enc, recipe, setting = key
        cells = []
        for s in sizes:
            by_seed = grouped[key].get(s)
            if not by_seed:
                cells.append('–')
                continue
            acc = [float(by_seed[x]['top1']) for x in sorted(by_seed)]
            text = _fmt(summarize(acc, next(iter(by_seed.values())).get('n_images')))
            if col_best[s] == key:
                text = f'**{text}**'
            else:
                best_rows = grouped[col_best[s]][s]
                gap = compare(best_rows, by_seed)
                if gap is not None and signed_verdict(gap, per_seed_differences(best_rows, by_seed), 'below',
                                                      'above') != 'below':
                    text += ' ≈'
            cells.append(text)
        name = enc if kind == 'best' else f'{enc} (reference)'
        n_seeds = len({x for by_seed in grouped[key].values() for x in by_seed})
        lines.append('| ' + ' | '.join([name, recipe, setting, str(n_seeds), *cells]) + ' |')
    n_img = {r.get('n_images') for r in rows}
    notes = [
        f'Top-1 (%) mean ± half-width of the 95% interval over the seeds of each row (all: {seeds}) '
        f'(several seeds: Student\'s t over the seeds, which all see the same {sorted(x for x in n_img if x)} test '
        'images, combined in quadrature with the binomial half-width over those images; one seed: a binomial '
        'interval over the images, which covers test-set sampling only, not training noise); an interval that '
        'reaches 0 or 100% is cut there and printed as [lo, hi]. Bold: the best of the '
        'column; ≈: not significantly below it (paired bootstrap over the same test images and seeds, 95%; with '
        'several seeds a row counts as below only when each seed is below). Each encoding is shown at the recipe '
        'and knob setting with the best mean above the training size, chosen on these test images (optimistic), and at its '
        f'reference setting ({reference_recipe} recipe, its own knob setting) when that differs.']
    return '\n'.join(lines) + '\n\n' + notes[0] + '\n'


@dataclass(frozen=True)
class Claim:
    """A published claim the study can test: group ``a`` beats group ``b`` at ``where`` ('above': mean over sizes
    above the training size; 'far': the largest size), under the reference recipe (:func:`anchor_checks`)."""
    text: str
    source: str
    a: tuple[str, ...]
    b: tuple[str, ...]
    where: str = 'above'


ANCHORS: tuple[Claim, ...] = (
    Claim('RoPE-Mixed > RoPE-Axial above the training size', 'Heo et al. 2024, naver-ai/rope-vit',
          ('rope2d_mixed',), ('rope2d',)),
    Claim('RoPE-Axial > learned APE above the training size', 'Heo et al. 2024, naver-ai/rope-vit',
          ('rope2d',), ('ape',)),
    Claim('LookHere > 2-D RoPE far out', 'Fuller et al. 2024 (LookHere)', ('lookhere',), ('rope2d',), 'far'),
    Claim('ComRoPE-LD > ComRoPE-AP', 'Yu et al. 2025 (ComRoPE)', ('comrope_ld',), ('comrope_ap',)),
    Claim('ComRoPE-AP > RoPE-Axial', 'Yu et al. 2025 (ComRoPE)', ('comrope_ap',), ('rope2d',)),
    Claim('PaPE > every other encoding above the training size', 'PaPE (arXiv 2602.01418)', ('pape',),
          ('*',)),
    Claim('bias-based > rotation-based at ~4x', 'ViT extrapolation study 2026',
          ('lookhere', 'alibi2d', 'fire2d', 'irpe_bias'), ('rope2d', 'rope2d_mixed', 'comrope_ap', 'comrope_ld'), 'far'),
    Claim('FIRE-2D >> RoPE-Axial at ~4x', 'ViT extrapolation study 2026', ('fire2d',), ('rope2d',), 'far'),
)


def _pooled(grouped, key: Key, sizes: list[str]) -> dict[int, dict[str, Any]]:
    """Rows of ``key`` at ``sizes`` pooled per seed into one pseudo-row (accuracy and per-image results over all
    (image, size) pairs), for claims about a range of sizes."""
    out: dict[int, dict[str, Any]] = {}
    seeds = set.intersection(*[set(grouped[key].get(s, {})) for s in sizes]) if sizes else set()
    for seed in seeds:
        rs = [grouped[key][s][seed] for s in sizes]
        cs = [_correct(r) for r in rs]
        row = dict(top1=float(np.mean([float(r['top1']) for r in rs])))
        if all(c is not None for c in cs):
            from .stats import pack_correct
            allc = np.concatenate(cs)
            row.update(correct=pack_correct(allc), n_images=int(allc.size))
        out[seed] = row
    return out


def _best_knob(grouped, enc: str, recipe: str, sizes: list[str]) -> Key | None:
    """``enc``'s knob setting under ``recipe`` with the best mean accuracy over ``sizes`` (chosen on the test
    images themselves: optimistic for both sides of a comparison alike)."""
    keys = [k for k in grouped if k[0] == enc and k[1] == recipe and all(s in grouped[k] for s in sizes)]
    if not keys:
        return None
    return max(keys, key=lambda k: np.mean([float(r['top1']) for s in sizes for r in grouped[k][s].values()]))


_NOT_IN_STUDY: dict[str, Any] = dict(difference=None, lo=None, hi=None, verdict='not in study')


def _claim_difference(grouped, encs_a: list[str], encs_b: list[str], sizes: list[str], pick) -> dict[str, Any]:
    """The best of group ``a`` minus the best of group ``b`` (by mean over ``sizes``), each encoding at the knob
    setting ``pick(encoding)``; with its paired interval and verdict."""
    def pooled(encs):  # encoding -> (its key, its rows pooled over sizes), for encodings with rows there
        keyed = ((e, pick(e)) for e in encs)
        both = ((e, k, _pooled(grouped, k, sizes)) for e, k in keyed if k is not None)
        return {e: (k, rows) for e, k, rows in both if rows}

    pa, pb = pooled(encs_a), pooled(encs_b)
    if not pa or not pb:
        return dict(_NOT_IN_STUDY)

    def mean(v):
        return float(np.mean([r['top1'] for r in v[1].values()]))
    best_a = max(pa, key=lambda e: mean(pa[e]))
    best_b = max(pb, key=lambda e: mean(pb[e]))
    iv = compare(pa[best_a][1], pb[best_b][1])
    if iv is None:
        return dict(_NOT_IN_STUDY)
    per_seed = per_seed_differences(pa[best_a][1], pb[best_b][1])
    return dict(a=best_a, b=best_b, a_setting=pa[best_a][0][2], b_setting=pb[best_b][0][2], difference=iv.mean,
                lo=iv.lo, hi=iv.hi, interval=iv.method, per_seed=per_seed,
                verdict=signed_verdict(iv, per_seed, 'agrees', 'contradicts'))


def anchor_checks(rows: list[dict[str, Any]], train_size: str, reference_recipe: str,
                  claims: tuple[Claim, ...] = ANCHORS) -> list[dict[str, Any]]:
    """Each claim, under ``reference_recipe``: the measured difference (best of ``a`` minus best of ``b``, by mean)
    with its paired interval, each seed's difference and a verdict (:func:`signed_verdict`): agrees (interval
    above 0), contradicts (below 0), inconclusive (seeds disagree), inconclusive, or not in study. The main
    verdict takes each encoding at its own knob setting (as built and trained); ``tuned``
    repeats the check with each encoding at its best test-time knob setting over the claim's sizes."""
    th, tw = parse_size(train_size)
    train = f'{th}x{tw}'
    grouped = _by_setting(rows)
    encs = sorted({k[0] for k in grouped if k[1] == reference_recipe and _is_native_key(grouped, k)})
    all_sizes = sorted({s for v in grouped.values() for s in v}, key=_size_key)
    above = [s for s in all_sizes if _size_key(s) > _size_key(train)]
    out = []
    for c in claims:
        sizes = above if c.where == 'above' else above[-1:]
        a = [e for e in c.a if e in encs]
        b = [e for e in encs if e not in c.a] if c.b == ('*',) else [e for e in c.b if e in encs]
        rec: dict[str, Any] = dict(claim=c.text, source=c.source, sizes=sizes)
        if not a or not b or not sizes:
            out.append({**rec, **_NOT_IN_STUDY, 'tuned': dict(_NOT_IN_STUDY)})
            continue
        own = _claim_difference(grouped, a, b, sizes, lambda e: _reference(grouped, e, reference_recipe))
        tuned = _claim_difference(grouped, a, b, sizes, lambda e: _best_knob(grouped, e, reference_recipe, sizes))
        out.append({**rec, **own, 'tuned': tuned})
    return out


def _anchors_md(checks: list[dict[str, Any]], reference_recipe: str) -> str:
    def compared(c):
        return f"{c['a']} [{c['a_setting']}] − {c['b']} [{c['b_setting']}]" if 'a' in c else '–'

    diff = _fmt_difference
    lines = ['| claim | source | sizes | compared (own knobs) | difference | verdict | compared (best knobs) | '
             'difference | verdict |', '|---|---|---|---|---|---|---|---|---|']
    for c in checks:
        t = c['tuned']
        lines.append(f"| {c['claim']} | {c['source']} | {', '.join(c['sizes']) or '–'} | {compared(c)} | {diff(c)} | "
                     f"{c['verdict']} | {compared(t)} | {diff(t)} | {t['verdict']} |")
    note = (f"Both comparisons use the {reference_recipe} recipe. *Own knobs*: each encoding at its own knob setting, "
            "the one it was built and trained with (e.g. a RoPE keeps its patch-index coordinates at every size), "
            "as the published claims were made. *Best knobs*: each encoding at the test-time knob setting (coordinate "
            "mode, RoPE scaling) with the best mean over the claim's sizes, chosen on the same test images (optimistic "
            "for both sides alike). Where a group names several encodings (or every other one), its best member by "
            "mean is compared. Differences are in points of top-1, pooled over the listed sizes, with a 95% paired "
            "bootstrap interval over the same test images and seeds; agrees / contradicts: the interval lies above / "
            "below 0, else inconclusive. " + _SEED_RULE)
    return '\n'.join(lines) + '\n\n' + note + '\n'


def recipe_effects(rows: list[dict[str, Any]], train_size: str, reference_recipe: str) -> list[dict[str, Any]]:
    """Each recipe against ``reference_recipe`` for the same encoding and knob setting (``acc(recipe) -
    acc(reference)``, paired on the same images and seeds: :func:`compare`): at the training size (``train``),
    pooled over the sizes above it (``above``) and at the largest size (``far``); the verdict reads ``above``:
    helps (interval above 0), hurts (below 0), inconclusive (seeds disagree) or inconclusive
    (:func:`signed_verdict`)."""
    th, tw = parse_size(train_size)
    train = f'{th}x{tw}'
    grouped = _by_setting(rows)
    out = []
    for key in sorted(grouped, key=lambda k: (family_rank(family_of(k[0])), k[0], k[1], not _is_native_key(grouped, k),
                                              k[2])):
        enc, recipe, setting = key
        ref = (enc, reference_recipe, setting)
        if recipe == reference_recipe or ref not in grouped:
            continue
        shared = sorted(set(grouped[key]) & set(grouped[ref]), key=_size_key)
        above = [s for s in shared if _size_key(s) > _size_key(train)]
        parts: dict[str, Any] = {}
        verdict = 'no shared sizes'
        for name, sizes in (('train', [train] if train in shared else []), ('above', above), ('far', above[-1:])):
            rows_k, rows_r = (_pooled(grouped, key, sizes), _pooled(grouped, ref, sizes)) if sizes else ({}, {})
            iv = compare(rows_k, rows_r) if sizes else None
            per_seed = per_seed_differences(rows_k, rows_r)
            parts[name] = None if iv is None else dict(sizes=sizes, difference=iv.mean, lo=iv.lo, hi=iv.hi,
                                                       interval=iv.method, per_seed=per_seed)
            if name == 'above' and iv is not None:
                verdict = signed_verdict(iv, per_seed, 'helps', 'hurts')
        out.append(dict(encoding=enc, recipe=recipe, reference=reference_recipe, setting=setting,
                        native=_is_native_key(grouped, key), verdict=verdict, **parts))
    return out


def seed_spread(rows: list[dict[str, Any]], train_size: str, reference_recipe: str) -> list[dict[str, Any]]:
    """Training noise, which the paired image bootstrap does not cover: for each encoding with several seeds of
    ``reference_recipe``, the spread ``max - min`` of top-1 over its seeds in each (knob setting, size) cell that
    every one of them has run: the largest at the training size (``train``), the median over the cells off it
    (``off_median``) and the largest off it (``off_max``, with the cell and each seed's top-1 in ``off_max_at``)."""
    th, tw = parse_size(train_size)
    train = f'{th}x{tw}'
    grouped = _by_setting(rows)
    out = []
    for enc in sorted({k[0] for k in grouped if k[1] == reference_recipe}):
        keys = [k for k in grouped if k[0] == enc and k[1] == reference_recipe]
        seeds = sorted({s for k in keys for by_seed in grouped[k].values() for s in by_seed})
        if len(seeds) < 2:
            continue
        at_train, off = [], []
        for key in keys:
            for size, by_seed in grouped[key].items():
                if sorted(by_seed) != seeds:
                    continue
                top1 = [float(by_seed[s]['top1']) for s in seeds]
                cell = (max(top1) - min(top1), key[2], size, top1)
                (at_train if size == train else off).append(cell)
        if not off:
            continue
        worst = max(off, key=lambda c: c[0])
        out.append(dict(encoding=enc, seeds=seeds, train=max((c[0] for c in at_train), default=float('nan')),
                        off_median=float(np.median([c[0] for c in off])), off_max=worst[0],
                        off_max_at=dict(setting=worst[1], size=worst[2], top1=worst[3])))
    return out


def _seeds_md(spread: list[dict[str, Any]], reference_recipe: str) -> str:
    if not spread:
        return f'No encoding has several seeds of the {reference_recipe} recipe yet: no spread to show.\n'
    lines = ['| encoding | seeds | at the training size | median off it '
             '| largest off it (knobs, size: top-1 by seed) |',
             '|---|---|---:|---:|---|']
    for s in spread:
        at = s['off_max_at']
        lines.append(f"| {s['encoding']} | {', '.join(map(str, s['seeds']))} | {s['train']:.2f} | "
                     f"{s['off_median']:.1f} | {s['off_max']:.1f} ({at['setting']}, {at['size']}: "
                     f"{', '.join(f'{v:.1f}' for v in at['top1'])}) |")
    return ('\n'.join(lines) + '\n\n' + f'Spread of top-1 over the seeds of the {reference_recipe} recipe (max - min, '
            'points) in each knob setting and size that all of them have run: the largest at the training size, the '
            'median over the settings and sizes off it, and the largest off it. This is training noise, which the '
            'paired bootstrap intervals of the other tables do not cover (they resample test-image sampling '
            'only); a gap between two encodings smaller than these spreads needs more seeds before it means '
            'anything.\n')


def _recipes_md(effects: list[dict[str, Any]], reference_recipe: str) -> str:
    diff = _fmt_difference
    if not effects:
        return f'No recipe besides {reference_recipe} has rows yet: nothing to compare.\n'
    far = next((e['far']['sizes'][0] for e in effects if e['far']), 'largest size')
    lines = [f'| encoding | recipe | knobs | at the training size | above it (pooled) | at {far} | verdict above |',
             '|---|---|---|---|---|---|---|']
    for e in effects:
        knobs = e['setting'] + (' (own)' if e['native'] else '')
        lines.append(f"| {e['encoding']} | {e['recipe']} | {knobs} | {diff(e['train'])} | {diff(e['above'])} | "
                     f"{diff(e['far'])} | {e['verdict']} |")
    return ('\n'.join(lines) + '\n\n' + f'Top-1 difference in points, recipe minus the {reference_recipe} recipe at the '
            'same knob setting, with its 95% interval (paired bootstrap over the same test images and seeds; with '
            'one seed it covers test-set sampling only, not training noise). "above it": every size above the '
            'training size pooled. Verdict: helps / hurts when the pooled interval excludes 0. ' + _SEED_RULE + '\n')


_COLORS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22',
           '#17becf')  # matplotlib's tab10
_DASHES = ('-', '--', '-.', ':')
_MARKERS = ('o', 's', '^', 'D')


def line_style(i: int) -> dict[str, str]:
    """Colour, dash and marker of the i-th line of a plot: distinct for 40 lines (tab10 alone repeats after 10)."""
    k = (i // len(_COLORS)) % len(_DASHES)
    return dict(color=_COLORS[i % len(_COLORS)], ls=_DASHES[k], marker=_MARKERS[k])


def _plots(cells: list[Cell], rows, train: str, reference_recipe: str, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    sizes = sorted({c.size for c in cells}, key=_size_key)
    xs = {s: i for i, s in enumerate(sizes)}
    by_line: dict[Key, list[Cell]] = defaultdict(list)
    for c in cells:
        by_line[(c.encoding, c.recipe, c.setting)].append(c)
    fams = sorted({family_of(k[0]) for k in by_line}, key=family_rank)
    ncol = min(3, len(fams))
    nrow = (len(fams) + ncol - 1) // ncol
    n_lines = {f: sum(family_of(k[0]) == f for k in by_line) for f in fams}
    # each panel's legend goes below its axes: a row is as tall as its axes plus its longest legend
    legend_h = [0.12 * max(n_lines[f] for f in fams[r * ncol:(r + 1) * ncol]) + 0.3 for r in range(nrow)]
    fig = plt.figure(figsize=(5 * ncol, sum(3.0 + h for h in legend_h)), layout='constrained')
    grid = fig.add_gridspec(nrow, ncol, height_ratios=[3.0 + h for h in legend_h])
    axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(ncol)] for r in range(nrow)])
    for ax, fam in zip(axes.flat, fams):
        for key, cs in sorted(by_line.items()):
            if family_of(key[0]) != fam:
                continue
            cs = sorted(cs, key=lambda c: xs[c.size])
            x = [xs[c.size] for c in cs]
            label = key[0] + ('' if key[1] == reference_recipe else f' / {key[1]}') + \
                ('' if key[2] == 'default' else f' / {key[2]}')
            line, = ax.plot(x, [c.acc.mean for c in cs], ms=3, label=label, **line_style(len(ax.lines)))
            ax.fill_between(x, [c.acc.lo for c in cs], [c.acc.hi for c in cs], color=line.get_color(), alpha=0.15)
        ax.set_title(fam)
        ax.set_xticks(range(len(sizes)), sizes, rotation=45, fontsize=7)
        ax.set_ylim(0, 100)
        if train in xs:
            ax.axvline(xs[train], color='grey', ls=':', lw=1)
        ax.legend(fontsize=6, loc='upper center', bbox_to_anchor=(0.5, -0.22), frameon=False)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis('off')
    fig.supylabel('top-1 (%)')
    paths = [out / 'families.png']
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    grouped = _by_setting(rows)
    best = [k for k, kind in _best_settings(grouped, train, reference_recipe) if kind == 'best']
    far = sizes[-1]  # legend and heatmap rows ranked by the mean at the largest size: the plot reads as a ranking
    at_far = {k: next((c.acc.mean for c in by_line[k] if c.size == far), float('-inf')) for k in best}
    best.sort(key=lambda k: -at_far[k])
    many = len(best) > 12  # then the legend goes beside the axes, where it hides no line
    fig, ax = plt.subplots(figsize=(12 if many else 8, 5 + 0.1 * max(len(best) - 12, 0)))
    for i, key in enumerate(best):
        cs = sorted(by_line[key], key=lambda c: xs[c.size])
        x = [xs[c.size] for c in cs]
        line, = ax.plot(x, [c.acc.mean for c in cs], ms=3, label=f'{key[0]} ({key[1]}, {key[2]})', **line_style(i))
        ax.fill_between(x, [c.acc.lo for c in cs], [c.acc.hi for c in cs], color=line.get_color(),
                        alpha=0.05 if many else 0.12)
    ax.set_xticks(range(len(sizes)), sizes, rotation=45)
    if train in xs:
        ax.axvline(xs[train], color='grey', ls=':', lw=1)
    ax.set_ylabel('top-1 (%)')
    ax.set_title('each encoding at its best recipe and knob setting (95% intervals)')
    if many:
        ax.legend(fontsize=6, loc='upper left', bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / 'best.png')
    fig.savefig(paths[-1], dpi=110, bbox_inches='tight' if many else None)  # keep the legend beside the axes
    plt.close(fig)

    mat = np.full((len(best), len(sizes)), np.nan)
    for i, key in enumerate(best):
        for c in by_line[key]:
            if c.retention is not None:
                mat[i, xs[c.size]] = c.retention.mean
    fig, ax = plt.subplots(figsize=(1.0 * len(sizes) + 5, 0.32 * len(best) + 1.5))
    im = ax.imshow(mat, cmap='viridis', vmin=np.nanmin(mat) if np.isfinite(mat).any() else 0, vmax=1.0,
                   aspect='auto')
    ax.set_xticks(range(len(sizes)), sizes, rotation=45)
    ax.set_yticks(range(len(best)), [f'{k[0]} ({k[1]}, {k[2]})' for k in best], fontsize=7)
    light = np.nanmin(mat) + 0.6 * (1.0 - np.nanmin(mat)) if np.isfinite(mat).any() else 1.0
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            if np.isfinite(mat[i, j]):  # dark text on the light (yellow) end of viridis
                ax.text(j, i, f'{mat[i, j]:.2f}', ha='center', va='center', fontsize=6,
                        color='k' if mat[i, j] > light else 'w')
    fig.colorbar(im, ax=ax, label='retention (acc / acc at training size)')
    ax.set_title(f'retention at the best setting, ranked by top-1 at {far}')
    fig.tight_layout()
    paths.append(out / 'retention.png')
    fig.savefig(paths[-1], dpi=110, bbox_inches='tight')  # the long row labels stay inside the image
    plt.close(fig)
    return paths


def recipe_counts(finished: Sequence[str], planned: Sequence[str]) -> str:
    """Finished over planned jobs per recipe, in plan order (job ids ``<encoding>__<recipe>__s<seed>``):
    ``'fixed 41/81, coordaug 4/18'``."""
    done = set(finished)
    recipes = list(dict.fromkeys(j.split('__')[1] for j in planned))
    return ', '.join(f'{r} {sum(j in done for j in planned if j.split("__")[1] == r)}/'
                     f'{sum(j.split("__")[1] == r for j in planned)}' for r in recipes)


def coverage(finished: Sequence[str], planned: Sequence[str] | None) -> str:
    """One paragraph: how many of the study's jobs the report covers, per recipe, and which are pending."""
    if not planned:
        return f'{len(finished)} finished jobs.'
    done = set(finished)
    todo = [j for j in planned if j not in done]
    text = f'{len(done & set(planned))} of {len(planned)} jobs finished ({recipe_counts(finished, planned)}).'
    if todo:
        shown = ', '.join(todo) if len(todo) <= 12 else f'{len(todo)} jobs (`python -m visionpe.study list-jobs`)'
        text += f' **Partial study**: rows, intervals and verdicts cover the finished jobs only; pending: {shown}.'
    return text


def compute_by_device(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where the study ran and for how long, from the rows' ``device``, ``host``, ``train_s``, ``eval_s`` and
    ``finished`` (each job counted once): per device, most jobs first, the jobs, hosts, first and last day, and
    the hours spent training and sweeping. A job that resumed (``sweep_resumed``, ``train_resumed``) recorded only
    the time of its last segment, so its hours are a lower bound; ``resumed`` counts such jobs."""
    first_row: dict[str, dict[str, Any]] = {}
    for r in rows:
        first_row.setdefault(r['job'], r)
    by_device: dict[str, dict[str, Any]] = {}
    for r in first_row.values():
        d = by_device.setdefault(r.get('device', '?'), dict(device=r.get('device', '?'), jobs=0, train_h=0.0,
                                                            sweep_h=0.0, resumed=0, hosts=set(), days=set()))
        d['jobs'] += 1
        d['train_h'] += (r.get('train_s') or 0.0) / 3600
        d['sweep_h'] += (r.get('eval_s') or 0.0) / 3600
        d['resumed'] += bool(r.get('sweep_resumed') or r.get('train_resumed'))
        d['hosts'].add(r.get('host', '?'))
        if r.get('finished'):
            d['days'].add(r['finished'][:10])
    out = []
    for d in sorted(by_device.values(), key=lambda d: (-d['jobs'], d['device'])):
        days = sorted(d.pop('days'))
        out.append(dict(d, hosts=sorted(d['hosts']), first=days[0] if days else None,
                        last=days[-1] if days else None))
    return out


def compute_text(compute: list[dict[str, Any]]) -> str:
    """One sentence per device: ``Compute: N jobs on DEVICE (host H, DAY to DAY): X worker-hours (...)``."""
    parts = []
    for c in compute:
        days = c['first'] if c['first'] == c['last'] else f"{c['first']} to {c['last']}"
        hosts = ('host ' if len(c['hosts']) == 1 else 'hosts ') + ', '.join(c['hosts'])
        resumed = (f"; {c['resumed']} job{'s' if c['resumed'] != 1 else ''} resumed, counted from the last "
                   'segment only' if c['resumed'] else '')
        parts.append(f"{c['jobs']} job{'s' if c['jobs'] != 1 else ''} on {c['device']} ({hosts}, {days}): "
                     f"{c['train_h'] + c['sweep_h']:.1f} worker-hours ({c['train_h']:.1f} h training, "
                     f"{c['sweep_h']:.1f} h sweeping{resumed})")
    return 'Compute: ' + '; '.join(parts) + '.' if parts else ''


def write_report(study_dir: Path, train_size: str, reference_recipe: str, plots: bool = True,
                 planned: Sequence[str] | None = None, claims: tuple[Claim, ...] = ANCHORS) -> dict[str, Path]:
    """Aggregate ``study_dir/rows/*.jsonl`` into ``study_dir/report/``; returns the written paths.
    ``planned``: the study's job ids, to state coverage (a partial study says so at the top); ``claims``: the
    published claims the anchor checks test."""
    study_dir = Path(study_dir)
    rows = load_rows(study_dir)
    if not rows:
        raise FileNotFoundError(f'no finished job rows under {study_dir / "rows"}: run the study first')
    th, tw = parse_size(train_size)
    train = f'{th}x{tw}'
    cells = build_cells(rows, train)
    out = study_dir / 'report'
    out.mkdir(parents=True, exist_ok=True)
    table = [c.as_row() for c in cells]
    paths = {'cells_csv': out / 'cells.csv', 'cells_json': out / 'cells.json', 'leaderboard': out / 'leaderboard.md',
             'anchors': out / 'anchors.md', 'recipes': out / 'recipes.md', 'seeds': out / 'seeds.md'}
    with open(paths['cells_csv'], 'w', newline='') as f:
        keys = list(dict.fromkeys(k for r in table for k in r))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(table)
    checks = anchor_checks(rows, train, reference_recipe, claims)
    effects = recipe_effects(rows, train, reference_recipe)
    spread = seed_spread(rows, train, reference_recipe)
    jobs = sorted({r['job'] for r in rows})
    compute = compute_by_device(rows)
    meta = dict(jobs=jobs, planned=list(planned or []), devices=sorted(c['device'] for c in compute),
                versions=sorted({json.dumps(r.get('versions', {}), sort_keys=True) for r in rows}), compute=compute)
    report = dict(meta=meta, cells=table, anchors=checks, recipes=effects, seed_spread=spread)
    paths['cells_json'].write_text(json.dumps(report, indent=1, default=float))
    cover = coverage(jobs, planned) + '\n\n'
    paths['leaderboard'].write_text(f'# Leaderboard: {len(jobs)} jobs, training size {train}\n\n' + cover
                                    + compute_text(meta['compute']) + '\n\n'
                                    + leaderboard(rows, train, reference_recipe))
    paths['anchors'].write_text('# Anchor checks: published claims tested by this study\n\n' + cover
                                + _anchors_md(checks, reference_recipe))
    paths['recipes'].write_text(f'# Training recipes against the {reference_recipe} recipe\n\n' + cover
                                + _recipes_md(effects, reference_recipe))
    paths['seeds'].write_text(f'# Seed spread: training noise under the {reference_recipe} recipe\n\n' + cover
                              + _seeds_md(spread, reference_recipe))
    if plots:
        for p in _plots(cells, rows, train, reference_recipe, out):
            paths[p.stem] = p
    return paths


def cell_dicts(cells: list[Cell]) -> list[dict[str, Any]]:
    return [asdict(c) for c in cells]
