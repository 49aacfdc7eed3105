"""iRPE: bucket function, bucket ids on square and non-square grids, contextual / bias / value
terms against direct formulas, FlexAttention score_mod, backends, gradients, converter, errors."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from helpers import assert_backends_agree, create_tiny
from visionpe.attention import flex_available, run_backend, use_backend
from visionpe.convert import CheckpointMismatchError
from visionpe.grid import Grid
from visionpe.pos.irpe import irpe_bucket_ids, irpe_num_buckets, piecewise_index

# docs/encodings.md ("iRPE") and the golden NOTES: ratio 1.9, |offset| 0, 1, 2, 3, >= 4 -> 0, 1, 2, 2, 3 (odd function)
SPEC_G = {0: 0, 1: 1, 2: 2, 3: 2}


def spec_g(x: int) -> int:
    return int(math.copysign(SPEC_G.get(abs(x), 3), x)) if x else 0


def _randomize(model, std=1.0):
    """iRPE tables are zero-initialised: give them values so that their terms matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith('pe.'):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_piecewise_index_spec_values():
    offsets = torch.arange(-40, 41)
    got = piecewise_index(offsets, 1.9, 3.8, 15.2)
    assert got.tolist() == [spec_g(int(o)) for o in offsets]
    assert got.dtype == torch.int64


@pytest.mark.parametrize('hw', [(3, 5), (6, 2), (4, 4)])
def test_product_bucket_ids_formula_non_square(hw):
    h, w = hw
    ids, = irpe_bucket_ids(h, w, 1, 'product', 1.9)
    n = h * w
    assert ids.shape == (n + 1, n + 1) and irpe_num_buckets('product', 1.9) == 49
    assert (ids[0] == 49).all() and (ids[:, 0] == 49).all()  # every pair with the class token: bucket 49
    for i in range(n):
        for j in range(n):
            dr, dc = i // w - j // w, i % w - j % w  # query minus key
            assert ids[1 + i, 1 + j] == (spec_g(dr) + 3) * 7 + (spec_g(dc) + 3), (i, j)


def test_other_methods_bucket_ids():
    h, w = 3, 4
    euc, = irpe_bucket_ids(h, w, 0, 'euclidean', 1.9)
    quant, = irpe_bucket_ids(h, w, 0, 'quantization', 1.9)
    rows, cols = irpe_bucket_ids(h, w, 2, 'cross', 1.9)
    assert irpe_num_buckets('euclidean', 1.9) == irpe_num_buckets('cross', 1.9) == 7
    for i in range(h * w):
        for j in range(h * w):
            dr, dc = i // w - j // w, i % w - j % w
            assert euc[i, j] == spec_g(round(math.sqrt(dr * dr + dc * dc))) + 3
            assert quant[i, j] == spec_g(dr * dr + dc * dc) + 3
            assert rows[2 + i, 2 + j] == spec_g(dr) + 3 and cols[2 + i, 2 + j] == spec_g(dc) + 3
    assert (rows[:2] == 7).all() and (cols[:, :2] == 7).all()  # two prefix tokens share the extra bucket


@pytest.mark.parametrize('method', ['product', 'cross', 'euclidean', 'quantization'])
def test_bucket_ids_by_row_blocks(method):
    """Building the ids a few query rows at a time (bounded float offsets) changes nothing, in any dtype."""
    whole = irpe_bucket_ids(5, 7, 1, method, 1.9, block_rows=10 ** 6)
    for rows in (1, 3, 8):
        parts = irpe_bucket_ids(5, 7, 1, method, 1.9, dtype=torch.uint8, block_rows=rows)
        assert all(p.dtype == torch.uint8 and torch.equal(p.long(), m) for p, m in zip(parts, whole))
    with pytest.raises(ValueError, match='unknown iRPE method'):
        irpe_bucket_ids(2, 2, 0, 'manhattan')


def test_bucket_ids_cached_per_grid():
    model = create_tiny('vit_irpe_tiny')
    a, b = model.pe.bucket_ids(Grid(3, 5, 1)), model.pe.bucket_ids(Grid(3, 5, 1))
    assert a[0] is b[0]
    c = model.pe.bucket_ids(Grid(5, 3, 1))
    assert c[0].shape == a[0].shape and not torch.equal(c[0], a[0])


def _qkv(B, H, N, D):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


