"""Loading upstream checkpoints through timm's pretrained path, and clear errors when they don't fit."""
from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import visionpe  # noqa: F401
from visionpe.convert import CheckpointMismatchError

TINY = dict(embed_dim=64, depth=2, num_heads=4)


def _perturbed(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _load(name, path, **kw):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()


def test_naver_ropevit_mixed_pth(tmp_path):
    """naver rope-vit .pth: {'model': ...}, freqs (2, depth, heads*d/2), freqs_t_x/y buffers, gamma_1/2."""
    ref = _perturbed(timm.create_model('vit_small_patch16_rope_mixed_224', **TINY))
    sd = {}
    for k, v in ref.state_dict().items():
        if k == 'rope.freqs':
            sd['freqs'] = v.reshape(2, TINY['depth'], -1)
        else:
            sd[k] = v
    sd['freqs_t_x'], sd['freqs_t_y'] = torch.arange(196.), torch.arange(196.)
    torch.save({'model': sd, 'epoch': 399}, tmp_path / 'rope_mixed_deit_small.pth')
    model = _load('vit_rope2d_mixed_small', tmp_path / 'rope_mixed_deit_small.pth', **TINY)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ref(x) - model(x)).abs().max() < 1e-5


def test_deit3_official_pth_and_grid_resample(tmp_path):
    ref = _perturbed(timm.create_model('deit3_small_patch16_224', **TINY))
    sd = {re.sub(r'\.ls(\d)\.gamma$', r'.gamma_\1', k): v for k, v in ref.state_dict().items()}
    torch.save({'model': sd}, tmp_path / 'deit_3_small_224_1k.pth')
    model = _load('vit_ape_small', tmp_path / 'deit_3_small_224_1k.pth', **TINY)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ref(x) - model(x)).abs().max() < 1e-5
    # the same checkpoint into a 320 px model: the table is resampled like timm's own loader does
    big = _load('vit_ape_small', tmp_path / 'deit_3_small_224_1k.pth', img_size=320, **TINY)
    ref_big = timm.create_model('deit3_small_patch16_224', img_size=320, pretrained=True,
                                pretrained_cfg_overlay=dict(state_dict=ref.state_dict()), **TINY).eval()
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        assert (ref_big(x) - big(x)).abs().max() < 1e-5


def test_cpvt_official_keys(tmp_path):
    src = _perturbed(timm.create_model('vit_cpvt_gap_tiny', **{**TINY, 'depth': 3}))
    sd = {k.replace('pe.convs.', 'pos_block.').replace('.weight', '.proj.0.weight').replace('.bias', '.proj.0.bias')
          if k.startswith('pe.convs.') else k: v for k, v in src.state_dict().items()}
    assert any(k.startswith('pos_block.2.proj.0') for k in sd)
    save_file(sd, str(tmp_path / 'cpvt.safetensors'))
    model = _load('vit_cpvt_gap_tiny', tmp_path / 'cpvt.safetensors', **{**TINY, 'depth': 3})
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(src(x), model(x))


def test_missing_unexpected_and_shape_errors_name_the_keys(tmp_path):
    good = timm.create_model('vit_rope2d_tiny', **TINY).state_dict()
    bad = dict(good)
    bad.pop('blocks.1.attn.qkv.weight')
    bad['blocks.0.attn.extra'] = torch.zeros(3)
    bad['blocks.0.mlp.fc1.weight'] = torch.zeros(7, 64)
    save_file(bad, str(tmp_path / 'bad.safetensors'))
    with pytest.raises(CheckpointMismatchError) as e:
        _load('vit_rope2d_tiny', tmp_path / 'bad.safetensors', **TINY)
    msg = str(e.value)
    assert 'missing keys: blocks.1.attn.qkv.weight' in msg
    assert 'unexpected keys: blocks.0.attn.extra' in msg
    assert 'blocks.0.mlp.fc1.weight: checkpoint (7, 64) vs model (256, 64)' in msg
    # a RoPE-Mixed checkpoint into an axial model is refused, not half-loaded
    mixed = timm.create_model('vit_rope2d_mixed_tiny', **TINY).state_dict()
    save_file(mixed, str(tmp_path / 'mixed.safetensors'))
    with pytest.raises(CheckpointMismatchError, match='unexpected keys: pe.freqs'):
        _load('vit_rope2d_tiny', tmp_path / 'mixed.safetensors', **TINY)


def test_other_num_classes_keeps_fresh_head_and_loads_the_rest(tmp_path, caplog):
    src = _perturbed(timm.create_model('vit_ape_tiny', **TINY))
    save_file(src.state_dict(), str(tmp_path / 'w.safetensors'))
    model = _load('vit_ape_tiny', tmp_path / 'w.safetensors', num_classes=10, **TINY)
    assert model.head.weight.shape == (10, 64)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert any('number of classes' in r.message for r in caplog.records)
    same = _load('vit_ape_tiny', tmp_path / 'w.safetensors', **TINY)
    assert torch.equal(same.head.weight, src.head.weight)


def test_pretrained_needs_a_local_file(tmp_path, monkeypatch):
    monkeypatch.delenv('VISIONPE_WEIGHTS_DIR', raising=False)
    with pytest.raises(RuntimeError, match='pretrained_cfg_overlay=dict\\(file=PATH\\).*VISIONPE_WEIGHTS_DIR'):
        timm.create_model('vit_ape_tiny', pretrained=True)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        _load('vit_ape_tiny', tmp_path / 'nope.pth')
    src = _perturbed(timm.create_model('vit_sincos_tiny', **TINY))
    save_file(src.state_dict(), str(tmp_path / 'vit_sincos_tiny.safetensors'))
    monkeypatch.setenv('VISIONPE_WEIGHTS_DIR', str(tmp_path))
    model = timm.create_model('vit_sincos_tiny', pretrained=True, **TINY)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_width_mismatch_is_not_called_another_number_of_classes(tmp_path, caplog):
    """issue 17: a checkpoint of another width was warned about as 'another number of classes' (its head's
    in-features differ); only the class dimension of the head may differ."""
    src = timm.create_model('vit_ape_tiny', **{**TINY, 'embed_dim': 32})
    save_file(src.state_dict(), str(tmp_path / 'narrow.safetensors'))
    for kw in ({}, {'num_classes': 10}):
        own = timm.create_model('vit_ape_tiny', **kw, **TINY).state_dict()
        n = sum(v.shape != own[k].shape for k, v in src.state_dict().items())  # the head among them
        with pytest.raises(CheckpointMismatchError, match=rf'shape mismatches: .*\({n} in all\)'):
            _load('vit_ape_tiny', tmp_path / 'narrow.safetensors', **kw, **TINY)
        assert 'number of classes' not in caplog.text


@pytest.mark.parametrize('content,words', [(b'', 'is empty'), (b'hello\n', 'not a readable PyTorch checkpoint')])
def test_unreadable_weight_files_say_what_they_are(tmp_path, content, words):
    """An empty file gave an empty reason; a text file quoted PyTorch's advice to load with weights_only=False."""
    path = tmp_path / 'w.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointMismatchError, match=words) as e:
        _load('vit_ape_tiny', path, **TINY)
    assert 'weights_only' not in str(e.value)
