"""Coordinate augmentation (DINOv3 shift / jitter / rescale, CAPE for learned tables) and FlexiViT
patch-size randomisation: distributions, parity with timm's RotaryEmbeddingDinoV3, eval invariance, errors,
and a few training steps for every encoding each option applies to."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3, _apply_coord_augs, _build_grid

import visionpe  # noqa: F401
from visionpe.grid import CoordAug, CoordDraw, Grid, grid_coords
from visionpe.pos.absolute import sample_table_cape

TINY = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3, dynamic_img_size=True,
            init_values=None)
# presets whose encoding reads token coordinates; per-sample draws where the encoding takes them
COORD_PRESETS = {'ape': 'sample', 'sincos': 'sample', 'lape': 'sample', 'rope2d': 'sample',
                 'rope2d_mixed': 'sample', 'comrope_ap': 'batch', 'comrope_ld': 'batch', 'lookhere': 'batch',
                 'pope2d': 'batch', 'pape': 'sample', 'pape_ri': 'sample', 'spiral': 'sample', 'alibi2d': 'batch',
                 'fire2d': 'batch'}
AUG = dict(shift=0.5, jitter=1.5, rescale=2.0)


def tiny(preset: str, **kw) -> torch.nn.Module:
    """A one-block ViT whose attention is far from uniform (timm's init gives near-zero logits and a small
    attention branch, which would hide any change of positions)."""
    torch.manual_seed(0)
    if preset == 'pope2d':
        kw = {'delta_init': 'uniform', **kw}  # delta starts inside (-2 pi, 0), where its gradient is not clamped
    if preset == 'alibi2d':
        kw = {'slope_scale': 16.0, **kw}  # ALiBi's slopes for 2 heads (1/16, 1/256) would barely move the logits
    model = timm.create_model(f'vit_{preset}_tiny', **{**TINY, **kw})
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.normal_(0, 0.5)
            blk.attn.proj.weight.normal_(0, 0.5)
    return model


# ----------------------------------------------------------------------------------- the coordinate source
@pytest.mark.parametrize('shape', [(4, 4), (3, 5), (6, 2)])
@pytest.mark.parametrize('settings', [dict(shift=0.3), dict(jitter=1.7), dict(rescale=2.0), AUG])
def test_draw_equals_timm_dinov3(shape, settings):
    """Same seed: our centred coordinates with the draw == timm's DINOv3 grid with its augmentation, and the
    sin/cos RotaryEmbeddingDinoV3 builds in training == the one built from our coordinates."""
    h, w = shape
    for seed in range(3):
        torch.manual_seed(seed)
        ref = _apply_coord_augs(_build_grid([h, w], grid_type='centered').flatten(0, 1),
                                settings.get('shift'), settings.get('jitter'), settings.get('rescale'))
        torch.manual_seed(seed)
        ours = grid_coords(h, w, 'centered', aug=CoordAug(**settings).draw())
        assert (ours.flip(-1) - ref).abs().max().item() < 1e-6  # timm's grids are (row, col)

        dim = 16
        rope = RotaryEmbeddingDinoV3(dim, temperature=100., shift_coords=settings.get('shift'),
                                     jitter_coords=settings.get('jitter'), rescale_coords=settings.get('rescale'),
                                     rotate_half=False).train()
        torch.manual_seed(seed)
        emb = rope.get_embed([h, w])
        torch.manual_seed(seed)
        rc = grid_coords(h, w, 'centered', aug=CoordAug(**settings).draw()).flip(-1)
        angles = (2 * math.pi * rc[:, :, None] / rope.periods).flatten(1).repeat_interleave(2, -1)
        assert (torch.cat([angles.sin(), angles.cos()], -1) - emb).abs().max().item() < 1e-5


def test_draw_moments():
    """Shift ~ U(-s, s), log jitter ~ U(-log J, log J) per axis, log rescale ~ U(-log R, log R), independent
    axes: means and variances over 20,000 draws within 5 standard errors, and the ranges respected."""
    n, s, J, R = 20000, 0.7, 1.5, 2.0
    torch.manual_seed(0)
    d = CoordAug(shift=s, jitter=J, rescale=R, per_sample=True).draw(n)
    assert d.shift.shape == (n, 2) and d.jitter.shape == (n, 2) and d.rescale.shape == (n, 1)
    for x, half in ((d.shift, s), (d.jitter.log(), math.log(J)), (d.rescale.log(), math.log(R))):
        assert x.abs().max() <= half + 1e-6
        var = half ** 2 / 3
        se_mean, se_var = math.sqrt(var / n), math.sqrt((half ** 4 / 5 - var ** 2) / n)
        assert (x.mean(0).abs() < 5 * se_mean).all(), (x.mean(0), se_mean)
        assert ((x.var(0) - var).abs() < 5 * se_var).all(), (x.var(0), var)
    # the two axes are drawn independently
    assert abs(torch.corrcoef(d.shift.T)[0, 1].item()) < 5 / math.sqrt(n)
    assert abs(torch.corrcoef(d.jitter.log().T)[0, 1].item()) < 5 / math.sqrt(n)
    # per batch: one transform for every token
    torch.manual_seed(0)
    one = CoordAug(**AUG).draw(8)
    assert one.shift.shape == (2,) and not one.per_sample
    xy = grid_coords(3, 4, 'index', aug=one)
    base = grid_coords(3, 4, 'index')
    assert torch.allclose(xy, (base + one.shift) * one.jitter * one.rescale)


def test_coord_aug_settings_errors():
    for bad in (dict(shift=-1.), dict(jitter=0.5), dict(rescale=0.9), dict(rescale=float('inf')),
                dict(jitter=True)):
        with pytest.raises(ValueError, match='coordinate augmentation'):
            CoordAug(**bad)
    with pytest.raises(TypeError, match='unknown key'):
        CoordAug.from_option(dict(scale=2.0))
    with pytest.raises(ValueError, match='polar'):
        grid_coords(4, 4, 'polar', aug=CoordAug(shift=1.).draw())


def test_cape_sampling():
    """Without a draw at the table's own grid every token reads its entry; a shift of one patch (2 / w in
    centred units) along x reads the right neighbour (border-clamped at the edge); prefix rows untouched."""
    torch.manual_seed(0)
    h0, w0, P, D = 4, 5, 1, 6
    table = torch.randn(1, P + h0 * w0, D)
    same = sample_table_cape(table, (h0, w0), P, Grid(h0, w0, P, aug=CoordDraw()))
    assert (same - table).abs().max().item() < 1e-6
    shifted = sample_table_cape(table, (h0, w0), P, Grid(h0, w0, P, aug=CoordDraw(shift=torch.tensor([2 / w0, 0.]))))
    t = table[0, P:].view(h0, w0, D)
    want = torch.cat([t[:, 1:], t[:, -1:]], dim=1).reshape(1, h0 * w0, D)
    assert (shifted[:, P:] - want).abs().max().item() < 1e-5
    assert torch.equal(shifted[:, :P], table[:, :P])


# ----------------------------------------------------------------------------------- the model option
@pytest.mark.parametrize('preset', sorted(COORD_PRESETS))
def test_eval_is_deterministic_and_unchanged(preset):
    plain, aug = tiny(preset), tiny(preset, coord_aug={**AUG, 'per_sample': COORD_PRESETS[preset] == 'sample'})
    _check_eval_unchanged_and_train_draws(plain, aug, torch.randn(2, 3, 16, 20))


def _check_eval_unchanged_and_train_draws(plain: torch.nn.Module, aug: torch.nn.Module, x: torch.Tensor) -> None:
    """``aug`` (``plain``'s weights plus coord_aug): eval logits and features equal ``plain``'s on every call; in
    training a draw is a function of the torch seed and moves the features well above float32 noise (~1e-7)."""
    aug.load_state_dict(plain.state_dict())
    plain.eval(), aug.eval()
    with torch.no_grad():
        ref = plain(x)
        assert torch.equal(aug(x), ref) and torch.equal(aug(x), ref)
        ref = plain.forward_features(x)
        assert torch.equal(aug.forward_features(x), ref)
        aug.train()
        torch.manual_seed(1)
        a = aug.forward_features(x)
        torch.manual_seed(1)
        b = aug.forward_features(x)
        c = aug.forward_features(x)
    assert torch.equal(a, b)
    for other in (c, ref):
        assert (a - other).abs().max() > 1e-5 * a.abs().max()


def test_every_consumer_sees_the_same_draw(monkeypatch):
    """The draw is made once per forward by the model and reaches the encoding through the grid."""
    model = tiny('rope2d', coord_aug=AUG).train()
    seen = []
    prepare = model.pe.prepare
    monkeypatch.setattr(model.pe, 'prepare', lambda grid: seen.append(grid) or prepare(grid))
    model(torch.randn(2, 3, 16, 16))
    model.eval()
    model(torch.randn(2, 3, 16, 16))
    assert isinstance(seen[0].aug, CoordDraw) and seen[1].aug is None
    sin, cos = model.pe.prepare(seen[0])
    P = seen[0].num_prefix
    xy = grid_coords(4, 4, 'index', aug=seen[0].aug)
    assert not torch.allclose(xy, grid_coords(4, 4, 'index'))
    # the first x frequency of axial RoPE is 1: its rotation angle is the augmented x coordinate
    assert torch.allclose(sin[P:, 0], xy[:, 0].sin(), atol=1e-6) and torch.allclose(cos[P:, 0], xy[:, 0].cos(), atol=1e-6)


@pytest.mark.parametrize('preset', sorted(p for p, s in COORD_PRESETS.items() if s == 'sample'))
def test_a_per_sample_draw_equals_each_image_with_its_own_draw(preset):
    """A per-sample draw over a batch gives, image by image, what that image gives alone under a per-batch draw
    holding its values (the batch dimension of the encoding's state is the image's)."""
    model = tiny(preset, coord_aug={**AUG, 'per_sample': True}).eval()
    torch.manual_seed(2)
    draw = CoordAug(**AUG, per_sample=True).draw(3)
    x = torch.randn(3, 3, 16, 20)
    with torch.no_grad():
        model._coord_draw = lambda b: draw
        batched = model.forward_features(x)
        for i in range(3):
            one = CoordDraw(draw.shift[i], draw.jitter[i], draw.rescale[i])
            model._coord_draw = lambda b: one
            assert (model.forward_features(x[i:i + 1])[0] - batched[i]).abs().max().item() < 1e-5, i
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # (the images differ anyway: a sanity bound only)


@pytest.mark.parametrize('normalize', [False, True])
@pytest.mark.parametrize('mode', ['index', 'normalized'])
def test_pape_positions_under_a_draw(mode, normalize):
    """PaPE's positions under a draw: the mode's patch coordinates moved by it, then patch_offset and normalize
    (x / rows, y / columns) as without it; prefix tokens stay at (0, 0). A shift of (t, t) in index units equals
    patch_offset + t."""
    from visionpe.pos.pape import pape_positions
    h, w, P = 3, 5, 2
    torch.manual_seed(0)
    draw = CoordAug(**AUG).draw()
    pos = pape_positions(Grid(h, w, P, aug=draw), mode, patch_offset=1.0, normalize=normalize)
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing='ij')
    xy = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
    if mode == 'normalized':
        xy = (xy + 0.5) / torch.tensor([w, h])
    want = (xy + draw.shift) * draw.jitter * draw.rescale + 1.0
    if normalize:
        want = want / torch.tensor([h, w]).float()
    assert not pos[:P].any() and torch.allclose(pos[P:], want, atol=1e-6)
    shifted = pape_positions(Grid(h, w, P, aug=CoordDraw(shift=torch.tensor([0.25, 0.25]))), patch_offset=1.0)
    assert torch.allclose(shifted, pape_positions(Grid(h, w, P), patch_offset=1.25))


@pytest.mark.parametrize('preset,kw,match', [
    ('cpvt', dict(coord_aug=AUG), 'does not apply'),
    ('irpe', dict(coord_aug=AUG), 'does not apply'),
    ('nope', dict(coord_aug=AUG), 'needs a consumer'),
    ('rope2d_polar', dict(coord_aug=AUG), 'polar'),
    ('comrope_ap', dict(coord_aug={**AUG, 'per_sample': True}), 'per_sample'),
    ('alibi2d', dict(coord_aug={**AUG, 'per_sample': True}), 'per_sample'),
    ('fire2d', dict(coord_aug={**AUG, 'per_sample': True}), 'per_sample'),
    ('ape', dict(flexi_patch_sizes=[4, 6]), 'do not divide'),
    ('ape', dict(flexi_patch_sizes=4), 'list of positive integers'),
])
def test_option_errors(preset, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(preset, **kw)


# ----------------------------------------------------------------------------------- FlexiViT
def test_flexi_patch_size():
    """Training draws the patch size per batch from the set (seeded); set_patch_size(p) in eval equals a model
    whose kernel was resampled once with timm's resample_patch_embed; the state dict keeps the stored kernel."""
    from timm.layers import resample_patch_embed
    model = tiny('rope2d', flexi_patch_sizes=[2, 4, 8]).train()
    grids = []
    model.pe.prepare = (lambda f: (lambda grid: grids.append(grid.hw) or f(grid)))(model.pe.prepare)
    torch.manual_seed(0)
    for _ in range(12):
        model(torch.randn(1, 3, 16, 16))
    assert set(grids) == {(8, 8), (4, 4), (2, 2)}
    model.eval()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    model.set_patch_size(8)
    assert model.patch_size == (8, 8)
    with torch.no_grad():
        out = model(x)
    ref = tiny('rope2d').eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items()})
    with torch.no_grad():
        ref.patch_embed.set_input_size(patch_size=8)
        assert torch.allclose(ref.patch_embed.proj.weight,
                              resample_patch_embed(model.patch_embed.proj.weight, [8, 8]))
        assert (ref(x) - out).abs().max().item() < 1e-5
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    model.set_patch_size(None)
    assert model.patch_size == (4, 4)
    with pytest.raises(ValueError, match='positive integer'):
        model.set_patch_size(0)


