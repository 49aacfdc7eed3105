"""Studies: the study file, job expansion, SLURM emission, statistics on synthetic rows with known answers,
and the report built from rows alone."""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest

from visionpe.study.jobs import emit_slurm, rows_path, run_job
from visionpe.study.report import (Claim, anchor_checks, build_cells, leaderboard, line_style, load_rows,
                                   write_report)
from visionpe.study.spec import Recipe, StudySpec, load_study, parse_size
from visionpe.study.stats import (pack_correct, paired_bootstrap, t_interval, t_quantile, unpack_correct,
                                  wilson_interval)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize('df, ref', [(1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157), (29, 2.045230)])
def test_t_quantile_matches_tables(df, ref):
    assert t_quantile(0.975, df) == pytest.approx(ref, abs=1e-5)
    assert t_quantile(0.025, df) == pytest.approx(-ref, abs=1e-5)


def test_t_interval_known_values():
    iv = t_interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.sd == pytest.approx(1.0)
    assert iv.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)
    one = t_interval([5.0])
    assert one.method == 'none' and one.lo == one.hi == 5.0


def test_wilson_interval_known_values():
    iv = wilson_interval(80, 100)
    assert iv.method == 'binomial' and iv.mean == pytest.approx(80.0)
    assert (iv.lo, iv.hi) == (pytest.approx(71.12, abs=0.01), pytest.approx(86.66, abs=0.01))


def test_a_cell_interval_over_seeds_also_covers_the_test_images():
    """Every seed is evaluated on the same fixed test images, so the spread over seeds holds training noise only:
    two seeds with the same accuracy gave a zero-width t interval. A cell's interval adds the binomial
    half-width of the images in quadrature, so it is never narrower than either source."""
    from visionpe.study.stats import summarize
    same = summarize([86.5, 86.5], 2000)
    binom = 1.959964 * math.sqrt(0.865 * 0.135 / 2000) * 100
    assert same.method == 't+binomial' and same.n == 2 and same.sd == 0.0
    assert same.half_width == pytest.approx(binom, rel=1e-4) and same.mean == 86.5
    spread = summarize([80.0, 84.0, 82.0], 2000)
    t_half = t_interval([80.0, 84.0, 82.0]).half_width
    assert spread.half_width == pytest.approx(math.hypot(t_half, 1.959964 * math.sqrt(0.82 * 0.18 / 2000) * 100),
                                              rel=1e-4)
    assert spread.half_width > t_half
    assert summarize([80.0, 84.0]).method == 't'  # no image count: seeds only, labelled so
    assert summarize([80.0], 1000).method == 'binomial'


def test_a_cell_interval_stays_within_0_and_100_percent():
    """Two seeds far apart give a t half-width of tens of points (t = 12.71 at one degree of freedom); an
    accuracy cannot leave [0, 100], so the interval is cut there, and the table prints a cut interval as
    [lo, hi] rather than a ± that would claim a symmetric interval it is not."""
    from visionpe.study.report import _fmt
    from visionpe.study.stats import summarize
    wide = summarize([20.0, 30.0], 2000)  # t half-width: 12.706 * 7.07 / sqrt(2) = 63.5 points
    assert wide.lo == 0.0 and wide.hi == pytest.approx(25.0 + math.hypot(12.7062 * 5.0, 1.959964 * math.sqrt(
        0.25 * 0.75 / 2000) * 100), rel=1e-4)
    assert summarize([95.0, 99.0], 2000).hi == 100.0
    assert _fmt(wide) == f'25.0 [0.0, {wide.hi:.1f}]'
    assert _fmt(summarize([80.0, 82.0, 81.0], 2000)).startswith('81.0 ± ')  # an uncut interval keeps its ±


