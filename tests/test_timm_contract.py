"""The timm contract, for every registered model (tiny overrides of depth and width).

What timm's own ``tests/test_models.py`` checks (forward with gradient checkpointing, backward into
every parameter, the pretrained cfg against forward_features / forward_head / reset_classifier,
features_only, forward_intermediates), written here for every registered preset at the input sizes
that suite would pick from the preset's pretrained cfg; then set_input_size and dynamic image size at
square and non-square sizes, and the errors.

Presets that differ only in width and depth (``vit_ape_tiny`` .. ``vit_ape_large``) are the same model
once the tiny overrides replace those: each group of identical (overridden keywords, timm size) runs
once, under its first name (``CASES``); ``test_cases_cover_every_preset`` checks the grouping.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim

from helpers import all_models, create_tiny, family, one_size_per_encoding, tiny_kwargs
from visionpe.models._registry import preset_kwargs

MODELS = one_size_per_encoding()
SIZES = [(160, 160), (224, 224), (320, 320), (224, 320)]

# The target sizes of timm's test_models.py: forward 384, backward 128, features 96 (a larger default
# size is shrunk to the target unless the pretrained cfg says fixed_input_size=True).
TIMM_TARGETS = {'forward': 384, 'backward': 128, 'features': 96}


def timm_input_size(name: str, target: int) -> tuple[int, int, int]:
    """The (C, H, W) timm's model tests feed ``name`` for a target size, from its pretrained cfg."""
    size = tuple(timm.get_pretrained_cfg_value(name, 'input_size'))
    if timm.get_pretrained_cfg_value(name, 'fixed_input_size'):
        return size
    smallest = timm.get_pretrained_cfg_value(name, 'min_input_size')
    if max(size) > target:
        return tuple(smallest) if smallest else tuple(min(s, target) for s in size)
    return size


def _effective(name: str) -> tuple:
    """What the test model of ``name`` is: its preset keywords with the tiny overrides, and timm's sizes."""
    kw = {**preset_kwargs(name), **tiny_kwargs(name)}
    sizes = tuple(timm_input_size(name, t) for t in TIMM_TARGETS.values())
    return family(name), tuple(sorted((k, repr(v)) for k, v in kw.items())), sizes