@pytest.mark.parametrize('shared_head', [True, False])
def test_contextual_terms_match_direct_formula(shared_head):
    """bias = s q_i . r_k[bucket(i, j)] + s k_j . r_q[bucket(j, i)]; value += sum_j a_ij r_v[bucket(i, j)]."""
    model = _randomize(create_tiny('vit_irpe_qkv_tiny', shared_head=shared_head))
    enc, grid = model.pe, Grid(3, 5, 1)
    state = enc.prepare(grid)
    assert state['ids'][0].dtype == torch.uint8  # 49 + 1 buckets: stored in one byte per pair
    ids = state['ids'][0].long()
    B, H, D = 2, enc.ctx.num_heads, enc.ctx.head_dim
    q, k, v = _qkv(B, H, grid.num_tokens, D)
    s = D ** -0.5
    lay = enc.layers[1]
    wk, wq, wv = (getattr(lay, f'rpe_{c}').lookup_table_weight.expand(H, -1, -1) for c in 'kqv')
    rk = wk[:, :, ids]  # (H, D, N, N): r_k[:, bucket(i, j)]
    rq = wq[:, :, ids.T]  # bucket(j, i)
    expected = torch.einsum('bhid,hdij->bhij', q * s, rk) + torch.einsum('bhjd,hdij->bhij', k * s, rq)
    assert torch.allclose(enc.bias(q, k, s, 1, state), expected, atol=1e-5)
    probs = torch.softmax(torch.randn(B, H, grid.num_tokens, grid.num_tokens), -1)
    out = torch.randn(B, H, grid.num_tokens, D)
    expected_v = out + torch.einsum('bhij,hijd->bhid', probs, wv[:, ids])
    assert torch.allclose(enc.value(out, v, probs, 1, state), expected_v, atol=1e-5)
    assert enc.needs_probs


def test_bias_mode_and_no_prefix_bucket():
    model = _randomize(create_tiny('vit_irpe_bias_tiny', rpe_on='qk', prefix_bucket=False))
    enc, grid = model.pe, Grid(4, 3, 1)
    assert enc.layers[0].rpe_k.lookup_table_bias.shape == (4, 49)  # per head, no prefix bucket
    state = enc.prepare(grid)
    ids = state["ids"][0].long()
    q, k, _ = _qkv(2, 4, grid.num_tokens, 16)
    bias = enc.bias(q, k, 0.25, 0, state)
    tk, tq = enc.layers[0].rpe_k.lookup_table_bias, enc.layers[0].rpe_q.lookup_table_bias
    n = grid.num_patches
    patch = tk[:, ids[1:, 1:]] + tq[:, ids[1:, 1:].T]
    assert bias.shape == (1, 4, n + 1, n + 1)
    assert torch.allclose(bias[0, :, 1:, 1:], patch)
    assert (bias[0, :, 0] == 0).all() and (bias[0, :, :, 0] == 0).all()  # prefix pairs: no iRPE term


@pytest.mark.parametrize('method', ['cross', 'euclidean', 'quantization'])
def test_methods_build_and_run(method):
    model = _randomize(create_tiny('vit_irpe_qkv_tiny', method=method, dynamic_img_size=True)).eval()
    keys = [k for k in model.state_dict() if k.startswith('pe.layers.0.rpe_k')]
    if method == 'cross':
        assert keys == ['pe.layers.0.rpe_k.rp_rows.lookup_table_weight', 'pe.layers.0.rpe_k.rp_cols.lookup_table_weight']
    else:
        assert keys == ['pe.layers.0.rpe_k.lookup_table_weight']
    assert model.state_dict()[keys[0]].shape == (1, 16, 8)  # 2 * 3 + 1 buckets + the class-token bucket
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 80))
    assert torch.isfinite(out).all()


def test_ref_coordinates():
    model = create_tiny('vit_irpe_tiny', coord_mode='ref', img_size=64, patch_size=16)  # reference grid 4 x 4
    train = model.pe.bucket_ids(Grid(4, 4, 1))[0].long()
    assert torch.equal(train, irpe_bucket_ids(4, 4, 1)[0])
    big = model.pe.bucket_ids(Grid(8, 8, 1))[0].long()
    half, = irpe_bucket_ids(8, 8, 1)  # offsets halved: 2 patches at 8 x 8 = 1 patch at 4 x 4
    assert big[1 + 0, 1 + 2] == irpe_bucket_ids(4, 4, 1)[0][1, 2] and not torch.equal(big, half)


@pytest.mark.skipif(not flex_available(), reason='this torch build has no FlexAttention')
@pytest.mark.parametrize('name,kw', [('vit_irpe_tiny', {}), ('vit_irpe_bias_tiny', dict(rpe_on='qk')),
                                     ('vit_irpe_tiny', dict(method='cross', rpe_on='qk', shared_head=False))])
def test_score_mod_equals_bias(name, kw):
    """FlexAttention's score_mod (no N x N tensor) against the math path with the bias tensor."""
    model = _randomize(create_tiny(name, **kw))
    enc, grid = model.pe, Grid(3, 5, 1)
    state = enc.prepare(grid)
    q, k, v = _qkv(2, 4, grid.num_tokens, 16)
    with torch.no_grad():
        ref, _ = run_backend('math', q, k, v, 0.25, bias=enc.bias(q, k, 0.25, 2, state))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            out, _ = run_backend('flex', q, k, v, 0.25, score_mod=enc.score_mod(q, k, 0.25, 2, state))
    assert torch.allclose(out, ref, atol=1e-5), float((out - ref).abs().max())