def test_retention_interval_also_covers_the_test_images():
    """Retention is a ratio of two accuracies on the same test images. Its interval over seeds alone was
    t-only: one seed had no interval at all, and seeds that agree gave a zero-width one. With per-image
    results it adds the image-sampling half-width of the ratio (delta method for a ratio of paired means),
    which must match a bootstrap of the ratio over the images."""
    from visionpe.study.stats import retention
    rng = np.random.default_rng(3)
    n = 2000
    base = rng.random(n) < 0.9
    far = base & (rng.random(n) < 0.6)  # right at the far size only where right at the training size, mostly
    far |= ~base & (rng.random(n) < 0.2)
    one = retention([100 * far.mean()], [100 * base.mean()], [far], [base])
    assert one.method == 'delta' and one.n == 1
    assert one.mean == pytest.approx(far.mean() / base.mean())
    idx = rng.integers(0, n, size=(4000, n))
    boot = far[idx].mean(axis=1) / base[idx].mean(axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert one.half_width == pytest.approx((hi - lo) / 2, rel=0.1)
    assert one.lo < one.mean < one.hi
    # several seeds on the same images: the t half-width over seeds and the image half-width in quadrature
    fars = [far, far | (rng.random(n) < 0.05), far & (rng.random(n) < 0.95)]
    acc, acc_train = [100 * f.mean() for f in fars], [100 * base.mean()] * 3
    t_only = retention(acc, acc_train)
    both = retention(acc, acc_train, fars, [base] * 3)
    assert t_only.method == 't' and both.method == 't+delta'
    assert both.mean == pytest.approx(t_only.mean)
    assert both.half_width > t_only.half_width and both.half_width > one.half_width * 0.8
    assert both.half_width <= t_only.half_width + one.half_width * 1.3
    # at the training size itself the ratio is 1 on every resample: no width from the images
    same = retention([100 * base.mean()], [100 * base.mean()], [base], [base])
    assert same.mean == 1.0 and same.half_width == 0.0
    with pytest.raises(ValueError, match='same test images'):
        retention([50.0], [90.0], [far[:10]], [base])


def test_t_interval_covers_the_mean_at_its_level():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(2000):
        iv = t_interval(rng.normal(10.0, 2.0, size=4))
        hits += iv.lo <= 10.0 <= iv.hi
    assert 0.93 <= hits / 2000 <= 0.97


def test_pack_roundtrip():
    x = np.random.default_rng(1).random(1001) < 0.7
    assert np.array_equal(unpack_correct(pack_correct(x), x.size), x)


def test_paired_bootstrap_known_difference():
    rng = np.random.default_rng(0)
    b = rng.random(2000) < 0.6
    a = b.copy()
    wrong = np.flatnonzero(~b)[:100]  # a is right on 100 more images: +5 points exactly
    a[wrong] = True
    iv = paired_bootstrap([a, a], [b, b])
    assert iv.mean == pytest.approx(5.0)
    assert 0 < iv.lo < 5.0 < iv.hi < 7.0
    same = paired_bootstrap([b], [b])
    assert same.mean == 0 and same.lo == same.hi == 0
    with pytest.raises(ValueError, match='same test images'):
        paired_bootstrap([a], [b[:10]])


# ------------------------------------------------------------------------------------------ the study file
def test_sizes_parse():
    assert parse_size('64') == (64, 64) and parse_size('48x64') == (48, 64)
    with pytest.raises(ValueError, match='HxW'):
        parse_size('64by48')


@pytest.mark.parametrize('name', ['fmnist.yaml', 'fmnist_quick.yaml', 'imagenet_vit_small.yaml'])
def test_shipped_studies_parse(name):
    spec = load_study(REPO / 'configs' / 'study' / name)
    jobs = spec.jobs()
    assert jobs and len({j.id for j in jobs}) == len(jobs)
    for s in spec.sizes:
        parse_size(s)


def test_print_config_shows_every_field(capsys):
    from visionpe.study.__main__ import main
    assert main(['--config', str(REPO / 'configs/study/fmnist_quick.yaml'), '--print_config']) == 0
    out = capsys.readouterr().out
    for key in ('name:', 'recipes:', 'seeds:', 'sizes:', 'knobs:', 'eval_images:', 'train_size:'):
        assert key in out


def _spec(tmp_path, **kw) -> StudySpec:
    base = dict(name='t', recipes=[Recipe('fixed', 'configs/fmnist_vit_tiny.yaml'),
                                   Recipe('aug', 'configs/fmnist_vit_tiny.yaml', ['--data.hflip', '0.0'], ['ape'])],
                encodings=['ape', 'rope2d'], seeds=[0, 1], sizes=['32', '48x64'], output=str(tmp_path / 'study'),
                work_dir=str(tmp_path / 'work'))
    return StudySpec(**{**base, **kw})


def test_jobs_expand_per_recipe_encodings(tmp_path):
    ids = [j.id for j in _spec(tmp_path).jobs()]
    assert ids == ['ape__fixed__s0', 'ape__fixed__s1', 'rope2d__fixed__s0', 'rope2d__fixed__s1',
                   'ape__aug__s0', 'ape__aug__s1']
    with pytest.raises(ValueError, match='unknown encoding'):
        _spec(tmp_path, encodings=['not_an_encoding']).jobs()


def test_emit_slurm_one_task_per_job(tmp_path):
    spec = _spec(tmp_path)
    study_file = tmp_path / 'study.yaml'
    study_file.write_text('name: t\n')
    script = emit_slurm(spec, study_file, tmp_path / 'slurm', gpus=1)
    text = script.read_text()
    jobs = (tmp_path / 'slurm' / 'jobs.txt').read_text().split()
    assert jobs == [j.id for j in spec.jobs()]
    assert f'#SBATCH --array=0-{len(jobs) - 1}' in text and '#SBATCH --gres=gpu:1' in text
    assert '-m visionpe.study run-job' in text and '--device cuda' in text and '--job "$JOB"' in text
    # a finished job is not submitted again
    done = rows_path(spec, spec.jobs()[0])
    done.parent.mkdir(parents=True)
    done.write_text('{}\n')
    emit_slurm(spec, study_file, tmp_path / 'slurm2')
    assert (tmp_path / 'slurm2' / 'jobs.txt').read_text().split() == jobs[1:]


def test_job_commands_are_valid_train_and_eval_commands(tmp_path):
    """Each array task runs these two commands: both must parse with the real command lines."""
    spec = _spec(tmp_path)
    job = spec.jobs()[-1]
    train_cmd, eval_cmd = run_job(spec, job, dry_run=True)
    assert '--model.model_name' in train_cmd and 'vit_ape_tiny' in train_cmd and '--data.hflip' in train_cmd
    from visionpe.train.cli import main as train_main
    cli = train_main(train_cmd[2:], run=False)  # parse + instantiate, no training
    assert cli.config['model']['model_name'] == 'vit_ape_tiny' and cli.config['seed_everything'] == job.seed
    from visionpe.eval.cli import build_parser
    args = build_parser().parse_args(eval_cmd[2:])
    assert args.checkpoints and args.per_image and args.resolutions == [32, (48, 64)]  # N and HxW sizes


# ------------------------------------------------------------------------------------------ report
def _write_rows(study: Path, truth: dict, seeds=(0, 1, 2), n=1000, train='32x32'):
    """Synthetic job rows: per (encoding, size) a true accuracy; each seed draws its per-image results."""
    rng = np.random.default_rng(0)
    (study / 'rows').mkdir(parents=True, exist_ok=True)
    for enc, by_size in truth.items():
        for seed in seeds:
            rows = []
            for size, p in by_size.items():
                c = rng.random(n) < p
                rows.append(dict(job=f'{enc}__fixed__s{seed}', encoding=enc, recipe='fixed', seed=seed, size=size,
                                 setting='default', top1=100.0 * c.mean(), n_images=n, correct=pack_correct(c),
                                 train_size=train))
            (study / 'rows' / f'{enc}__fixed__s{seed}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))


def test_report_on_synthetic_rows(tmp_path):
    study = tmp_path / 'study'
    truth = {'ape': {'32x32': 0.85, '64x64': 0.55, '32x64': 0.70},
             'rope2d': {'32x32': 0.85, '64x64': 0.70, '32x64': 0.75},
             'rope2d_mixed': {'32x32': 0.85, '64x64': 0.705, '32x64': 0.75}}
    _write_rows(study, truth)
    rows = load_rows(study)
    cells = {(c.encoding, c.size): c for c in build_cells(rows, '32')}
    for (enc, size), c in cells.items():
        seeds = [r for r in rows if r['encoding'] == enc and r['size'] == size]
        assert c.acc.mean == pytest.approx(np.mean([r['top1'] for r in seeds]))
        assert c.acc.method == 't+binomial' and c.acc.n == 3
        assert c.acc.lo < 100 * truth[enc][size] + 3 and c.acc.hi > 100 * truth[enc][size] - 3
    assert cells[('ape', '32x32')].retention.mean == pytest.approx(1.0)
    assert cells[('ape', '64x64')].retention.mean == pytest.approx(0.55 / 0.85, abs=0.04)
    assert cells[('ape', '64x64')].retention.method == 't+delta'  # seeds and test images
    board = leaderboard(rows, '32', 'fixed')
    line = {l.split('|')[1].strip(): l for l in board.splitlines() if l.startswith('| ') and 'encoding' not in l}
    # at 64 px rope2d and rope2d_mixed are 0.5 points apart (not separable), ape 15 points below
    assert '≈' in line['rope2d'] + line['rope2d_mixed'] and '≈' not in line['ape'].split('|')[6]
    assert all(line[e].split('|')[4].strip() == '3' for e in truth)  # the seeds column
    checks = {c['claim']: c for c in anchor_checks(rows, '32', 'fixed')}
    assert checks['RoPE-Axial > learned APE above the training size']['verdict'] == 'agrees'
    assert checks['RoPE-Mixed > RoPE-Axial above the training size']['verdict'] == 'inconclusive'
    assert checks['LookHere > 2-D RoPE far out']['verdict'] == 'not in study'
    flipped = anchor_checks(rows, '32', 'fixed', (Claim('APE > RoPE', 'test', ('ape',), ('rope2d',)),))
    assert flipped[0]['verdict'] == 'contradicts' and flipped[0]['difference'] < -5
    paths = write_report(study, '32', 'fixed')
    for key in ('leaderboard', 'anchors', 'cells_csv', 'families', 'best', 'retention'):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    assert '(train)' in paths['leaderboard'].read_text()


def test_plots_keep_many_encodings_apart(tmp_path, monkeypatch):
    """27 encodings: the summary plot's lines differ in colour, dash or marker (tab10 alone repeats after 10),
    and the plots are drawn with the legend beside the axes, ranked by accuracy at the largest size."""
    styles = [tuple(sorted(line_style(i).items())) for i in range(40)]
    assert len(set(styles)) == 40
    study = tmp_path / 'study'
    _write_rows(study, {f'enc{i:02d}': {'32x32': 0.8, '64x64': 0.3 + 0.01 * i} for i in range(27)}, seeds=(0,), n=200)
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, 'close', figures.append)
    paths = write_report(study, '32', 'fixed')
    legend = [t.get_text().split()[0] for t in figures[1].axes[0].get_legend().get_texts()]  # best.png
    at_64 = {r['encoding']: r['top1'] for r in load_rows(study) if r['size'] == '64x64'}
    assert legend == sorted(at_64, key=lambda e: -at_64[e])
    import matplotlib.image as mpimg
    best = mpimg.imread(paths['best'])
    assert best.shape[1] >= 1300  # the wide layout (12 inches at 110 dpi): room for the legend beside the axes


def test_family_panels_stay_readable(tmp_path, monkeypatch):
    """families.png: the 2-D RoPE variants get panels of their own (one panel held 36 lines and a legend longer
    than the panel), no panel of the committed Fashion-MNIST report holds more than 16 lines, and every legend lies
    outside its panel's axes, where it hides no line."""
    from visionpe.study.report import FAMILIES, FAMILY_ORDER, family_of
    assert {f for _, f in FAMILIES} == set(FAMILY_ORDER)  # every family has its place in tables and panels
    fams = {e: family_of(e) for e in ('rope2d', 'rope2d_mixed', 'rope2d_ape', 'rope2d_mixed_ape', 'rope2d_dinov3',
                                       'rope2d_polar', 'spiral', 'ape', 'lookhere45')}
    assert len({fams['rope2d'], fams['rope2d_mixed'], fams['rope2d_ape'], fams['rope2d_dinov3']}) == 4
    assert fams['rope2d_ape'] == fams['rope2d_mixed_ape'] and fams['rope2d_dinov3'] == fams['spiral']
    committed = json.loads((REPO / 'benchmarks/results/fmnist_study/report/cells.json').read_text())['cells']
    lines: dict[str, set] = {}
    for c in committed:
        lines.setdefault(family_of(c['encoding']), set()).add((c['encoding'], c['recipe'], c['setting']))
    assert max(len(v) for v in lines.values()) <= 16, {f: len(v) for f, v in lines.items()}
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, 'close', figures.append)
    study = tmp_path / 'study'
    truth = {e: {'32x32': 0.8, '64x64': 0.5, '32x64': 0.6} for e in ('rope2d', 'ape', 'lookhere', 'pape')}
    _write_rows(study, truth, seeds=(0,), n=200)
    for i in range(15):  # 16 lines in the RoPE-Axial panel: its legend is the longest
        for path in [study / 'rows' / 'rope2d__fixed__s0.jsonl']:
            row = json.loads(path.read_text().splitlines()[0])
            extra = [dict(row, setting=f'knob={i}', size=size) for size in ('32x32', '64x64', '32x64')]
            with open(path, 'a') as f:
                f.write(''.join(json.dumps(r) + '\n' for r in extra))
    board = write_report(study, '32', 'fixed')['leaderboard'].read_text()
    first = [ln.split('|')[1].strip() for ln in board.splitlines() if ln.startswith('| ') and 'encoding' not in ln]
    assert [e for e in first if '(' not in e] == ['ape', 'rope2d', 'pape', 'lookhere']  # in FAMILY_ORDER
    fig = figures[0]  # families.png
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(panels) == 4
    for ax in panels:
        assert not ax.get_window_extent().overlaps(ax.get_legend().get_window_extent()), ax.get_title()


