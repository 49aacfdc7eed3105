"""The timm contract, for every registered model (tiny overrides of depth and width).

forward and backward, pretrained_cfg consistency, forward_intermediates, features_only,
gradient checkpointing, set_input_size and dynamic image size at square and non-square sizes.
"""
from __future__ import annotations

import pytest
import timm
import torch

from helpers import all_models, create_tiny, family, one_size_per_encoding

# Every preset at its real size is built (on the meta device) below; the full contract runs on the
# smallest preset of every encoding / family with tiny overrides (sizes differ only in width/depth).
MODELS = one_size_per_encoding()
SIZES = [(160, 160), (224, 224), (320, 320), (224, 320)]


def _finite(t):
    return bool(torch.isfinite(t).all())


@pytest.mark.parametrize('name', MODELS)
def test_forward_backward_every_parameter(name):
    model = create_tiny(name, num_classes=7).train()
    x = torch.randn(2, 3, 224, 224)
    out = model(x)
    assert out.shape == (2, 7) and _finite(out)
    (out.square().mean() + out.mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not no_grad, f'parameters without gradient: {no_grad}'
    assert not zero, f'parameters with an all-zero gradient: {zero}'
    assert all(_finite(p.grad) for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('name', MODELS)
def test_pretrained_cfg_consistent(name):
    model = create_tiny(name).eval()
    cfg = model.pretrained_cfg
    sd = model.state_dict()
    classifiers = [cfg['classifier']] if isinstance(cfg['classifier'], str) else cfg['classifier']
    for c in classifiers:
        assert f'{c}.weight' in sd, f'classifier {c} not in the model'
    first = [cfg['first_conv']] if isinstance(cfg['first_conv'], str) else cfg['first_conv']
    for c in first:
        assert f'{c}.weight' in sd, f'first_conv {c} not in the model'
    size = cfg['input_size'][1:]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert model(x).shape == (2, cfg['num_classes'])
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (2, model.head_hidden_size)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.head_hidden_size)
        model.reset_classifier(0, '')
        unpooled = model(x)
        assert unpooled.dim() in (3, 4) and unpooled.shape[-1] == model.num_features


@pytest.mark.parametrize('name', MODELS)
def test_forward_intermediates_match_forward_features(name):
    model = create_tiny(name).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        assert torch.allclose(final, feats, atol=1e-6)
        assert len(inter) == len(model.feature_info)
        for y, info in zip(inter, model.feature_info):
            assert y.dim() == 4 and y.shape[1] == info['num_chs']
            assert y.shape[-1] == 224 // info['reduction'] and y.shape[-2] == 224 // info['reduction']
        only = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        assert len(only) == 1 and torch.allclose(only[0], inter[0], atol=1e-6)


@pytest.mark.parametrize('name', MODELS)
def test_features_only(name):
    model = create_tiny(name, features_only=True).eval()
    channels = model.feature_info.channels()
    reductions = model.feature_info.reduction()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 224, 224))
    assert len(outs) == len(channels) >= 1
    for o, c, r in zip(outs, channels, reductions):
        assert o.shape[1] == c and o.shape[-1] == 224 // r and _finite(o)


@pytest.mark.parametrize('name', MODELS)
def test_grad_checkpointing_same_output(name):
    model = create_tiny(name).eval()
    x = torch.randn(2, 3, 224, 224, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and _finite(x.grad)


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
