"""Every attention backend equals the math path, for every encoding, at two grid sizes.

math is the reference; sdpa must match in forward and backward; flex (FlexAttention, eager,
forward-only on CPU) must match in eval; xformers needs CUDA and runs only there.
"""
from __future__ import annotations

import pytest
import torch

from helpers import create_tiny, one_size_per_encoding
from visionpe.attention import attend, flex_available, pad_bias_for_xformers, use_backend, xformers_available

MODELS = one_size_per_encoding()
SIZES = [(64, 64), (64, 96)]
TOL = 1e-5


def _run(model, x, backend):
    with use_backend(backend):
        return model(x)


@pytest.mark.parametrize('name', MODELS)
def test_sdpa_equals_math_forward_and_backward(name):
    model = create_tiny(name, dynamic_img_size=True).eval()
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref, out = _run(model, x, 'math'), _run(model, x, 'sdpa')
        assert (ref - out).abs().max().item() < TOL, size
    x = torch.randn(2, 3, *SIZES[1])
    grads = []
    for backend in ('math', 'sdpa'):
        model.zero_grad()
        _run(model, x, backend).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        scale = grads[0][n].abs().max().item() + 1e-6
        assert (grads[0][n] - grads[1][n]).abs().max().item() / scale < 1e-4, n


@pytest.mark.skipif(not flex_available(), reason='this torch build has no FlexAttention')
@pytest.mark.parametrize('name', MODELS)
def test_flex_equals_math_in_eval(name):
    model = create_tiny(name, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, *SIZES[1])
    with torch.no_grad():
        ref, out = _run(model, x, 'math'), _run(model, x, 'flex')
    assert (ref - out).abs().max().item() < TOL


def test_backend_selection_and_errors(monkeypatch):
    from visionpe.attention import resolve_backend
    cpu = torch.device('cpu')
    assert resolve_backend('auto', cpu) == 'sdpa'
    assert resolve_backend('auto', cpu, needs_probs=True) == 'math'
    with pytest.warns(UserWarning, match='xformers backend unavailable'):
        assert resolve_backend('xformers', cpu) == 'sdpa'
    monkeypatch.setenv('VISIONPE_ATTN_BACKEND', 'math')
    assert resolve_backend('auto', cpu) == 'math'
    assert resolve_backend('sdpa', cpu) == 'sdpa'  # an explicit module setting beats the env var
    with use_backend('flex'):
        assert resolve_backend('sdpa', cpu) == 'flex'  # the context manager beats both
    monkeypatch.setenv('VISIONPE_ATTN_BACKEND', 'fast')
    with pytest.raises(ValueError, match='unknown attention backend'):
        resolve_backend('auto', cpu)


def test_attend_bias_shapes_agree():
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    for bias in (torch.randn(10, 10), torch.randn(3, 10, 10), torch.randn(2, 3, 10, 10)):
        ref, _ = attend(q, k, v, 0.3, bias=bias, backend='math')
        out, _ = attend(q, k, v, 0.3, bias=bias, backend='sdpa')
        assert (ref - out).abs().max() < 1e-6


def test_xformers_bias_padding_layout():
    """The xformers bias is a view into storage padded to a multiple of 8 (checked without CUDA)."""
    bias = torch.randn(1, 3, 10, 13)
    padded = pad_bias_for_xformers(bias, batch=2, heads=3)
    assert padded.shape == (2, 3, 10, 13) and torch.equal(padded[0], bias[0])
    assert padded.stride(-2) % 8 == 0


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and xformers_available()),
                    reason='xformers kernels exist only on CUDA; this machine has no CUDA device or no xformers')
@pytest.mark.parametrize('name', MODELS)
def test_xformers_equals_math_on_cuda(name):
    model = create_tiny(name, dynamic_img_size=True).eval().cuda()
    x = torch.randn(2, 3, *SIZES[1], device='cuda')
    with torch.no_grad():
        ref, out = _run(model, x, 'math'), _run(model, x, 'xformers')
    assert (ref - out).abs().max().item() < 1e-4  # fp32 on GPU: TF32 disabled by default in torch