def test_report_with_one_seed_uses_binomial_intervals(tmp_path):
    study = tmp_path / 'study'
    _write_rows(study, {'ape': {'32x32': 0.8, '64x64': 0.5}}, seeds=(0,))
    cells = build_cells(load_rows(study), '32')
    assert {c.acc.method for c in cells} == {'binomial'}
    assert 'binomial interval' in leaderboard(load_rows(study), '32', 'fixed')
    far = next(c for c in cells if c.size == '64x64')
    assert far.as_row()['retention_interval'] == 'delta' and far.retention.lo < far.retention.mean < far.retention.hi


def test_partial_study_says_what_it_covers(tmp_path):
    """A report over some of a study's jobs says so at the top of the leaderboard and the anchor checks, with the
    count per recipe and the pending job ids; a row's seeds column counts only its own seeds."""
    study = tmp_path / 'study'
    _write_rows(study, {'ape': {'32x32': 0.8, '64x64': 0.5}}, seeds=(0, 1))
    _write_rows(study, {'rope2d': {'32x32': 0.8, '64x64': 0.6}}, seeds=(0,))
    planned = [f'{e}__{r}__s{s}' for r in ('fixed', 'multires') for e in ('ape', 'rope2d') for s in (0, 1)]
    paths = write_report(study, '32', 'fixed', plots=False, planned=planned)
    for key in ('leaderboard', 'anchors'):
        text = paths[key].read_text()
        assert '3 of 8 jobs finished (fixed 3/4, multires 0/4)' in text and '**Partial study**' in text
        assert 'rope2d__fixed__s1, ape__multires__s0' in text
    seeds = {l.split('|')[1].strip(): l.split('|')[4].strip() for l in paths['leaderboard'].read_text().splitlines()
             if l.startswith('| ') and 'encoding' not in l}
    assert seeds == {'ape': '2', 'rope2d': '1'}
    full = write_report(study, '32', 'fixed', plots=False, planned=planned[:3])
    assert 'Partial' not in full['leaderboard'].read_text() and '3 of 3 jobs' in full['leaderboard'].read_text()


