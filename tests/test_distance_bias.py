"""2-D ALiBi and FIRE-2D (distance biases gathered from a table of distinct offsets): the formulas against brute
force and a hand computation, FIRE's properties, and the three ways of applying the bias (whole, by query rows,
FlexAttention score_mod) against each other."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

from visionpe.attention import flex_available, use_backend
from visionpe.grid import Grid, grid_coords
from visionpe.pos import EncodingContext, build_encoding
from visionpe.pos.alibi2d import alibi_slopes

TOL = 1e-5
NAMES = ('alibi2d', 'fire2d')


def _enc(name, heads=4, depth=2, grid=(6, 6), **kw):
    enc = build_encoding(name, EncodingContext(dim=16 * heads, depth=depth, num_heads=heads, grid_size=grid), **kw)
    if name == 'fire2d':  # random MLPs so that every head and layer differs
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in enc.mlps.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return enc


def _brute_distance(grid: Grid, mode='index'):
    xy = grid_coords(grid.h, grid.w, mode, ref_hw=(6, 6))
    return (xy[:, None] - xy[None, :]).square().sum(-1).sqrt()


def test_alibi_slopes_are_alibis():
    assert alibi_slopes(4) == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]
    assert alibi_slopes(8) == [2 ** -(i + 1) for i in range(8)]
    # 6 heads: the 4-head slopes, then every other slope of 8 heads (Press et al.'s rule)
    assert alibi_slopes(6) == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    with pytest.raises(ValueError, match='at least one head'):
        alibi_slopes(0)


@pytest.mark.parametrize('mode', ['index', 'normalized', 'centered', 'ref', 'normalized_ref'])
def test_alibi_bias_is_minus_slope_times_euclidean_distance(mode):
    enc = _enc('alibi2d', coord_mode=mode, slope_scale=1.5)
    grid = Grid(3, 5, 1)
    bias = enc.layer_bias(enc.prepare(grid), 1)
    d = _brute_distance(grid, mode)
    m = torch.tensor(alibi_slopes(4)) * 1.5
    assert torch.allclose(bias[:, 1:, 1:], -m[:, None, None] * d, atol=1e-6)
    assert not bias[:, 0].any() and not bias[:, :, 0].any()  # the class token is unbiased


def test_polar_mode_rejected():
    for name in NAMES:
        with pytest.raises(ValueError, match='polar'):
            _enc(name, coord_mode='polar')


def _fire_bias(enc, grid, layer):
    return enc.layer_bias(enc.prepare(grid), layer)


def test_fire_translation_invariant():
    """The bias of two patches depends only on their offset: shifting both leaves it unchanged."""
    enc = _enc('fire2d')
    grid = Grid(5, 7, 0)
    bias = _fire_bias(enc, grid, 1).reshape(4, 5, 7, 5, 7)  # (heads, r_i, c_i, r_j, c_j)
    for dr, dc in ((1, 0), (0, 2), (2, 3)):
        a = bias[:, :5 - dr, :7 - dc, :5 - dr, :7 - dc]
        b = bias[:, dr:, dc:, dr:, dc:]
        assert torch.equal(a, b), (dr, dc)
    assert bias.std() > 0  # not a constant


@pytest.mark.parametrize('hw', [(1, 1), (1, 9), (3, 3), (14, 14), (7, 40), (64, 64)])
@pytest.mark.parametrize('mode', ['index', 'normalized', 'ref'])
def test_fire_inputs_bounded_at_any_grid(hw, mode):
    enc = _enc('fire2d', coord_mode=mode)
    for layer in range(2):
        u = enc.inputs(Grid(*hw), layer).detach()
        assert u.shape == (hw[0] * hw[1],)
        assert float(u.min()) >= 0 and float(u.max()) <= 1 + 1e-6
        if min(hw) >= 6:  # at least the training grid (6 x 6): its extent exceeds L and maps to exactly 1
            assert abs(float(u.max()) - 1) < 1e-6


def test_fire_equals_hand_computed_bias_on_3x3():
    """FIRE-2D on a 3x3 grid with hand-set parameters, against the formula evaluated with the math module."""
    enc = build_encoding('fire2d', EncodingContext(dim=32, depth=1, num_heads=2, grid_size=(3, 3)),
                         mlp_hidden=2, c_init=0.5, threshold_init=2.0)
    w1, b1 = [[1.0], [-2.0]], [0.0, 1.0]
    w2, b2 = [[1.0, 0.5], [-1.0, 2.0]], [0.25, -0.5]
    with torch.no_grad():
        mlp = enc.mlps[0]
        mlp.fc1.weight.copy_(torch.tensor(w1)), mlp.fc1.bias.copy_(torch.tensor(b1))
        mlp.fc2.weight.copy_(torch.tensor(w2)), mlp.fc2.bias.copy_(torch.tensor(b2))
    bias = _fire_bias(enc, Grid(3, 3, 1), 0)  # with a class token, at the centre (1, 1)

    def f(d, h):
        D = math.sqrt(8)  # corner to corner, larger than L = 2
        u = math.log(0.5 * d + 1) / math.log(0.5 * max(2.0, D) + 1)
        hidden = [max(0.0, w1[k][0] * u + b1[k]) for k in range(2)]
        return sum(w2[h][k] * hidden[k] for k in range(2)) + b2[h]

    for h in range(2):
        assert abs(float(bias[h, 0, 0]) - f(0, h)) < 1e-6
        for i in range(9):
            to_centre = f(math.hypot(i // 3 - 1, i % 3 - 1), h)
            assert abs(float(bias[h, 0, 1 + i]) - to_centre) < 1e-6 and abs(float(bias[h, 1 + i, 0]) - to_centre) < 1e-6
            for j in range(9):
                want = f(math.hypot(i // 3 - j // 3, i % 3 - j % 3), h)
                assert abs(float(bias[h, 1 + i, 1 + j]) - want) < 1e-6, (h, i, j)
    enc.prefix_position = 'none'  # prefix pairs unbiased, patch pairs the same
    none = _fire_bias(enc, Grid(3, 3, 1), 0)
    assert not none[:, 0].any() and not none[:, :, 0].any() and torch.equal(none[:, 1:, 1:], bias[:, 1:, 1:])


def test_fire_mlp_runs_on_distinct_offsets_not_pairs():
    enc = _enc('fire2d')
    seen = []
    enc.mlps[0].fc1.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    enc.prepare(Grid(16, 24, 1))
    assert seen == [(2 * 16 * 24 + 1, 1)]  # h * w offsets and 1 + h * w prefix pairs, not (h * w)^2 pairs


@pytest.mark.parametrize('name', NAMES)
def test_rows_concatenate_to_whole_bias(name):
    enc = _enc(name)
    grid = Grid(5, 7, 1)
    state = enc.prepare(grid)
    T = grid.num_tokens
    q = k = torch.zeros(1, 4, T, 16)
    assert enc.row_bias(0) == 'shared'
    for layer in range(2):
        whole = enc.bias(q, k, 0.25, layer, state)
        parts = torch.cat([enc.bias_rows(q, k, 0.25, layer, state, slice(r, r + 4)) for r in range(0, T, 4)], -2)
        assert torch.equal(parts, whole), layer


def _model(name, **kw):
    return timm.create_model(f'vit_{name}_tiny', embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=64,
                             dynamic_img_size=True, **kw).eval()


@pytest.mark.parametrize('name', NAMES)
def test_row_blocks_and_sdpa_equal_math(name, monkeypatch):
    import visionpe.attention as attention
    model = _model(name)
    used = []
    real = attention.attend_by_row_blocks
    monkeypatch.setattr(attention, 'attend_by_row_blocks', lambda *a: used.append(a[-1]) or real(*a))
    for size in ((32, 32), (48, 32), (64, 64)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = _run(model, x, 'math')
            whole = _run(model, x, 'sdpa')
            monkeypatch.setenv(attention.MAX_BIAS_ENV_VAR, '0.0005')
            blocks = _run(model, x, 'sdpa')
            monkeypatch.delenv(attention.MAX_BIAS_ENV_VAR)
        assert used, size
        used.clear()
        assert (ref - whole).abs().max() < TOL and (ref - blocks).abs().max() < TOL, size


def _run(model, x, backend):
    with use_backend(backend):
        return model(x)


@pytest.mark.skipif(not flex_available(), reason='this torch build has no FlexAttention')
@pytest.mark.parametrize('name', NAMES)
def test_flex_score_mod_equals_math(name, monkeypatch):
    model = _model(name)
    calls = []
    real = type(model.pe).score_mod
    monkeypatch.setattr(type(model.pe), 'score_mod', lambda self, *a: calls.append(1) or real(self, *a))
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        ref, out = _run(model, x, 'math'), _run(model, x, 'flex')
    assert len(calls) == 2  # one per block: the bias came from the kernel's score_mod
    assert (ref - out).abs().max() < TOL


def test_alibi_slope_scale_is_a_live_knob():
    model = _model('alibi2d', init_values=0.)  # no LayerScale: the attention branch shows in the features
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = model.forward_features(x)
        model.pe.slope_scale = 0.
        b = model.forward_features(x)
        nope = timm.create_model('vit_nope_tiny', embed_dim=64, depth=2, num_heads=4, patch_size=8, img_size=64,
                                 init_values=0., dynamic_img_size=True).eval()
        nope.load_state_dict(model.state_dict(), strict=False)
        c = nope.forward_features(x)
    assert (a - b).abs().max() > 1e-4
    assert (b - c).abs().max() < TOL  # slope 0: no bias at all


@pytest.mark.parametrize('name', NAMES)
def test_row_blocks_cut_peak_memory(name, monkeypatch):
    """At 1025 tokens a whole (heads, T, T) float bias is 16 MiB; built by rows the peak stays far below."""
    import visionpe.attention as attention
    from visionpe.benchmark import peak_memory
    model = timm.create_model(f'vit_{name}_tiny', img_size=128, patch_size=4, embed_dim=64, depth=1,
                              num_heads=4).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        model(x)  # cache the (small) offset tables outside the measurement
    dense = 4 * 1025 * 1025 * 4
    monkeypatch.setenv(attention.MAX_BIAS_ENV_VAR, '2')
    with torch.no_grad(), peak_memory() as blocks:
        model(x)
    assert blocks.bytes < dense / 2, blocks.mib


# ----------------------------------------------------------------------------------- coordinate augmentation
def _hand_coords(h: int, w: int, mode: str, ref_hw=(6, 6)) -> torch.Tensor:
    """Patch coordinates (x, y) written out per mode (not through visionpe.grid), row-major."""
    y, x = (t.reshape(-1).double() for t in torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij'))
    if mode == 'normalized':
        x, y = (x + 0.5) / w, (y + 0.5) / h
    elif mode == 'ref':
        x, y = x * ref_hw[1] / w, y * ref_hw[0] / h
    return torch.stack([x, y], -1)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('mode', ['index', 'normalized', 'ref'])
@pytest.mark.parametrize('hw', [(3, 5), (6, 6), (8, 4)])
def test_bias_under_a_draw_is_that_of_the_augmented_coordinates(name, mode, hw):
    """A coordinate draw (DINOv3's shift / per-axis jitter / global rescale, the CoordDraw the models put on the
    grid) gives the bias of the explicitly augmented coordinate grid: pairwise Euclidean distances of
    ``(xy + s) * j * r`` (and, for FIRE, its extent and distances from its centre); also by query rows."""
    from visionpe.grid import CoordAug
    from visionpe.pos.alibi2d import alibi_slopes
    enc = _enc(name, coord_mode=mode)
    torch.manual_seed(3)
    draw = CoordAug(shift=0.7, jitter=1.6, rescale=2.0).draw(4)
    grid = Grid(*hw, 1, aug=draw)
    bias = enc.layer_bias(enc.prepare(grid), 1).double()
    xy = (_hand_coords(*hw, mode) + draw.shift.double()) * draw.jitter.double() * draw.rescale.double()
    d = torch.cdist(xy, xy)
    if name == 'alibi2d':
        m = torch.tensor(alibi_slopes(4), dtype=torch.float64)
        want_patch = -m[:, None, None] * d
        assert not bias[:, 0].any() and not bias[:, :, 0].any()
    else:
        c, L = enc.c[1].double().abs(), enc.threshold[1].double().abs()
        norm = torch.log1p(c * torch.maximum(L, d.max()))
        mlp = copy.deepcopy(enc.mlps[1]).double()

        def f(dist):
            return mlp((torch.log1p(c * dist) / norm)[..., None]).movedim(-1, 0)
        want_patch = f(d)
        to_centre = f((xy - xy.mean(0)).norm(dim=-1))  # (heads, N)
        assert torch.allclose(bias[:, 0, 1:], to_centre, atol=1e-5) and torch.allclose(bias[:, 1:, 0], to_centre,
                                                                                        atol=1e-5)
        assert torch.allclose(bias[:, 0, 0], f(torch.zeros((), dtype=torch.float64)), atol=1e-5)
    assert torch.allclose(bias[:, 1:, 1:], want_patch, atol=1e-5)
    plain = enc.layer_bias(enc.prepare(Grid(*hw, 1)), 1)
    assert (plain.double() - bias).abs().max() > 1e-2  # the draw did change the bias
    rows = enc.layer_bias(enc.prepare(grid), 1, slice(2, 7))
    assert torch.allclose(rows.double(), bias[:, 2:7], atol=1e-6)


def test_distance_bias_refuses_a_per_sample_draw():
    from visionpe.grid import CoordAug
    for name in NAMES:
        enc = _enc(name)
        with pytest.raises(ValueError, match='per_sample=False'):
            enc.prepare(Grid(6, 6, 1, aug=CoordAug(jitter=1.5, per_sample=True).draw(3)))
