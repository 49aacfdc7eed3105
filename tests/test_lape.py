"""LaPE: the per-layer PE chain p_l = LN_l(p_(l-1)) (docs/encodings.md, "LaPE") computed lazily at inference."""
from __future__ import annotations

import pytest
import timm
import torch

import visionpe  # noqa: F401  (registers the models)
from visionpe.grid import Grid
from visionpe.pos.absolute import LaPEChain

from helpers import DEEP_VIT as SMALL
from helpers import inference_peak_bytes


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL).eval()
    for norm in getattr(model.pe, 'norms', []):  # LayerNorms away from identity, so the chain matters
        torch.nn.init.normal_(norm.weight, 1.0, 0.2)
        torch.nn.init.normal_(norm.bias, 0.0, 0.2)
    return model


def test_lazy_chain_equals_the_full_chain_in_any_order():
    model = _model('vit_lape_tiny')
    grid = Grid(5, 7, model.num_prefix_tokens)
    full = model.pe.prepare(grid)
    assert isinstance(full, list) and len(full) == SMALL['depth']  # gradients on: every p_l kept
    with torch.no_grad():
        lazy = model.pe.prepare(grid)
        assert isinstance(lazy, LaPEChain) and len(lazy) == SMALL['depth']
        for layer in (0, 1, 2, 7, 3, 11, 11, 0, 5):  # in order, repeated, and backwards
            torch.testing.assert_close(lazy[layer], full[layer], rtol=0, atol=0)
        with pytest.raises(IndexError, match='out of range'):
            lazy[SMALL['depth']]
    assert not torch.equal(full[0], full[1])


def test_inference_output_is_the_same_with_and_without_gradients():
    model = _model('vit_lape_tiny')
    x = torch.randn(2, 3, 64, 96)
    with_grad = model(x)
    with torch.inference_mode():
        without = model(x)
    torch.testing.assert_close(without, with_grad, rtol=0, atol=1e-6)


def test_inference_memory_does_not_grow_with_depth():
    """At 1024 tokens the old eager chain held depth x (N, D) more than the learned-APE ViT."""
    x = torch.randn(1, 3, 256, 256)
    models = {name: _model(name) for name in ('vit_ape_tiny', 'vit_lape_tiny')}
    peaks = {name: inference_peak_bytes(model, x) for name, model in models.items()}
    tokens = (256 // 8) ** 2 + models['vit_ape_tiny'].num_prefix_tokens
    pe_bytes = tokens * SMALL['embed_dim'] * 4
    extra = peaks['vit_lape_tiny'] - peaks['vit_ape_tiny']
    assert extra <= 3 * pe_bytes, (extra / pe_bytes, peaks)  # eager chain: 12 x pe_bytes