def test_encodings_with_knobs_have_their_native_reference(tmp_path):
    """Rows of a RoPE carry a setting label (``coord_mode=index``), not ``default``: its native setting is the
    reference row of the leaderboard (shown beside a better knob) and what the anchor checks compare."""
    study = tmp_path / 'study'
    _write_rows(study, {'ape': {'32x32': 0.85, '64x64': 0.60}})
    for setting, truth in (('coord_mode=index', {'32x32': 0.85, '64x64': 0.20}),
                           ('coord_mode=ref', {'32x32': 0.85, '64x64': 0.70})):
        sub = tmp_path / setting.replace('=', '_')
        _write_rows(sub, {'rope2d': truth})
        for f in (sub / 'rows').glob('*.jsonl'):
            rows = [dict(json.loads(ln), setting=setting) for ln in f.read_text().splitlines()]
            with open(study / 'rows' / f.name, 'a') as out:
                out.write(''.join(json.dumps(r) + '\n' for r in rows))
    rows = load_rows(study)
    board = leaderboard(rows, '32', 'fixed')
    assert '| rope2d | fixed | coord_mode=ref |' in board and '| rope2d (reference) | fixed | coord_mode=index |' in board
    checks = {c['claim']: c for c in anchor_checks(rows, '32', 'fixed')}
    axial_vs_ape = checks['RoPE-Axial > learned APE above the training size']
    assert axial_vs_ape['verdict'] == 'contradicts' and axial_vs_ape['difference'] < -30  # index coordinates
    assert (axial_vs_ape['a_setting'], axial_vs_ape['b_setting']) == ('coord_mode=index', 'default')
    # the same claim with each encoding at its best test-time knob (same recipe): RoPE with ref coordinates wins
    tuned = axial_vs_ape['tuned']
    assert (tuned['a_setting'], tuned['b_setting']) == ('coord_mode=ref', 'default')
    assert tuned['verdict'] == 'agrees' and 5 < tuned['difference'] < 15
    text = write_report(study, '32', 'fixed', plots=False)['anchors'].read_text()
    line = next(l for l in text.splitlines() if l.startswith('| RoPE-Axial > learned APE'))
    assert 'rope2d [coord_mode=index] − ape [default]' in line and 'contradicts' in line
    assert 'rope2d [coord_mode=ref] − ape [default]' in line and 'agrees' in line
    assert 'paired bootstrap' in text and 'own knob setting' in text  # the method is stated under the table