# ----------------------------------------------------------------------------------- a few training steps
def _steps(model: torch.nn.Module, n: int = 2, size=(16, 16)) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    reached = set()
    model.train()
    for i in range(n):
        torch.manual_seed(i)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, *size)), torch.tensor([0, 1]))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        reached |= {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
        opt.step()
    assert reached == set(before), set(before) - reached  # gradients reach every parameter (AdamW's weight
    moved = {k for k, p in model.named_parameters() if not torch.equal(before[k], p)}  # decay alone moves them)
    assert moved == set(before), set(before) - moved


CASES = [(p, 'coord_aug', dict(coord_aug=AUG)) for p in sorted(COORD_PRESETS)]
CASES += [(p, 'coord_aug_per_sample', dict(coord_aug={**AUG, 'per_sample': True}))
          for p, s in sorted(COORD_PRESETS.items()) if s == 'sample']
CASES += [(p, 'flexi', dict(flexi_patch_sizes=[2, 4, 8])) for p in sorted(COORD_PRESETS) + ['cpvt', 'irpe', 'nope']]


@pytest.mark.parametrize('preset,option,kw', CASES, ids=[f'{p}-{o}' for p, o, _ in CASES])
def test_few_training_steps(preset, option, kw):
    # average pooling: with one block and class-token pooling, only the class token's row of the last attention
    # reaches the loss, and encodings that leave prefix tokens unpositioned (PoPE, a PEG after the block) get none
    _steps(tiny(preset, global_pool='avg', **kw), size=(16, 16) if option == 'flexi' else (16, 20))


# ----------------------------------------------------------------------------------- Swin: window-local coordinates
SWIN_TINY = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                 num_classes=3, dynamic_img_size=True)


