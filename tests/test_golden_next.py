"""Golden sets of the newer encodings (../shared/golden-next: PaPE, PaPE-RI, Spiral RoPE), through the same
data-driven harness as tests/test_golden.py. (The golden discovery of test_golden.py is being extended to
../shared/golden-next; until then this file runs these sets.)"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from golden_adapters import compare_set, discover

ROOT = Path(os.environ.get('VISIONPE_GOLDEN_NEXT_DIR', Path(__file__).resolve().parents[2] / 'shared' / 'golden-next'))
SETS = discover(ROOT)
TARGETS = {'pape', 'pape_ri', 'spiral_rope'}

pytestmark = pytest.mark.golden


@pytest.mark.skipif(not ROOT.is_dir(), reason=f'golden-next vectors not found at {ROOT}')
def test_golden_next_sets_found():
    assert TARGETS <= {s.target for s in SETS}, f'missing golden-next targets under {ROOT}'


@pytest.mark.parametrize('gs', SETS, ids=[s.name for s in SETS])
def test_golden_next_set(gs):
    rows = compare_set(gs)
    bad = [(k, d, tol) for k, d, tol in rows if d > tol]
    worst = max(rows, key=lambda r: r[1] / r[2] if r[2] else r[1])
    print(f'{gs.name}: {len(rows)} tensors, worst (relative to tolerance) {worst[0]} max|diff| {worst[1]:.2e} '
          f'(tol {worst[2]:.1e})')
    assert not bad, f'{gs.name}: ' + '; '.join(f'{k} max|diff| {d:.3e} > {tol:.3g}' for k, d, tol in bad)