def test_reference_is_the_row_marked_native(tmp_path):
    """Rows that carry ``native`` (written by the evaluator) decide the reference, not the label: a RoPE trained
    with ``ref`` coordinates has ``coord_mode=ref`` as its reference row (the label alone would say ``index``)."""
    study = tmp_path / 'study'
    _write_rows(study, {'ape': {'32x32': 0.85, '64x64': 0.60}})
    for setting, native, truth in (('coord_mode=index', False, {'32x32': 0.85, '64x64': 0.20}),
                                   ('coord_mode=ref', True, {'32x32': 0.85, '64x64': 0.70})):
        sub = tmp_path / setting.replace('=', '_')
        _write_rows(sub, {'rope2d': truth})
        for f in (sub / 'rows').glob('*.jsonl'):
            rows = [dict(json.loads(ln), setting=setting, native=native) for ln in f.read_text().splitlines()]
            with open(study / 'rows' / f.name, 'a') as out:
                out.write(''.join(json.dumps(r) + '\n' for r in rows))
    rows = load_rows(study)
    board = leaderboard(rows, '32', 'fixed')
    assert '| rope2d | fixed | coord_mode=ref |' in board and '(reference)' not in board  # best = reference
    checks = {c['claim']: c for c in anchor_checks(rows, '32', 'fixed')}
    axial_vs_ape = checks['RoPE-Axial > learned APE above the training size']
    assert axial_vs_ape['verdict'] == 'agrees' and axial_vs_ape['difference'] > 5  # the native ref coordinates


