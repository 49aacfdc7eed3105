"""Parity with the reference implementations' golden vectors.

Data-driven: every folder with a config.json under the golden roots (``$VISIONPE_GOLDEN_DIR``, several
folders separated by ``os.pathsep``; by default ../shared/golden and ../shared/golden-next) is one set;
its adapter (tests/golden_adapters) builds our model from the upstream config, converts the upstream
state dict and must reproduce every stored output tensor to the adapter's tolerance (scaled error
``max|diff| / max(1, max|ref|)`` <= 1e-5 in fp32, or exact for the tensors an adapter names). A set under
a ``*-next`` root whose encoding has no adapter yet is skipped with that reason; any other set fails.
"""
from __future__ import annotations

import pytest

from conftest import golden_dirs
from golden_adapters import compare_set, discover, get_adapter, may_lack_adapter

ROOTS = golden_dirs()
SETS = discover(*ROOTS)

pytestmark = pytest.mark.golden


@pytest.mark.skipif(not ROOTS[0].is_dir(), reason=f'golden vectors not found at {ROOTS[0]} (set VISIONPE_GOLDEN_DIR)')
def test_golden_sets_found():
    assert any(gs.root == ROOTS[0] for gs in SETS), f'no golden sets (config.json) under {ROOTS[0]}'


@pytest.mark.parametrize('gs', SETS, ids=[f'{s.root.name}/{s.name}' for s in SETS])
def test_golden_set(gs):
    if get_adapter(gs.target) is None and may_lack_adapter(gs):
        pytest.skip(f'no adapter for {gs.target} yet ({gs.root.name}/{gs.name})')
    rows = compare_set(gs)
    bad = [(k, d, tol) for k, d, tol in rows if not d <= tol]
    worst = max(rows, key=lambda r: r[1] / r[2] if r[2] else r[1])
    print(f'{gs.name}: {len(rows)} tensors, worst {worst[0]} error {worst[1]:.2e} (tolerance {worst[2]:g})')
    assert not bad, f'{gs.name}: ' + '; '.join(f'{k} error {d:.3e} > {tol:g}' for k, d, tol in bad)
