"""The measuring helpers behind benchmarks/ and the evaluator (no timing assertions: the machine decides those)."""
from __future__ import annotations

import json

import pytest
import torch

from visionpe.benchmark import peak_memory, time_call, time_interleaved
from helpers import load_script


def test_time_call_statistics():
    calls = []
    assert time_call(lambda: calls.append(1), warmup=2, repeats=5, stat='min') >= 0
    assert len(calls) == 7
    with pytest.raises(ValueError, match="'median' or 'min'"):
        time_call(lambda: None, stat='mean')


def test_time_interleaved_runs_in_rounds():
    calls = []
    secs = time_interleaved({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}, warmup=1, repeats=3)
    assert calls == ['a', 'b'] + ['a', 'b'] * 3  # warm-up each, then one call of every function per round
    assert set(secs) == {'a', 'b'} and all(s >= 0 for s in secs.values())
    with pytest.raises(ValueError, match="'median' or 'min'"):
        time_interleaved({'a': lambda: None}, stat='mean')


def test_peak_memory_counts_live_tensors():
    with peak_memory() as mem:
        a = torch.empty(1024, 1024)  # 4 MiB live at once ...
        del a
        b = torch.empty(512, 1024)  # ... then 2 MiB
        del b
    assert mem.bytes == 4 * 2 ** 20


def _throughput_script():
    return load_script('benchmarks/throughput.py')


def test_throughput_memory_only(tmp_path, capsys):
    bench = _throughput_script()
    assert bench.main(['--models', 'vit_ape_small', '--memory-only', '--mem-size', '64', '--out', str(tmp_path)]) == 0
    rows = json.loads((tmp_path / 'results.json').read_text())['rows']
    assert set(rows) == {'vit_small_patch16_224', 'deit3_small_patch16_224', 'vit_ape_small'}
    assert all(r['mem_64_mib'] > 0 and 'fwd_224' not in r for r in rows.values())
    assert '| vit_ape_small |' in capsys.readouterr().out


def test_throughput_timing_row_per_model(tmp_path, capsys):
    """A timed run: every model (ours, the baseline twice, the timm twin) gets every column and a ratio."""
    bench = _throughput_script()
    assert bench.main(['--models', 'vit_ape_small', '--sizes', '32', '--batch', '1', '--repeats', '1',
                       '--no-memory', '--out', str(tmp_path)]) == 0
    rows = json.loads((tmp_path / 'results.json').read_text())['rows']
    assert set(rows) == {'vit_small_patch16_224', 'deit3_small_patch16_224', 'vit_ape_small',
                         'vit_small_patch16_224 (again)'}
    assert all(r['fwd_32'] > 0 and r['fwdbwd_32'] > 0 and 'mem_1024_mib' not in r for r in rows.values())
    out = capsys.readouterr().out
    assert '| vit_small_patch16_224 (again) |' in out and '(deit3_small_patch16_224)' in out


def test_throughput_no_backward(tmp_path, capsys):
    """--no-backward: the forward columns only (quick checks at large sizes)."""
    bench = _throughput_script()
    assert bench.main(['--models', 'vit_ape_small', '--sizes', '32', '48', '--batch', '1', '--repeats', '1',
                       '--no-memory', '--no-backward', '--out', str(tmp_path)]) == 0
    rows = json.loads((tmp_path / 'results.json').read_text())['rows']
    assert all(r['fwd_32'] > 0 and r['fwd_48'] > 0 and 'fwdbwd_32' not in r for r in rows.values())
    assert 'fwdbwd' not in capsys.readouterr().out


def test_subset_check_refuses_weights_other_than_the_committed_rows(tmp_path):
    """benchmarks/fmnist_subset_check.py compares a full-test-set sweep with a job's committed subset rows; a
    checkpoint that is missing, or is not (by SHA-256) the one those rows measured, is refused by name."""
    from visionpe.study.jobs import job_dir, rows_path
    from visionpe.study.spec import load_study
    check = load_script('benchmarks/fmnist_subset_check.py')
    spec = load_study('configs/study/fmnist_quick.yaml',
                      ['--output', str(tmp_path / 'out'), '--work_dir', str(tmp_path / 'work')])
    job = spec.jobs()[0]
    with pytest.raises(SystemExit, match='no committed rows'):
        check.check_job(spec, spec, job, 1)
    rows_path(spec, job).parent.mkdir(parents=True)
    rows_path(spec, job).write_text(json.dumps(dict(job=job.id, checkpoint_sha256='ab' * 32)) + '\n')
    with pytest.raises(SystemExit, match='is gone'):
        check.check_job(spec, spec, job, 1)
    ckpt = job_dir(spec, job) / 'checkpoints' / 'last.ckpt'
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b'other weights')
    with pytest.raises(SystemExit, match='not the checkpoint its committed rows measured'):
        check.check_job(spec, spec, job, 1)


def test_subset_check_report_counts_what_it_claims(tmp_path):
    check = load_script('benchmarks/fmnist_subset_check.py')
    rows = [dict(job='a__fixed__s0', setting='default', size=s, top1_full=80.0, top1_subset=80.0 - d,
                 full_minus_subset=d, se=0.8, z=d / 0.8, subset_reproduced=ok, subset_images_differing=0 if ok else 3)
            for s, d, ok in (('32x32', 0.1, True), ('64x64', -2.0, True), ('128x128', 0.5, False))]
    text = check.write_report(rows, tmp_path)
    assert 'image for image in 2 of 3 cells' in text and '> 1.96 SE in 1 of 3 cells' in text
    assert 'largest |full - subset| 2.00 points' in text and '| no (3 images) |' in text
    assert len((tmp_path / 'rows.jsonl').read_text().splitlines()) == 3


def test_subset_check_keeps_earlier_jobs_rows(tmp_path):
    check = load_script('benchmarks/fmnist_subset_check.py')
    path = tmp_path / 'rows.jsonl'
    path.write_text(''.join(json.dumps(dict(job=j, size=s)) + '\n' for j, s in (('a', '32'), ('b', '32'), ('b', '64'))))
    merged = check.merge_rows(path, [dict(job='b', size='128'), dict(job='c', size='32')])
    assert [(r['job'], r['size']) for r in merged] == [('a', '32'), ('b', '128'), ('c', '32')]
    assert check.merge_rows(tmp_path / 'none.jsonl', [dict(job='c')]) == [dict(job='c')]