@pytest.mark.parametrize('name', ['vit_irpe_tiny', 'vit_irpe_bias_tiny', 'vit_irpe_qkv_tiny'])
def test_backends_agree_non_square(name):
    model = _randomize(create_tiny(name, dynamic_img_size=True), std=0.5).eval()
    x = torch.randn(2, 3, 48, 80)
    outs = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # qkv: sdpa falls back to math (values need the probabilities)
        for be in ('math', 'sdpa'):
            with use_backend(be):
                outs[be] = model.forward_features(x)
    assert torch.allclose(outs['sdpa'], outs['math'], atol=1e-5)


@pytest.mark.skipif(not flex_available(), reason='this torch build has no FlexAttention')
def test_flex_model_forward_eval():
    model = _randomize(create_tiny('vit_irpe_tiny', dynamic_img_size=True, depth=1), std=0.5).eval()
    assert_backends_agree(model, torch.randn(1, 3, 32, 48), backends=('flex',), features=True)


@pytest.mark.parametrize('kw', [dict(rpe_on='qkv', method='cross'), dict(mode='bias', rpe_on='qk')])
def test_gradients_reach_every_table(kw):
    model = create_tiny('vit_irpe_tiny', img_size=64, **kw).train()
    model(torch.randn(2, 3, 64, 64)).square().sum().backward()
    tables = {n: p.grad for n, p in model.named_parameters() if n.startswith('pe.')}
    assert tables and all(g is not None and g.abs().sum() > 0 for g in tables.values()), \
        [n for n, g in tables.items() if g is None or not g.abs().sum() > 0]


def _upstream_state_dict(model):
    """Our state dict in the reference's key names (blocks.i.attn.rpe_k...)."""
    return {k.replace('pe.layers.', 'blocks.', 1).replace('.rpe_', '.attn.rpe_', 1) if k.startswith('pe.') else k: v
            for k, v in model.state_dict().items()}


