"""Every attention backend equals the math path, for every encoding, at two grid sizes.

math is the reference; sdpa must match in forward and backward; flex (FlexAttention, eager,
forward-only on CPU) must match in eval; xformers needs CUDA and runs only there.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
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


# FlexAttention is worth checking where an encoding reaches the kernel: a bias or score_mod (iRPE,
# LookHere, every hierarchical model's window/stripe masks and tables), q/k of another width than v
# (PoPE), and one rotation-only control (RoPE). The other ViT encodings act on tokens or rotate q/k
# before the backend is chosen, so under flex they run exactly the control's kernel call; each eager
# flex call traces through dynamo (about 20 s per model on the 2-core CI machine).
FLEX_MODELS = [n for n in MODELS if not n.startswith('vit_')
               or n.startswith(('vit_irpe', 'vit_lookhere', 'vit_pope2d', 'vit_rope2d_tiny'))]


@pytest.mark.skipif(not flex_available(), reason='this torch build has no FlexAttention')
@pytest.mark.parametrize('name', FLEX_MODELS)
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


# --- biases built by blocks of query rows (SDPA without autograd, above VISIONPE_MAX_BIAS_MB) -------
ROW_BIAS_MODELS = [n for n in MODELS if n.startswith(('vit_lookhere', 'vit_irpe'))]


def _random_tables(model):
    """iRPE tables start at zero; give every position parameter values so the bias is not trivial."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.pe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def test_row_bias_models_found():
    assert {'vit_lookhere_tiny', 'vit_irpe_tiny', 'vit_irpe_bias_tiny', 'vit_irpe_qkv_tiny'} <= set(ROW_BIAS_MODELS)


@pytest.mark.parametrize('name', ROW_BIAS_MODELS)
def test_bias_rows_concatenate_to_bias(name):
    """For every layer, the row blocks of the bias put together are the whole bias, exactly."""
    from visionpe.grid import Grid
    model = _random_tables(create_tiny(name, dynamic_img_size=True)).eval()
    pe, H, D = model.pe, 4, 16
    grid = Grid(5, 7, model.num_prefix_tokens)
    T = grid.h * grid.w + grid.num_prefix
    q, k = torch.randn(2, H, T, D), torch.randn(2, H, T, D)
    state = pe.prepare(grid)
    for layer in range(len(model.blocks)):
        assert pe.row_bias(layer) in ('shared', 'per_sample'), layer
        whole = pe.bias(q, k, 0.25, layer, state)
        parts = torch.cat([pe.bias_rows(q, k, 0.25, layer, state, slice(r, r + 4)) for r in range(0, T, 4)], -2)
        assert parts.shape[-2:] == (T, T)
        assert torch.equal(parts.expand_as(whole), whole), layer


@pytest.mark.parametrize('name', ROW_BIAS_MODELS)
def test_row_blocks_equal_math(name, monkeypatch):
    """SDPA by row blocks (the math path by blocks for iRPE on values, which needs the probabilities)
    equals the whole-bias math path."""
    import visionpe.attention as attention
    model = _random_tables(create_tiny(name, dynamic_img_size=True)).eval()
    used = []
    real = attention.attend_by_row_blocks
    monkeypatch.setattr(attention, 'attend_by_row_blocks', lambda *a: used.append(a[-1]) or real(*a))
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            monkeypatch.delenv(attention.MAX_BIAS_ENV_VAR, raising=False)
            ref, whole = _run(model, x, 'math'), _run(model, x, 'sdpa')
            assert not used, 'a small bias must be built whole'
            monkeypatch.setenv(attention.MAX_BIAS_ENV_VAR, '0.0005')  # 512 bytes: a few rows per block
            blocks = _run(model, x, 'sdpa')
        assert used and all(0 < r < 16 for r in used), used
        used.clear()
        assert (ref - blocks).abs().max().item() < TOL, size
        assert (whole - blocks).abs().max().item() < TOL, size
    model.train()  # with autograd, the bias is built whole (SDPA's backward keeps it anyway)
    _run(model, torch.randn(1, 3, *SIZES[0]), 'sdpa').sum().backward()
    assert not used


