"""benchmarks/gpu_check.py in its CPU mode (``--device cpu --quick``), so that the GPU check cannot rot.

The CPU run has sdpa, eager flex (forward only) and math; the CUDA-only parts (xformers, compiled
flex, the 1.5x flex memory bound, the GPU speed targets) run only with ``--device cuda``.
"""
from __future__ import annotations

import json

import pytest
import torch

from visionpe.pos import list_encodings
from helpers import load_script


def _gpu_check():
    return load_script('benchmarks/gpu_check.py')


@pytest.mark.slow
def test_cpu_quick_mode_passes_and_covers_every_encoding(tmp_path):
    gc = _gpu_check()
    assert gc.main(['--device', 'cpu', '--quick', '--out', str(tmp_path)]) == 0
    res = json.loads((tmp_path / 'results.json').read_text())
    assert res['ok'] and set(gc.SECTIONS) <= set(res)
    rows = res['backends']['rows']
    # every registered encoding's forward, in fp32 and bf16, sdpa vs math
    fwd = {e for r in rows if r['backend'] == 'sdpa' and r['ok'] for e in r['encodings']}
    assert fwd == set(list_encodings()) and not res['backends']['uncovered_encodings']
    assert {r['dtype'] for r in rows} == {'fp32', 'bf16'}
    assert any(r['backward'] for r in rows) and any(r['backend'] == 'flex' for r in rows)
    # flex runs each biased encoding's score_mod (by capability, not by name)
    assert {'irpe', 'lookhere'} <= {e for r in rows if r['backend'] == 'flex' and r['effective'] == 'flex'
                                    for e in r['encodings']}
    assert res['train']['rows'] and all(r['losses'][-1] < r['losses'][0] for r in res['train']['rows'])
    groups = res['speed']['groups']
    assert {gc.VIT_BASELINE, gc.HIER_BASELINE} <= set(groups)
    assert all(v > 0 for g in groups.values() for r in g.values() for k, v in r.items() if k.startswith('fwd'))
    assert res['flex_memory']['rows']
    md = (tmp_path / 'results.md').read_text()
    assert md.startswith('# visionpe GPU check: PASSED') and '| vit_rope2d_tiny | sdpa' in md


def test_comparisons_fail_beyond_their_bounds():
    gc = _gpu_check()
    ref = torch.ones(2, 5)
    assert gc.compare(ref + 5e-5, {}, ref, {}, 'fp32')['ok']
    assert not gc.compare(ref + 2e-4, {}, ref, {}, 'fp32')['ok']
    assert not gc.compare(ref * float('nan'), {}, ref, {}, 'fp32')['ok']
    assert gc.compare(ref * 1.01, {}, ref, {}, 'bf16')['ok']
    assert not gc.compare(ref * 1.05, {}, ref, {}, 'bf16')['ok']
    g = {'w': torch.ones(3), 'b': torch.full((3,), 1e-9)}
    assert gc.compare(ref, {'w': g['w'], 'b': g['b'] * 3}, ref, g, 'fp32')['ok']  # noise on a ~0 gradient
    assert not gc.compare(ref, {'w': g['w'] * 1.01, 'b': g['b']}, ref, g, 'fp32')['ok']
    assert not gc.compare(ref, {'w': g['w']}, ref, g, 'fp32')['ok']  # a parameter lost its gradient
