"""Parity with the reference implementations' golden vectors.

Data-driven: every folder with a config.json under the golden roots (``$VISIONPE_GOLDEN_DIR``, several
folders separated by ``os.pathsep``; by default ../shared/golden and ../shared/golden-next) is one set;
its adapter (tests/golden_adapters) builds our model from the upstream config, converts the upstream
state dict and must reproduce every stored output tensor to the adapter's tolerance (scaled error
``max|diff| / max(1, max|ref|)`` <= 1e-5 in fp32, or exact for the tensors an adapter names). Every set needs an
adapter, under ``*-next`` roots too (their encodings, PaPE, PaPE-RI and Spiral RoPE, are built): a set without one
fails, naming it.
"""
from __future__ import annotations

import pytest

from conftest import golden_dirs
from golden_adapters import compare_set, discover, get_adapter

ROOTS = golden_dirs()
SETS = discover(*ROOTS)

pytestmark = pytest.mark.golden


@pytest.mark.skipif(not ROOTS[0].is_dir(), reason=f'golden vectors not found at {ROOTS[0]} (set VISIONPE_GOLDEN_DIR)')
def test_golden_sets_found():
    assert any(gs.root == ROOTS[0] for gs in SETS), f'no golden sets (config.json) under {ROOTS[0]}'


@pytest.mark.parametrize('gs', SETS, ids=[f'{s.root.name}/{s.name}' for s in SETS])
def test_golden_set(gs):
    rows = compare_set(gs)
    bad = [(k, d, tol) for k, d, tol in rows if not d <= tol]
    worst = max(rows, key=lambda r: r[1] / r[2] if r[2] else r[1])
    print(f'{gs.name}: {len(rows)} tensors, worst {worst[0]} error {worst[1]:.2e} (tolerance {worst[2]:g})')
    assert not bad, f'{gs.name}: ' + '; '.join(f'{k} error {d:.3e} > {tol:g}' for k, d, tol in bad)


def test_discovery_over_several_roots(tmp_path, monkeypatch):
    """$VISIONPE_GOLDEN_DIR lists roots separated by os.pathsep; a set without an adapter fails under any root."""
    import json
    import os

    import conftest
    for root in ('golden', 'golden-next'):
        (tmp_path / root / 'toy').mkdir(parents=True)
        (tmp_path / root / 'toy' / 'config.json').write_text(json.dumps({'target': 'no_such_encoding'}))
    monkeypatch.setenv('VISIONPE_GOLDEN_DIR', os.pathsep.join(str(tmp_path / r) for r in ('golden', 'golden-next')))
    roots = conftest.golden_dirs()
    assert roots == [tmp_path / 'golden', tmp_path / 'golden-next']
    sets = discover(*roots, tmp_path / 'missing')
    assert [(s.root.name, s.name, s.target) for s in sets] == [('golden', 'toy', 'no_such_encoding'),
                                                                ('golden-next', 'toy', 'no_such_encoding')]
    assert get_adapter('no_such_encoding') is None
    for gs in sets:
        with pytest.raises(AssertionError, match='no golden adapter'):
            compare_set(gs)


def test_scaled_error_and_exact_comparison():
    import torch

    from golden_adapters import scaled_error
    ref = torch.tensor([560., -3.0, 0.5])
    assert scaled_error(ref, ref + 1e-3) == pytest.approx(1e-3 / 560, rel=0.05)  # large values: relative
    assert scaled_error(ref / 1000, ref / 1000 + 1e-6) == pytest.approx(1e-6, rel=0.05)  # within [-1, 1]: absolute
    bias = torch.tensor([-3.39e38, -1.2345678, 0.0, float('-inf')])
    rounded = bias.to(torch.bfloat16).float()
    assert scaled_error(bias, bias.clone(), relative=True) == 0.0
    assert scaled_error(bias, rounded, relative=True) > 1e-4  # bf16 rounding is caught entry by entry
    assert scaled_error(bias, bias.nan_to_num(neginf=0.), relative=True) == float('inf')  # -inf moved


@pytest.mark.skipif(not any(s.target == 'lookhere' for s in SETS), reason='no LookHere golden set')
def test_lookhere_bias_comparison_catches_missing_bf16_rounding(monkeypatch):
    """Golden NOTES quirk 1: a LookHere without the bf16 rounding of its bias must fail the golden set."""
    from golden_adapters import lookhere as adapter
    gs = next(s for s in SETS if s.target == 'lookhere')
    build = adapter.build_lookhere
    monkeypatch.setattr(adapter, 'build_lookhere', lambda g, **kw: build(g, bf16_round=False, **kw))
    bad = {k for k, d, tol in compare_set(gs) if not d <= tol}
    assert bad and all(k.startswith('lh_bias_') for k in bad), bad
