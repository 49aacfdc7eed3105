"""Coordinates: one convention (x = column, y = row, row-major tokens), every mode."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import create_tiny, one_size_per_encoding
from visionpe.grid import COORD_MODES, Grid, GridCache, grid_coords


def test_index_is_column_row_row_major():
    xy = grid_coords(2, 3, 'index')
    assert xy.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]


def test_normalized_centered_ref_modes():
    h, w = 4, 8
    idx = grid_coords(h, w, 'index')
    assert torch.allclose(grid_coords(h, w, 'normalized'), (idx + 0.5) / torch.tensor([w, h]))
    assert torch.allclose(grid_coords(h, w, 'centered'), 2 * (idx + 0.5) / torch.tensor([w, h]) - 1)
    ref = grid_coords(h, w, 'ref', ref_hw=(2, 2))
    assert torch.allclose(ref, idx * torch.tensor([2 / w, 2 / h]))
    nref = grid_coords(h, w, 'normalized_ref', ref_hw=(2, 2))
    assert torch.allclose(nref, (idx + 0.5) / 2)
    # a larger grid in 'ref' mode spans the same range as the reference grid
    assert grid_coords(16, 16, 'ref', ref_hw=(8, 8)).max() == pytest.approx(7.5)


def test_polar_mode_radius_and_angle():
    xy = grid_coords(3, 3, 'polar', polar_eps=1.0)
    centre = xy[4]
    assert centre[0] == pytest.approx(0.0)  # log(0 + 1)
    right, below = xy[5], xy[7]
    assert right[0] == pytest.approx(math.log(2.0)) and right[1] == pytest.approx(0.0)
    assert below[1] == pytest.approx(math.pi / 2)  # y grows downwards
    # a uniform rescale of the grid is a shift along log r (same angles)
    a, b = grid_coords(9, 9, 'polar', polar_eps=1e-6), grid_coords(17, 17, 'polar', polar_eps=1e-6)
    assert torch.allclose(a[0, 1], b[0, 1])


def test_bad_mode_and_missing_ref():
    with pytest.raises(ValueError, match='unknown coordinate mode'):
        grid_coords(2, 2, 'pixels')
    with pytest.raises(ValueError, match='reference grid'):
        grid_coords(2, 2, 'ref')
    assert 'polar' in COORD_MODES


def test_grid_and_cache():
    g = Grid(3, 5, 1)
    assert g.num_tokens == 16 and g.num_patches == 15 and g.hw == (3, 5)
    cache, calls = GridCache(max_entries=2), []

    def build():
        calls.append(1)
        return torch.ones(2)
    for key in ['a', 'a', 'b', 'a', 'c', 'a']:
        cache.get(key, torch.device('cpu'), build)
    assert len(calls) == 4 and len(cache) == 2  # FIFO eviction: a, b, c, then a again


@pytest.mark.parametrize('name', [n for n in one_size_per_encoding() if n.startswith('vit_')])
def test_training_after_inference_mode(name):
    """Grid caches filled under torch.inference_mode (Lightning validation, the evaluator) must not leak
    inference tensors into a later training step."""
    model = create_tiny(name, img_size=32, patch_size=8)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