def test_converter_and_config_reader(tmp_path):
    from safetensors.torch import save_file
    src = _randomize(create_tiny('vit_irpe_qkv_tiny', init_values=0, num_classes=10, img_size=64)).eval()
    path = tmp_path / 'deit_irpe_qkv.safetensors'
    save_file({k: v.contiguous() for k, v in _upstream_state_dict(src).items()}, str(path))
    # the preset says rpe_on='k' with LayerScale; the reader takes rpe_on and "no LayerScale" from the keys
    model = create_tiny('vit_irpe_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                        num_classes=10, img_size=64).eval()
    assert model.pe.rpe_on == 'qkv' and model.pe.shared_head
    assert isinstance(model.blocks[0].ls1, torch.nn.Identity)  # DeiT: no LayerScale
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    with pytest.raises(CheckpointMismatchError, match="rpe_on: checkpoint 'qkv' vs model 'k'"):
        create_tiny('vit_irpe_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), rpe_on='k',
                    num_classes=10, img_size=64)
    with pytest.raises(CheckpointMismatchError, match='no iRPE encoding'):
        create_tiny('vit_ape_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=10,
                    init_values=0, no_embed_class=False, img_size=64)
    with pytest.raises(CheckpointMismatchError, match='another number of buckets'):
        create_tiny('vit_irpe_qkv_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                    ratio=2.9, num_classes=10, img_size=64)


@pytest.mark.parametrize('kw,match', [
    (dict(mode='ctxx'), "mode must be 'ctx'"),
    (dict(method='manhattan'), 'unknown iRPE method'),
    (dict(rpe_on='kx'), 'rpe_on must name'),
    (dict(rpe_on=''), 'rpe_on must name'),
    (dict(mode='bias', rpe_on='kv'), 'bias mode has no value term'),
    (dict(coord_mode='polar'), 'iRPE buckets patch offsets'),
    (dict(ratio=0.2), 'ratio must be >= 0.5'),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        create_tiny('vit_irpe_tiny', **kw)


@pytest.mark.parametrize('method', ['product', 'cross'])
def test_inference_q_term_equals_the_autograd_path(method):
    """Without autograd the q-side term is gathered straight into the logits' layout; it must equal
    the reference module's output transposed (the path taken with autograd), whole and by row blocks."""
    model = _randomize(create_tiny('vit_irpe_tiny', rpe_on='qk', method=method)).eval()
    pe, grid = model.pe, Grid(5, 7, model.num_prefix_tokens)
    q, k = torch.randn(2, 2, 4, grid.num_tokens, 16).unbind(0)
    state = pe.prepare(grid)
    for rows in (slice(None), slice(3, 11)):
        ref = pe.bias_rows(q, k, 0.25, 1, state, rows)
        with torch.no_grad():
            got = pe.bias_rows(q, k, 0.25, 1, state, rows)
        assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-6


@pytest.mark.parametrize('kw,hw,prefix', [(dict(rpe_on='qk'), (5, 7), 1),
                                          (dict(rpe_on='k', shared_head=False), (6, 4), 1),
                                          (dict(rpe_on='qkv', coord_mode='ref'), (9, 9), 0),
                                          (dict(rpe_on='q', prefix_bucket=False), (4, 11), 2)])
def test_product_bias_by_rows_and_columns_equals_the_gather(kw, hw, prefix):
    """The product method's bias built through its row x column structure (``_product_bias``) equals the
    per-pair gathers of the reference terms (``term_qk``), with and without autograd, gradients included."""
    model = _randomize(create_tiny('vit_irpe_tiny', **kw))
    pe, grid = model.pe, Grid(*hw, prefix)
    state = pe.prepare(grid)
    assert pe._separable(state) is not None
    q, k = (t.requires_grad_() for t in torch.randn(2, 2, 4, grid.num_tokens, 16).unbind(0))
    lay = pe.layers[1]
    ref = 0.
    if lay.rpe_k is not None:
        ref = ref + pe.term_qk('k', q * 0.25, 1, state)
    if lay.rpe_q is not None:
        ref = ref + pe.term_qk('q', k * 0.25, 1, state).transpose(-1, -2)
    got = pe.bias(q, k, 0.25, 1, state)
    assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-6
    w = torch.randn_like(ref)
    params = [q, k] + [p for p in lay.parameters()]
    g_ref = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    g_got = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
    for a, b in zip(g_ref, g_got):
        assert (a is None) == (b is None) and (a is None or (a - b).abs().max().item() < 1e-5)
    with torch.no_grad():
        assert (pe.bias(q, k, 0.25, 1, state) - ref).abs().max().item() < 1e-6


def _pair_bias(pe, q, k, layer, state):
    """The reference's per-pair terms: k-side plus q-side transposed."""
    lay, ref = pe.layers[layer], 0.
    if lay.rpe_k is not None:
        ref = ref + pe.term_qk('k', q * 0.25, layer, state)
    if lay.rpe_q is not None:
        ref = ref + pe.term_qk('q', k * 0.25, layer, state).transpose(-1, -2)
    return ref


@pytest.mark.parametrize('kw,hw,prefix', [(dict(rpe_on='qkv'), (5, 7), 1),
                                          (dict(rpe_on='k', shared_head=False), (6, 4), 2),
                                          (dict(rpe_on='q', prefix_bucket=False), (4, 5), 0)])
def test_row_blocks_through_the_product_factors_equal_the_gather(kw, hw, prefix):
    """Without autograd, blocks of query rows (prefix rows, a block across the prefix, the last short
    block) go through the row x column factors built once per layer; each block equals the rows of the
    per-pair gathers, and a new layer or new q/k rebuilds the factors."""
    model = _randomize(create_tiny('vit_irpe_tiny', **kw))
    pe, grid = model.pe, Grid(*hw, prefix)
    T = grid.num_tokens
    q, k = torch.randn(2, 2, 4, T, 16).unbind(0)
    state = pe.prepare(grid)
    for layer in (1, 0):
        ref = _pair_bias(pe, q, k, layer, state)
        with torch.no_grad():
            for r0 in range(0, T, 3):
                got = pe.bias_rows(q, k, 0.25, layer, state, slice(r0, r0 + 3))
                assert state['_product_terms'][0] == layer  # the factors path was taken
                assert (got - ref[:, :, r0:r0 + 3]).abs().max().item() < 1e-6
    with torch.no_grad():
        q2 = q.flip(-2)
        got = pe.bias_rows(q2, k, 0.25, 0, state, slice(0, 4))
        assert (got - _pair_bias(pe, q2, k, 0, state)[:, :, :4]).abs().max().item() < 1e-6


def test_row_blocks_never_build_the_product_factors(monkeypatch):
    """Large grids without autograd go by query-row blocks (reference gathers per block); the factors of
    the whole-bias path (O(N^2) to check) must not be built there: at 1024 px they cost ~450 MiB."""
    import visionpe.pos.irpe as irpe
    from visionpe.attention import bias_budget
    model = _randomize(create_tiny('vit_irpe_qkv_tiny', dynamic_img_size=True)).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)  # whole bias: the factorized path
    monkeypatch.setattr(irpe, '_separable_index', lambda *a: pytest.fail('product factors built for row blocks'))
    model.pe._cache.clear()
    with torch.no_grad(), bias_budget(0.01):
        assert torch.allclose(model(x), ref, atol=1e-5)
