"""Per-grid caches of the fast paths (RST strip layouts and length groups, the iRPE product factors, PoPE and
RoPE tables) never serve values from another input size or from parameters before an optimizer step: after
forwards at several sizes and a training step, every output equals that of a fresh copy of the model (same
weights, empty caches), in inference mode, under no_grad and with autograd."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import create_tiny

SIZES = ((64, 64), (96, 64), (64, 64))  # square, non-square, back to the first (cache hits)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Position tables are often zero-initialised: give every parameter a value that matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _outputs(model: torch.nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    outs = []
    for x in xs:
        with torch.inference_mode():
            outs.append(model(x).clone())
        with torch.no_grad():
            outs.append(model(x))
    outs.append(model(xs[1]))  # autograd on
    return [o.detach() for o in outs]


@pytest.mark.parametrize('name', ['rst_tiny', 'vit_irpe_qkv_tiny', 'vit_pope2d_tiny', 'swin_rope2d_mixed_tiny'])
def test_no_stale_values_after_a_size_change_or_an_optimizer_step(name):
    torch.manual_seed(0)
    model = _randomize(create_tiny(name, dynamic_img_size=True, num_classes=3))
    xs = [torch.randn(2, 3, *hw) for hw in SIZES]
    before = _outputs(model, xs)  # fills the caches at every size
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, _outputs(copy.deepcopy(model), xs)))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(xs[1]).square().sum().backward()
    opt.step()
    _randomize(model)  # in place like any optimizer, and large enough to matter for every table
    after = _outputs(model, xs)
    fresh = create_tiny(name, dynamic_img_size=True, num_classes=3)
    fresh.load_state_dict(model.state_dict())
    expected = _outputs(fresh, xs)
    for a, e in zip(after, expected):
        assert (a - e).abs().max().item() < 1e-5
    assert any((a - b).abs().max().item() > 1e-3 for a, b in zip(after, before)), 'the step changed nothing'
