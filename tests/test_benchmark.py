"""The measuring helpers behind benchmarks/ and the evaluator (no timing assertions: the machine decides those)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from visionpe.benchmark import peak_memory, time_call

ROOT = Path(__file__).resolve().parents[1]


def test_time_call_statistics():
    calls = []
    assert time_call(lambda: calls.append(1), warmup=2, repeats=5, stat='min') >= 0
    assert len(calls) == 7
    with pytest.raises(ValueError, match="'median' or 'min'"):
        time_call(lambda: None, stat='mean')


def test_peak_memory_counts_live_tensors():
    with peak_memory() as mem:
        a = torch.empty(1024, 1024)  # 4 MiB live at once ...
        del a
        b = torch.empty(512, 1024)  # ... then 2 MiB
        del b
    assert mem.bytes == 4 * 2 ** 20


def test_throughput_memory_only(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('throughput', ROOT / 'benchmarks' / 'throughput.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(['--models', 'vit_ape_small', '--memory-only', '--mem-size', '64', '--out', str(tmp_path)]) == 0
    rows = json.loads((tmp_path / 'results.json').read_text())['rows']
    assert set(rows) == {'vit_small_patch16_224', 'deit3_small_patch16_224', 'vit_ape_small'}
    assert all(r['mem_64_mib'] > 0 and 'fwd_224' not in r for r in rows.values())
    assert '| vit_ape_small |' in capsys.readouterr().out