def tiny_swin(preset: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(preset, **{**SWIN_TINY, **kw})
    with torch.no_grad():
        for stage in model.layers:
            for blk in stage.blocks:
                blk.attn.qkv.weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize('preset', ['swin_rope2d_tiny', 'swin_rope2d_mixed_tiny'])
def test_swin_eval_is_unchanged_and_training_moves_window_coordinates(preset):
    _check_eval_unchanged_and_train_draws(tiny_swin(preset), tiny_swin(preset, coord_aug=AUG), torch.randn(2, 3, 32, 40))


def test_swin_rope_mixed_draw_equals_scaled_frequencies(monkeypatch):
    """On window-local coordinates a draw ((x, y) + s) * j * r rotates q and k by (x j_x r) F_x + (y j_y r) F_y
    plus a constant that cancels in q . k: the model equals one without the option whose RoPE-Mixed
    frequencies are scaled by (j_x r, j_y r), in every window and stage."""
    draw = CoordDraw(torch.tensor([0.3, -0.7]), torch.tensor([1.3, 0.8]), torch.tensor([1.7]))
    aug = tiny_swin('swin_rope2d_mixed_tiny', coord_aug=AUG)
    monkeypatch.setattr(CoordAug, 'draw', lambda self, batch_size=1: draw)  # a frozen dataclass: patch the class
    ref = tiny_swin('swin_rope2d_mixed_tiny')
    ref.load_state_dict(aug.state_dict())
    with torch.no_grad():
        for stage in ref.layers:
            stage.pe.freqs[0] *= 1.3 * 1.7
            stage.pe.freqs[1] *= 0.8 * 1.7
    x = torch.randn(2, 3, 32, 40)
    aug.train(), ref.train()  # no dropout or drop path in these models: train mode is deterministic
    with torch.no_grad():
        out, expected = aug(x), ref(x)
    assert (out - expected).abs().max() < 1e-5
    aug.eval()
    assert (aug(x) - expected).abs().max() > 1e-4  # eval: coordinates unmoved, so the scaled model differs


@pytest.mark.parametrize('preset', ['swin_rope2d_tiny', 'swin_rope2d_mixed_tiny'])
def test_swin_few_training_steps_with_coord_aug(preset):
    _steps(tiny_swin(preset, coord_aug=AUG), size=(32, 40))


@pytest.mark.parametrize('preset,kw,match', [
    ('swin_tiny', dict(coord_aug=AUG), 'needs a rotary encoding'),
    ('swin_cpb_tiny', dict(coord_aug=AUG), 'needs a rotary encoding'),
    ('swin_rope2d_tiny', dict(coord_aug={**AUG, 'per_sample': True}), 'per_sample'),
    ('swin_rope2d_tiny', dict(coord_aug=dict(scale=2)), 'unknown key'),
    ('cswin_tiny', dict(coord_aug=AUG), 'does not apply to CSWin'),
    ('rst_tiny', dict(coord_aug=AUG), 'does not apply to RadialStrip'),
])
def test_hierarchical_coord_aug_errors(preset, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_swin(preset, **kw) if preset.startswith('swin') else timm.create_model(preset, **kw)