def test_recipe_effects_compare_each_recipe_with_the_reference(tmp_path):
    """``recipes.md``: each robust recipe against the reference recipe, same encoding and knob setting, paired on
    the same images and seeds: the difference at the training size, pooled above it and at the largest size,
    and a verdict (helps / hurts / inconclusive) above the training size."""
    from visionpe.study.report import recipe_effects
    study = tmp_path / 'study'
    rng = np.random.default_rng(0)
    truth = {'fixed': {'32x32': 0.86, '64x64': 0.60, '128x128': 0.50},
             'multires': {'32x32': 0.80, '64x64': 0.75, '128x128': 0.65},
             'coordaug': {'32x32': 0.86, '64x64': 0.60, '128x128': 0.50}}
    (study / 'rows').mkdir(parents=True)
    base = rng.random((3, 1000))  # one uniform per (size, image): a recipe's result moves with its accuracy only
    for recipe, by_size in truth.items():
        rows = [dict(job=f'ape__{recipe}__s0', encoding='ape', recipe=recipe, seed=0, size=size, setting='default',
                     top1=100.0 * (base[i] < p).mean(), n_images=1000, correct=pack_correct(base[i] < p),
                     train_size='32x32') for i, (size, p) in enumerate(by_size.items())]
        (study / 'rows' / f'ape__{recipe}__s0.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    effects = {e['recipe']: e for e in recipe_effects(load_rows(study), '32', 'fixed')}
    assert set(effects) == {'multires', 'coordaug'}
    m = effects['multires']
    assert m['encoding'] == 'ape' and m['setting'] == 'default' and m['verdict'] == 'helps'
    assert m['train']['difference'] == pytest.approx(-6.0, abs=1.5) and m['train']['hi'] < 0
    assert m['above']['difference'] == pytest.approx(15.0, abs=1.5) and m['far']['difference'] > 10
    c = effects['coordaug']
    assert c['verdict'] == 'inconclusive' and c['above']['difference'] == 0
    paths = write_report(study, '32', 'fixed', plots=False)
    text = paths['recipes'].read_text()
    assert '| ape | multires | default (own) |' in text and 'helps' in text and 'inconclusive' in text
    for recipe in ('multires', 'coordaug'):
        (study / 'rows' / f'ape__{recipe}__s0.jsonl').unlink()
    text = write_report(study, '32', 'fixed', plots=False)['recipes'].read_text()
    assert 'No recipe besides fixed has rows yet' in text and '|' not in text

def test_a_difference_whose_sign_changes_between_seeds_is_inconclusive(tmp_path):
    """Seed-to-seed training noise far from the training size can exceed the image-sampling interval: when two
    seeds disagree on the sign of a difference, the anchor check and the recipe verdict say inconclusive
    (seeds disagree) even if the pooled paired interval excludes 0, and the report shows each seed's difference."""
    from visionpe.study.report import recipe_effects
    study = tmp_path / 'study'
    (study / 'rows').mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.random((2, 2000))  # one uniform per (seed, image): settings move with their accuracy only
    truth = {('ape', 'fixed'): (0.80, 0.60), ('rope2d', 'fixed'): (0.60, 0.65),  # seed 0: +20, seed 1: -5
             ('ape', 'multires'): (0.90, 0.58)}  # vs ape fixed: seed 0: +10, seed 1: -2
    for (enc, recipe), per_seed in truth.items():
        for seed, p in enumerate(per_seed):
            rows = [dict(job=f'{enc}__{recipe}__s{seed}', encoding=enc, recipe=recipe, seed=seed, size=size,
                         setting='default', top1=100.0 * (base[seed] < q).mean(), n_images=2000,
                         correct=pack_correct(base[seed] < q), train_size='32x32')
                    for size, q in (('32x32', 0.85), ('64x64', p))]
            (study / 'rows' / f'{enc}__{recipe}__s{seed}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    rows = load_rows(study)
    claim = Claim('APE > RoPE', 'test', ('ape',), ('rope2d',))
    check = anchor_checks(rows, '32', 'fixed', (claim,))[0]
    assert check['lo'] > 0  # the pooled image-sampling interval alone would say "agrees"
    assert check['verdict'] == 'inconclusive (seeds disagree)'
    assert check['per_seed'] == {0: pytest.approx(20.0, abs=2.5), 1: pytest.approx(-5.0, abs=2.5)}
    effect = recipe_effects(rows, '32', 'fixed')[0]
    assert effect['above']['lo'] > 0 and effect['verdict'] == 'inconclusive (seeds disagree)'
    assert effect['above']['per_seed'] == {0: pytest.approx(10.0, abs=2.5), 1: pytest.approx(-2.0, abs=1.5)}
    paths = write_report(study, '32', 'fixed', plots=False, claims=(claim,))
    line = next(ln for ln in paths['anchors'].read_text().splitlines() if ln.startswith('| APE > RoPE'))
    assert 'inconclusive (seeds disagree)' in line and 'seeds +' in line and ', -' in line
    recipes = paths['recipes'].read_text()
    assert 'inconclusive (seeds disagree)' in recipes and 'seeds +' in recipes
    assert 'each seed' in paths['anchors'].read_text() and 'each seed' in recipes  # the rule is stated
    # the leaderboard reads a gap to the best of a column the same way: rope2d is not marked below it
    board = leaderboard(rows, '32', 'fixed')
    rope = next(ln for ln in board.splitlines() if ln.startswith('| rope2d |'))
    assert rope.rstrip(' |').endswith('≈')
    assert 'each seed' in board
    # with seeds that agree in sign, the verdict follows the interval as before
    one_seed = [r for r in rows if r['seed'] == 0]
    assert anchor_checks(one_seed, '32', 'fixed', (claim,))[0]['verdict'] == 'agrees'


def test_seed_spread_measures_the_training_noise_the_image_interval_misses(tmp_path):
    """seeds.md: per encoding with several seeds of the reference recipe, the spread (max - min top-1 over its
    seeds) at the training size, its median over the knob settings and sizes off it, and where it is largest."""
    from visionpe.study.report import seed_spread
    study = tmp_path / 'study'
    (study / 'rows').mkdir(parents=True)
    top1 = {('a', 'fixed', 'coord_mode=index'): {'32x32': (85.0, 86.0, 84.5), '64x64': (60.0, 70.0, 65.0),
                                                 '32x64': (70.0, 71.0, 72.0)},
            ('a', 'fixed', 'coord_mode=ref'): {'32x32': (85.0, 86.0, 84.5), '64x64': (74.0, 75.0, 76.0),
                                               '32x64': (75.0, 75.5, 76.5)},
            ('a', 'multires', 'coord_mode=index'): {'32x32': (80.0, 90.0, 70.0), '64x64': (10.0, 90.0, 50.0)},
            ('b', 'fixed', 'default'): {'32x32': (85.0,), '64x64': (50.0,)}}
    for (enc, recipe, setting), by_size in top1.items():
        for size, values in by_size.items():
            for seed, acc in enumerate(values):
                row = dict(job=f'{enc}__{recipe}__s{seed}', encoding=enc, recipe=recipe, seed=seed, size=size,
                           setting=setting, top1=acc, n_images=100, train_size='32x32')
                with open(study / 'rows' / f'{enc}__{recipe}__s{seed}.jsonl', 'a') as f:
                    f.write(json.dumps(row) + '\n')
    spread = seed_spread(load_rows(study), '32', 'fixed')
    assert [s['encoding'] for s in spread] == ['a']  # b has one seed; the multires rows are not the reference recipe
    a = spread[0]
    assert a['seeds'] == [0, 1, 2]
    assert a['train'] == pytest.approx(1.5)
    assert a['off_median'] == pytest.approx(np.median([10.0, 2.0, 2.0, 1.5]))
    assert a['off_max'] == pytest.approx(10.0)
    assert a['off_max_at'] == dict(setting='coord_mode=index', size='64x64', top1=[60.0, 70.0, 65.0])
    paths = write_report(study, '32', 'fixed', plots=False)
    text = paths['seeds'].read_text()
    assert '| a | 0, 1, 2 | 1.50 | 2.0 | 10.0 (coord_mode=index, 64x64: 60.0, 70.0, 65.0) |' in text
    assert 'test-image sampling' in text  # says what the paired interval does not cover
    assert json.loads(paths['cells_json'].read_text())['seed_spread'][0]['off_max'] == pytest.approx(10.0)


def test_compute_says_where_each_job_ran_and_for_how_long(tmp_path):
    """The report states the recorded compute per device (jobs, hours training and sweeping, hosts, dates), each
    job counted once however many rows it has, and how many jobs resumed (their time is the last segment only)."""
    from visionpe.study.report import compute_by_device
    study = tmp_path / 'study'
    (study / 'rows').mkdir(parents=True)
    jobs = [('a__fixed__s0', 'cpu (x86_64, 2 cores)', 'vm', 3600.0, 1800.0, False, '2026-12-06T10:00:00'),
            ('a__fixed__s1', 'cpu (x86_64, 2 cores)', 'vm', 1800.0, 1800.0, True, '2026-12-07T09:00:00'),
            ('b__fixed__s0', 'NVIDIA H100 80GB HBM3', 'gpu1', 360.0, 36.0, False, '2026-12-07T11:00:00')]
    for job, device, host, train_s, eval_s, resumed, finished in jobs:
        rows = [dict(job=job, encoding=job.split('__')[0], recipe='fixed', seed=int(job[-1]), size=size,
                     setting='default', top1=80.0, n_images=10, train_size='32x32', device=device, host=host,
                     train_s=train_s, eval_s=eval_s, sweep_resumed=resumed, finished=finished)
                for size in ('32x32', '64x64', '32x64')]  # three rows per job: counted once
        (study / 'rows' / f'{job}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    compute = compute_by_device(load_rows(study))
    assert [c['device'] for c in compute] == ['cpu (x86_64, 2 cores)', 'NVIDIA H100 80GB HBM3']  # most jobs first
    cpu, gpu = compute
    assert cpu['jobs'] == 2 and cpu['train_h'] == pytest.approx(1.5) and cpu['sweep_h'] == pytest.approx(1.0)
    assert cpu['resumed'] == 1 and cpu['hosts'] == ['vm']
    assert (cpu['first'], cpu['last']) == ('2026-12-06', '2026-12-07')
    assert gpu['jobs'] == 1 and gpu['train_h'] == pytest.approx(0.1) and gpu['sweep_h'] == pytest.approx(0.01)
    paths = write_report(study, '32', 'fixed', plots=False)
    assert json.loads(paths['cells_json'].read_text())['meta']['compute'] == compute
    board = paths['leaderboard'].read_text()
    assert ('Compute: 2 jobs on cpu (x86_64, 2 cores) (host vm, 2026-12-06 to 2026-12-07): 2.5 worker-hours '
            '(1.5 h training, 1.0 h sweeping; 1 job resumed') in board
    assert '1 job on NVIDIA H100 80GB HBM3 (host gpu1, 2026-12-07): 0.1 worker-hours' in board


def test_aggregate_without_rows_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match='run the study first'):
        write_report(tmp_path, '32', 'fixed')


def test_job_resumes_an_unfinished_training_and_reuses_a_finished_one(tmp_path, monkeypatch):
    """``last.ckpt`` without ``train_done.json`` (a killed run, or one still running elsewhere) is resumed
    from (``--ckpt_path``), never taken for a trained model; a finished one is not trained again."""
    import visionpe.study.jobs as jobs
    spec = _spec(tmp_path)
    job = spec.jobs()[0]
    last = jobs.job_dir(spec, job) / 'checkpoints' / 'last.ckpt'
    calls = []

    def fake_run(cmd, log_file, threads):
        calls.append(cmd)
        if 'fit' in cmd:  # training: writes last.ckpt
            last.parent.mkdir(parents=True, exist_ok=True)
            last.write_bytes(b'weights')
        else:  # the sweep: one row per size
            out = Path(cmd[cmd.index('--output') + 1])
            out.mkdir(parents=True, exist_ok=True)
            rows = [dict(label='m', model='m', checkpoint=str(last), resolution=r, top1=50.0, n_images=8)
                    for r in (32, '48x64')]
            (out / 'results.json').write_text(json.dumps(dict(rows=rows)))
    monkeypatch.setattr(jobs, '_run', fake_run)
    last.parent.mkdir(parents=True)
    last.write_bytes(b'partial')  # as if the run had been killed after a periodic checkpoint
    rows = jobs.run_job(spec, job)
    train = calls[0]
    assert 'fit' in train and train[train.index('--ckpt_path') + 1] == str(last)
    assert json.loads((jobs.job_dir(spec, job) / 'train_done.json').read_text())['resumed'] is True
    assert [json.loads(ln)['size'] for ln in rows.read_text().splitlines()] == ['32x32', '48x64']
    assert all(json.loads(ln)['train_resumed'] for ln in rows.read_text().splitlines())  # its time: a lower bound
    calls.clear()
    jobs.run_job(spec, job)  # finished: only the sweep runs again
    assert len(calls) == 1 and 'fit' not in calls[0]



def test_a_cut_off_sweep_resumes_and_a_rerun_measures_anew(tmp_path, monkeypatch):
    """The sweep runs with ``--resume``: the rows a killed sweep measured (``eval/rows.partial.jsonl``, keyed by the
    checkpoint's digest) are reused, and the job's rows say the sweep was resumed; ``run --rerun`` deletes the
    job's sweep folder so that nothing earlier is reused."""
    import visionpe.study.jobs as jobs
    spec = _spec(tmp_path)
    job = spec.jobs()[0]
    run = jobs.job_dir(spec, job)
    assert '--resume' in jobs.run_job(spec, job, dry_run=True)[1]
    last = run / 'checkpoints' / 'last.ckpt'
    last.parent.mkdir(parents=True)
    last.write_bytes(b'weights')
    (run / 'train_done.json').write_text(json.dumps(dict(seconds=1.0)))
    (run / 'eval').mkdir()
    (run / 'eval' / 'rows.partial.jsonl').write_text('{"label": "m"}\n')  # a sweep killed after one row

    def fake_run(cmd, log_file, threads):
        out = Path(cmd[cmd.index('--output') + 1])
        rows = [dict(label='m', model='m', checkpoint=str(last), resolution=32, top1=50.0, n_images=8)]
        (out / 'results.json').write_text(json.dumps(dict(rows=rows)))
    monkeypatch.setattr(jobs, '_run', fake_run)
    row = json.loads(jobs.run_job(spec, job).read_text().splitlines()[0])
    assert row['sweep_resumed'] is True
    monkeypatch.setattr(jobs, 'run_job', lambda spec, j, threads=1: None)
    jobs.run_local(spec, jobs=[job], rerun=True, progress=False)
    assert not (run / 'eval').exists() and not jobs.rows_path(spec, job).exists()

def test_train_args_reach_every_training_command(tmp_path):
    spec = _spec(tmp_path, train_args=['--trainer.max_steps', '4'])
    for job in spec.jobs():
        train_cmd = run_job(spec, job, dry_run=True)[0]
        assert train_cmd[-2:] == ['--trainer.max_steps', '4']  # after the recipe's own arguments
    from visionpe.train.cli import main as train_main
    assert train_main(train_cmd[2:], run=False).config['trainer']['max_steps'] == 4


def test_eval_args_reach_every_sweep_and_may_not_repeat_the_study(tmp_path):
    spec = _spec(tmp_path, eval_args=['--keep-aspect', '--crop-ratio', '1.0'])
    from visionpe.eval.cli import build_parser
    for job in spec.jobs():
        eval_cmd = run_job(spec, job, dry_run=True)[1]
        assert eval_cmd[-3:] == ['--keep-aspect', '--crop-ratio', '1.0']
    args = build_parser().parse_args(eval_cmd[2:])
    assert args.keep_aspect and args.crop_ratio == 1.0 and args.per_image
    for owned in (['--resolutions', '64'], ['--max-images=10'], ['--coord-modes', 'ref']):
        with pytest.raises(ValueError, match='set by the study itself'):
            _spec(tmp_path, eval_args=owned)


def test_evaluator_rows_become_study_rows():
    """Only knob columns form the setting: the size columns (height, width, size) and counters do not."""
    from visionpe.study.jobs import _row_fields
    base = dict(label='m', model='m', checkpoint='c.ckpt', checkpoint_sha256='0' * 64, train_res=32, top1=50.0,
                n_images=8, n_unreadable=0, correct='AA==', images_per_s=1.0, peak_mem_mb=1.0, rope_scaling='ntk')
    a = _row_fields({**base, 'resolution': 32, 'height': 32, 'width': 32, 'size': '32x32'})
    b = _row_fields({**base, 'resolution': '32x64', 'height': 32, 'width': 64, 'size': '32x64'})
    assert a['knobs'] == b['knobs'] == {'rope_scaling': 'ntk'} and a['setting'] == b['setting'] == 'rope_scaling=ntk'
    assert (a['size'], b['size']) == ('32x32', '32x64') and b['correct'] == 'AA=='
    old = _row_fields({**base, 'resolution': 48})  # an evaluator row from before HxW sizes
    assert old['size'] == '48x48' and old['knobs'] == {'rope_scaling': 'ntk'} and 'native' not in old
    marked = _row_fields({**base, 'resolution': 32, 'native': False})  # the evaluator's mark is kept, not a knob
    assert marked['native'] is False and marked['knobs'] == {'rope_scaling': 'ntk'}
    aspect = _row_fields({**base, 'resolution': 32, 'resize': 'short_side'})  # --keep-aspect: kept, not a knob
    assert aspect['resize'] == 'short_side' and aspect['knobs'] == {'rope_scaling': 'ntk'}


def test_make_demo_runs_the_quick_study():
    """``make demo``: set-up, then the quick study (two encodings, two workers), then the pointer to the full
    leaderboard."""
    text = (REPO / 'Makefile').read_text()
    recipe = text.split('\ndemo: setup\n', 1)[1].split('\n\n', 1)[0].splitlines()
    cmd = shlex.split(recipe[0].strip())
    assert cmd[:3] == ['$(PY)', '-m', 'visionpe.study']
    from visionpe.study.__main__ import build_parser
    args = build_parser().parse_args(cmd[3:])
    assert args.command == 'run' and args.workers == 2
    spec = load_study(REPO / args.config)
    assert spec.name == 'fmnist_quick' and [j.encoding for j in spec.jobs()] == ['ape', 'rope2d_mixed']
    assert any('benchmarks/results/fmnist_study/report/leaderboard.md' in ln for ln in recipe[1:])


# ------------------------------------------------------------------------------------------ end to end
from visionpe.data.fashion_mnist import FMNIST_DIR  # noqa: E402
HAS_FMNIST = (Path(FMNIST_DIR) / 't10k-images-idx3-ubyte.gz').is_file()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FMNIST, reason='needs the Debian package dataset-fashion-mnist')
def test_quick_study_end_to_end(tmp_path, capsys):
    """configs/study/fmnist_quick.yaml with tiny overrides: two jobs trained and swept by two worker processes,
    rows with per-image results and sizes, then the report (leaderboard with both encodings, three plots)."""
    import yaml
    from visionpe.study.__main__ import main
    study = yaml.safe_load((REPO / 'configs/study/fmnist_quick.yaml').read_text())
    study.update(sizes=['32', '48', '32x64'], seeds=[0], eval_images=128, output=str(tmp_path / 'out'), work_dir=str(tmp_path / 'work'),
                 train_args=['--trainer.max_steps', '4', '--model.warmup_epochs', '0', '--data.train_subset', '256',
                             '--data.val_subset', '64', '--trainer.enable_progress_bar', 'false'])
    assert study['encodings'] == ['ape', 'rope2d_mixed']
    cfg = tmp_path / 'quick.yaml'
    cfg.write_text(yaml.safe_dump(study))
    assert main(['run', '--config', str(cfg), '--workers', '2', '--no-progress']) == 0
    rows_dir = tmp_path / 'out' / 'rows'
    files = sorted(p.name for p in rows_dir.glob('*.jsonl'))
    assert files == ['ape__fixed__s0.jsonl', 'rope2d_mixed__fixed__s0.jsonl']
    for f in files:
        rows = [json.loads(ln) for ln in (rows_dir / f).read_text().splitlines()]
        settings = {r['setting'] for r in rows}  # RoPE-Mixed: index and ref coordinates; APE: its own
        assert len(settings) == (2 if f.startswith('rope2d_mixed') else 1)
        assert sorted(r['size'] for r in rows) == sorted(['32x32', '32x64', '48x48'] * len(settings))
        for r in rows:
            c = unpack_correct(r['correct'], r['n_images'])
            assert r['n_images'] == 128 and r['top1'] == pytest.approx(100 * c.mean())
            assert len(r['checkpoint_sha256']) == 64 and r['versions']['torch'] and r['versions']['commit']
    board = (tmp_path / 'out' / 'report' / 'leaderboard.md').read_text()
    assert '| ape |' in board and '| rope2d_mixed |' in board and '32x64' in board
    for png in ('families', 'best', 'retention'):
        assert (tmp_path / 'out' / 'report' / f'{png}.png').stat().st_size > 0
    assert 'rope2d_mixed' in capsys.readouterr().out  # the comparison is printed
