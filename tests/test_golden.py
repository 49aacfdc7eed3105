"""Parity with the reference implementations' golden vectors (../shared/golden, $VISIONPE_GOLDEN_DIR).

Data-driven: every folder with a config.json is one set; its adapter (tests/golden_adapters)
builds our model from the upstream config, converts the upstream state dict and must reproduce
every stored output tensor to the adapter's tolerance (1e-5 absolute or tighter, fp32).
"""
from __future__ import annotations

import pytest

from conftest import golden_dir
from golden_adapters import compare_set, discover

ROOT = golden_dir()
SETS = discover(ROOT)

pytestmark = pytest.mark.golden


@pytest.mark.skipif(not ROOT.is_dir(), reason=f'golden vectors not found at {ROOT} (set VISIONPE_GOLDEN_DIR)')
def test_golden_sets_found():
    assert SETS, f'no golden sets (config.json) under {ROOT}'


@pytest.mark.parametrize('gs', SETS, ids=[s.name for s in SETS])
def test_golden_set(gs):
    rows = compare_set(gs)
    bad = [(k, d, tol) for k, d, tol in rows if d > tol]
    worst = max(rows, key=lambda r: r[1])
    print(f'{gs.name}: {len(rows)} tensors, worst {worst[0]} max|diff| {worst[1]:.2e}')
    assert not bad, f'{gs.name}: ' + '; '.join(f'{k} max|diff| {d:.3e} > {tol:g}' for k, d, tol in bad)