def _cases() -> dict[str, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name in all_models():
        groups.setdefault(_effective(name), []).append(name)
    return {min(names, key=lambda n: (not n.endswith('_tiny'), n)): names for names in groups.values()}


GROUPS = _cases()
CASES = sorted(GROUPS)


def _finite(t):
    return bool(torch.isfinite(t).all())


def _case(name: str, test: str, batch: int = 1, **kwargs):
    """The tiny model of ``name`` (eval mode) and a random batch at the size timm's ``test`` would use."""
    size = timm_input_size(name, TIMM_TARGETS[test])
    return create_tiny(name, **kwargs).eval(), torch.randn(batch, *size)


def test_cases_cover_every_preset():
    covered = [n for names in GROUPS.values() for n in names]
    assert sorted(covered) == sorted(all_models())
    for rep, names in GROUPS.items():
        assert all(_effective(n) == _effective(rep) for n in names)
    assert 'cswin_base_384' in CASES  # its own stripe widths and size


@pytest.mark.parametrize('name', CASES)
def test_timm_forward_and_grad_checkpointing(name):
    model, x = _case(name, 'forward')
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, model.num_classes) and _finite(out)
        model.set_grad_checkpointing()
        assert torch.allclose(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', CASES)
def test_timm_backward_every_parameter(name):
    model, x = _case(name, 'backward', batch=2, num_classes=42)
    out = model.train()(x)
    assert out.shape == (2, 42) and _finite(out)
    (out.square().mean() + out.mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not no_grad, f'parameters without gradient: {no_grad}'
    assert not zero, f'parameters with an all-zero gradient: {zero}'
    assert all(_finite(p.grad) for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('name', CASES)
def test_timm_default_cfg(name):
    """timm's test_model_default_cfgs (maps: pool_size) or _non_std (plain ViTs: tokens)."""
    model = create_tiny(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg['num_classes'] and model.num_features > 0 and model.head_hidden_size > 0
    sd = model.state_dict()
    for key in ('classifier', 'first_conv'):
        for c in [cfg[key]] if isinstance(cfg[key], str) else cfg[key]:
            assert f'{c}.weight' in sd, f'{key} {c} not in the model'
    size = cfg['input_size'] if not model.plain_trunk else timm_input_size(name, TIMM_TARGETS['forward'])
    x = torch.randn(1, *size)
    fmt = getattr(model, 'output_fmt', 'NCHW')
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        if model.plain_trunk:  # tokens (B, N, C)
            assert feats.dim() == 3 and feats.shape[-1] == model.num_features
        else:
            (hy, wx), c = get_spatial_dim(fmt), get_channel_dim(fmt)
            assert (feats.shape[hy], feats.shape[wx]) == tuple(cfg['pool_size'])
            assert feats.shape[c] == model.num_features
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre.shape
        model.reset_classifier(0, '')
        unpooled = model(x)
        assert unpooled.shape[-1 if model.plain_trunk else get_channel_dim(fmt)] == model.num_features
        if not model.plain_trunk:
            assert unpooled.dim() == 4 and (unpooled.shape[hy], unpooled.shape[wx]) == tuple(cfg['pool_size'])
            bare = create_tiny(name, num_classes=0, global_pool='').eval()
            out = bare(x)
            assert out.dim() == 4 and (out.shape[hy], out.shape[wx]) == tuple(cfg['pool_size'])
        else:
            bare = create_tiny(name, num_classes=0).eval()
            assert bare(x).shape == (1, bare.num_features)


def _check_maps(model, outs, size, fmt='NCHW'):
    info = model.feature_info
    channels = info.channels() if hasattr(info, 'channels') else [f['num_chs'] for f in info]
    reductions = info.reduction() if hasattr(info, 'reduction') else [f['reduction'] for f in info]
    assert len(outs) == len(channels) >= 3
    (hy, wx), c = get_spatial_dim(fmt), get_channel_dim(fmt)
    for o, ch, r in zip(outs, channels, reductions):
        assert o.shape[0] == 1 and o.shape[c] == ch and _finite(o)
        assert o.shape[hy] <= math.ceil(size[-2] / r) + 1 and o.shape[wx] <= math.ceil(size[-1] / r) + 1


@pytest.mark.parametrize('name', CASES)
def test_timm_features_only(name):
    model, x = _case(name, 'features', features_only=True)
    with torch.no_grad():
        outs = model(x)
    _check_maps(model, outs, x.shape, getattr(model, 'output_fmt', 'NCHW'))
    for o, r in zip(outs, model.feature_info.reduction()):  # exact strides at a multiple of every stride
        assert o.shape[-2:] == (x.shape[-2] // r, x.shape[-1] // r)


@pytest.mark.parametrize('name', CASES)
def test_timm_forward_intermediates(name):
    model, x = _case(name, 'features')
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt='NCHW')
        _check_maps(model, inter, x.shape)
        assert torch.allclose(final, model.forward_features(x), atol=1e-6)
        only = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        assert len(only) == 1 and torch.allclose(only[0], inter[0], atol=1e-6)
        model.set_grad_checkpointing()
        assert torch.allclose(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', CASES)
def test_prune_intermediate_layers(name):
    model, x = _case(name, 'features')
    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
        kept = model.prune_intermediate_layers(indices=[1], prune_head=True)
        assert kept == [1]
        final, (y,) = model.forward_intermediates(x, indices=[1])
        assert torch.allclose(y, inter[1], atol=1e-6)
        assert model(x).shape[-1] == model.num_features == model.head_hidden_size


@pytest.mark.parametrize('name', MODELS)
def test_set_input_size(name):
    model = create_tiny(name).eval()
    for size in SIZES:
        model.set_input_size(img_size=size)
        with torch.no_grad():
            out = model(torch.randn(1, 3, *size))
        assert out.shape == (1, model.num_classes) and _finite(out), size
        assert model.forward_intermediates(torch.randn(1, 3, *size), indices=1)[1][0].shape[-2:] == \
            (size[0] // model.feature_info[-1]['reduction'], size[1] // model.feature_info[-1]['reduction'])


@pytest.mark.parametrize('name', MODELS)
def test_dynamic_img_size(name):
    model = create_tiny(name, dynamic_img_size=True).eval()
    with torch.no_grad():
        for size in SIZES:
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, model.num_classes) and _finite(out), size


@pytest.mark.parametrize('name', [n for n in MODELS if family(n) == 'vit'])
def test_wrong_size_errors_name_the_fix(name):
    model = create_tiny(name).eval()
    with pytest.raises(ValueError, match='set_input_size|dynamic_img_size'):
        model(torch.randn(1, 3, 320, 320))
    model = create_tiny(name, dynamic_img_size=True).eval()
    with pytest.raises(ValueError, match='not a multiple of the patch size'):
        model(torch.randn(1, 3, 230, 224))


@pytest.mark.parametrize('name', all_models())
def test_every_preset_builds_at_full_size(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg['architecture'] == name
    sd = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in sd
    assert model.num_classes == cfg['num_classes'] == 1000
    assert model.feature_info and all(f['num_chs'] > 0 for f in model.feature_info)


def test_list_models_registered_with_timm():
    import visionpe
    names = visionpe.list_models()
    assert 'vit_rope2d_base' in names and 'vit_ape_tiny' in names
    for n in names:
        assert timm.is_model(n), n


def test_unknown_model_and_encoding_errors():
    import visionpe
    with pytest.raises(ValueError, match='unknown model .*Did you mean vit_rope2d_small'):
        visionpe.create_model('vit_rope2d_smal')
    with pytest.raises(ValueError, match='unknown position encoding'):
        timm.create_model('vit_ape_tiny', pe='rope3d')
    with pytest.raises(TypeError, match="unknown option.*thetaa.*valid options: .*theta"):
        timm.create_model('vit_rope2d_tiny', thetaa=3.)


def test_vit_window_tiled_absolute_table():
    """``abs_pos='tile'``: at another grid the learned table is repeated (window-absolute), not resampled."""
    from visionpe.grid import Grid
    model = create_tiny('vit_ape_tiny', img_size=64, patch_size=16, abs_pos='tile', dynamic_img_size=True).eval()
    table = model.pos_embed[0].reshape(4, 4, -1)  # no class-token entry (DeiT-III)
    tiled = model._abs_pos(Grid(6, 9, 1), torch.device('cpu'))[0].reshape(6, 9, -1)
    assert all(torch.equal(tiled[i, j], table[i % 4, j % 4]) for i in range(6) for j in range(9))
    assert model(torch.randn(1, 3, 96, 144)).shape == (1, 1000)
    with pytest.raises(ValueError, match="learned absolute table"):
        create_tiny('vit_rope2d_tiny', abs_pos='tile')
    with pytest.raises(ValueError, match="abs_pos must be one of"):
        create_tiny('vit_ape_tiny', abs_pos='crop')
