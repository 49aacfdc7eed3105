"""The README's study blocks and the committed study report are never stale against the committed rows.

``scripts/readme_results.py`` generates the README's status, leaderboard and anchor blocks from
``benchmarks/results/fmnist_study/report``; these tests run its ``--check`` on the repository and exercise it on
synthetic reports, so that a result row committed without its report and README refresh fails CI.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_script


@pytest.fixture(scope='module')
def rr():
    return load_script('scripts/readme_results.py')


def test_committed_readme_and_report_match_the_committed_rows(rr, capsys):
    rc = rr.main(['--check'])
    assert rc == 0, capsys.readouterr().err


def _study(tmp_path: Path, jobs: list[str], planned: list[str], report_jobs: list[str] | None = None) -> Path:
    study = tmp_path / 'study'
    (study / 'rows').mkdir(parents=True)
    (study / 'report').mkdir()
    for j in jobs:
        (study / 'rows' / f'{j}.jsonl').write_text('{}\n')
    anchor = dict(claim='A > B', source='someone 2025', sizes=['128x128'], a='a', b='b', a_setting='default',
                  b_setting='default', difference=2.0, lo=1.0, hi=3.0, per_seed={'0': 2.5, '1': 1.5},
                  verdict='agrees', tuned=dict(a='a', b='b', a_setting='ref', b_setting='default', difference=-1.0,
                                               lo=-2.0, hi=0.5, per_seed={'0': -1.0, '1': -1.0},
                                               verdict='inconclusive'))
    meta = dict(jobs=sorted(report_jobs if report_jobs is not None else jobs), planned=planned)
    (study / 'report' / 'cells.json').write_text(json.dumps(dict(meta=meta, cells=[], anchors=[anchor])))
    (study / 'report' / 'leaderboard.md').write_text('# Leaderboard\n\ncoverage\n\n| a | b |\n|---|---|\n| 1 | 2 |\n')
    return study


PLANNED = [f'{e}__fixed__s{s}' for e in ('a', 'b', 'c') for s in (0, 1, 2)] + ['a__multires__s0']


def test_status_names_the_seeds_each_encoding_has(rr, tmp_path):
    jobs = ['a__fixed__s0', 'a__fixed__s1', 'a__fixed__s2', 'b__fixed__s0', 'b__fixed__s1', 'c__fixed__s0']
    text = rr.blocks(_study(tmp_path, jobs, PLANNED))['status']
    assert text.startswith('**6 of its 10 jobs have finished** (fixed 6/9, multires 0/1).')
    assert 'seeds 0, 1, 2 of `a`; seeds 0, 1 of `b`; seed 0 of `c`.' in text  # one left: named, not "the other 1"
    assert 't = 12.71 at 1 degree of freedom' in text and 't = 4.30 at 2 degrees of freedom' in text


def test_status_says_where_the_jobs_ran(rr, tmp_path):
    study = _study(tmp_path, ['a__fixed__s0'], PLANNED)
    data = json.loads((study / 'report' / 'cells.json').read_text())
    data['meta']['compute'] = [dict(device='cpu (x86_64, 2 cores)', jobs=1, train_h=0.25, sweep_h=0.5, resumed=0,
                                    hosts=['vm'], first='2026-12-07', last='2026-12-07')]
    (study / 'report' / 'cells.json').write_text(json.dumps(data))
    text = rr.blocks(study)['status']
    assert text.endswith('Compute: 1 job on cpu (x86_64, 2 cores) (host vm, 2026-12-07): 0.8 worker-hours '
                         '(0.2 h training, 0.5 h sweeping).')


def test_status_names_encodings_without_any_job(rr, tmp_path):
    text = rr.blocks(_study(tmp_path, ['a__fixed__s0'], PLANNED))['status']
    assert 'seed 0 of `a`; no finished job yet for `b`, `c`.' in text
    assert 'Student' not in text  # one seed each: no t interval to describe


def test_anchor_bullets_carry_the_verdicts_and_seed_differences(rr, tmp_path):
    jobs = ['a__fixed__s0', 'a__fixed__s1', 'b__fixed__s0', 'b__fixed__s1']
    text = rr.blocks(_study(tmp_path, jobs, PLANNED))['anchors']
    assert '(seeds 0, 1 for `a`, `b`; seed 0 for the others)' in text
    assert ('- A > B, from someone 2025: **agrees** (a [default] − b [default]: +2.0 [+1.0, +3.0] points at 128x128, '
            'by seed +2.5, +1.5); at the best knobs **inconclusive** (a [ref] − b [default]: -1.0 [-2.0, +0.5], '
            'by seed -1.0, -1.0).') in text


def test_seed_noise_paragraph_gives_the_ranges_and_the_largest_spreads(rr):
    spread = [dict(encoding='a', seeds=[0, 1], train=0.05, off_median=1.1, off_max=21.7,
                   off_max_at=dict(setting='coord_mode=ref', size='32x64', top1=[42.4, 64.1])),
              dict(encoding='b', seeds=[0, 1, 2], train=1.65, off_median=8.3, off_max=3.0,
                   off_max_at=dict(setting='default', size='128x128', top1=[50.0, 53.0, 51.0]))]
    text = rr.seeds_block(spread)
    assert '2 encodings with several seeds' in text and 'within 0.05-1.65 points' in text
    assert 'median of 1.1-8.3 points' in text and 'up to 21.7 (a [coord_mode=ref] at 32x64: 42.4 vs 64.1%; ' in text
    assert 'b [default] at 128x128: 50.0 vs 53.0 vs 51.0%)' in text
    assert 'No encoding has several seeds' in rr.seeds_block([])


def test_render_replaces_only_the_marked_blocks_and_is_idempotent(rr):
    readme = 'intro\n<!-- study:status -->\nold\n<!-- /study:status -->\noutro\n'
    once = rr.render(readme, {'status': 'new text'})
    assert once == 'intro\n<!-- study:status -->\nnew text\n<!-- /study:status -->\noutro\n'
    assert rr.render(once, {'status': 'new text'}) == once


def test_a_readme_without_the_markers_is_an_error_naming_them(rr):
    with pytest.raises(SystemExit, match='no <!-- study:leaderboard -->'):
        rr.render('no markers here\n', {'leaderboard': '| x |'})


def test_a_report_that_lags_the_rows_is_stale(rr, tmp_path):
    study = _study(tmp_path, ['a__fixed__s0', 'a__fixed__s1'], PLANNED, report_jobs=['a__fixed__s0'])
    problems = rr.stale_report(study)
    assert len(problems) == 1 and "rows not in the report: ['a__fixed__s1']" in problems[0]
    assert 'visionpe.study aggregate' in problems[0]
    assert rr.stale_report(_study(tmp_path / 'ok', ['a__fixed__s0'], PLANNED)) == []


def test_check_fails_on_an_edited_block(rr, tmp_path, monkeypatch, capsys):
    study = _study(tmp_path, ['a__fixed__s0'], PLANNED)
    monkeypatch.setattr(rr, 'STUDY', study)
    readme = tmp_path / 'README.md'
    names = ('status', 'leaderboard', 'anchors', 'seeds')
    readme.write_text(''.join(f'<!-- study:{n} -->\n<!-- /study:{n} -->\n' for n in names))
    assert rr.main(['--readme', str(readme)]) == 0
    assert rr.main(['--check', '--readme', str(readme)]) == 0
    readme.write_text(readme.read_text().replace('| 1 | 2 |', '| 1 | 3 |'))
    assert rr.main(['--check', '--readme', str(readme)]) == 1
    assert 'study blocks differ from the report' in capsys.readouterr().err
