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