@pytest.mark.parametrize('name', ['vit_lookhere_tiny', 'vit_irpe_qkv_tiny'])
def test_row_blocks_cut_peak_memory(name, monkeypatch):
    """At 1025 tokens one whole (heads, T, T) float tensor is 16 MiB; by rows the peak is far below
    (LookHere: its cached base is not built; iRPE on Q, K, V: the math path's logits and probabilities)."""
    import visionpe.attention as attention
    from visionpe.benchmark import peak_memory
    model = timm.create_model(name, img_size=128, patch_size=4, embed_dim=64, depth=1, num_heads=4).eval()
    x = torch.randn(1, 3, 128, 128)
    dense = 4 * 1025 * 1025 * 4
    if 'irpe' in name:
        with torch.no_grad():
            model(x)  # cache the (small, uint8) bucket ids outside the measurement
    monkeypatch.setenv(attention.MAX_BIAS_ENV_VAR, '64')
    with torch.no_grad(), peak_memory() as whole:
        ref = model(x)
    if hasattr(model.pe, '_bases'):
        model.pe._bases.clear()
    monkeypatch.setenv(attention.MAX_BIAS_ENV_VAR, '2')
    with torch.no_grad(), peak_memory() as blocks:
        out = model(x)
    assert whole.bytes > dense
    assert blocks.bytes < dense / 2, (blocks.mib, whole.mib)
    assert (ref - out).abs().max().item() < TOL


def test_max_bias_setting_errors(monkeypatch):
    from visionpe.attention import MAX_BIAS_ENV_VAR, max_bias_bytes
    monkeypatch.setenv(MAX_BIAS_ENV_VAR, 'lots')
    with pytest.raises(ValueError, match='number of MiB'):
        max_bias_bytes()
    monkeypatch.setenv(MAX_BIAS_ENV_VAR, '0')
    with pytest.raises(ValueError, match='positive'):
        max_bias_bytes()


def test_bias_budget_context_overrides_the_environment(monkeypatch):
    from visionpe.attention import MAX_BIAS_ENV_VAR, bias_budget, bias_block_rows, max_bias_bytes
    monkeypatch.setenv(MAX_BIAS_ENV_VAR, '2')
    pos = SimpleNamespace(row_bias='per_sample')
    q = k = torch.zeros(8, 4, 256, 16)  # a (8, 4, 256, 256) fp32 bias: 8 MiB, 32 KiB per query row
    assert max_bias_bytes() == 2 * 2 ** 20 and bias_block_rows(pos, q, k) == 16  # a quarter of 2 MiB
    with bias_budget(64):
        assert max_bias_bytes() == 64 * 2 ** 20 and bias_block_rows(pos, q, k) is None  # whole
        with bias_budget(4):
            assert bias_block_rows(pos, q, k) == 32
        assert max_bias_bytes() == 64 * 2 ** 20
    assert max_bias_bytes() == 2 * 2 ** 20  # restored
    with pytest.raises(ValueError, match='positive'):
        with bias_budget(0):
            pass


def test_math_logits_into_a_fresh_bias():
    """``into_bias``: the logits are accumulated into the caller's fresh bias (same result as a separate
    add); a broadcast or strided bias, or autograd, takes the separate add and leaves the bias unchanged."""
    from visionpe.attention import _math
    q, k, v = torch.randn(3, 2, 3, 7, 8).unbind(0)
    full = torch.randn(2, 3, 7, 7)
    ref, ref_p = _math(q, k, v, 0.3, full, 0., False)
    bias = full.clone()
    out, probs = _math(q, k, v, 0.3, bias, 0., False, into_bias=True)
    assert probs.data_ptr() == bias.data_ptr()  # the bias buffer became the probabilities
    assert (out - ref).abs().max().item() < 1e-6 and (probs - ref_p).abs().max().item() < 1e-6
    for other in (full[:1].clone(), full.transpose(-1, -2).contiguous().transpose(-1, -2)):
        kept = other.clone()
        out, probs = _math(q, k, v, 0.3, other, 0., False, into_bias=True)
        assert torch.equal(other, kept) and probs.data_ptr() != other.data_ptr()
        assert (out - _math(q, k, v, 0.3, other, 0., False)[0]).abs().max().item() < 1e-6
    qg = q.clone().requires_grad_()
    bias = full.clone()
    out, _ = _math(qg, k, v, 0.3, bias, 0., False, into_bias=True)
    assert torch.equal(bias, full) and (out - ref).abs().max().item() < 1e-6
    out.sum().backward()
    assert qg.grad is not None
