"""ComRoPE (AP / LD, and the code base's LieRE / vanilla RoPE baselines): rotations against a dense float64
reference, relativity, RoPE equivalence at b = 2, prefix tokens, backends, gradients, options, converter."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import golden_dir
from helpers import assert_backends_agree, create_tiny
from visionpe.convert import CheckpointMismatchError
from visionpe.grid import Grid
from visionpe.pos import EncodingContext, build_encoding
from visionpe.pos.rope import apply_rope, rope_tables

KINDS = ('ap', 'ld', 'liere', 'vanilla')


def make(kind: str, dim: int = 64, heads: int = 4, depth: int = 2, grid=(4, 4), prefix: int = 1, **kw):
    if kind == 'vanilla':
        kw.setdefault('theta_base', 1.5)  # every pair rotates, at angles float32 matrix_exp keeps to 1e-6
    return build_encoding('comrope', EncodingContext(dim, depth, heads, grid, prefix), comrope_type=kind, **kw)


def dense_rotation(enc, layer: int, pos: torch.Tensor) -> torch.Tensor:
    """Upstream's construction in float64: R = blockdiag_j expm(sum_i p_i A_ij), dense (H, L, d, d)."""
    gen = enc.generators(layer).double()  # (H | 1, 2, t, b, b)
    blocks = torch.linalg.matrix_exp(torch.einsum('la,hatij->hltij', pos.double(), gen).contiguous())
    h, n, t, b, _ = blocks.shape
    dense = torch.zeros(h, n, t * b, t * b, dtype=torch.float64)
    for j in range(t):
        dense[:, :, j * b:(j + 1) * b, j * b:(j + 1) * b] = blocks[:, :, j]
    return dense


def rotate_dense(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return (dense.unsqueeze(0) @ x.double().unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('hw', [(3, 5), (4, 4)])
def test_rotation_matches_dense_reference(kind, hw):
    enc = make(kind)
    grid = Grid(*hw, 1)
    state = enc.prepare(grid)
    # grids take the per-axis factorisation whenever the generators commute
    assert (state.axes is not None) == (kind != 'liere')
    q, k = torch.randn(2, 2, 4, grid.num_tokens, 16).unbind(0)
    qr, kr = enc.rotate(q, k, 1, state)
    dense = dense_rotation(enc, 1, enc.positions(grid))
    assert torch.allclose(qr.double(), rotate_dense(q, dense), atol=1e-5)
    assert torch.allclose(kr.double(), rotate_dense(k, dense), atol=1e-5)
    # scattered positions (e.g. upstream's training jitter) take one matrix_exp per token
    pos = torch.rand(grid.num_tokens, 2) * 1.5
    state = enc.state_for_positions(pos)
    assert state.axes is None
    qr, _ = enc.rotate(q, k, 0, state)
    assert torch.allclose(qr.double(), rotate_dense(q, dense_rotation(enc, 0, pos)), atol=1e-5)


@pytest.mark.parametrize('kind', KINDS)
def test_rotation_blocks_are_rotations(kind):
    enc = make(kind, block_size=2 if kind == 'vanilla' else 8)
    r = enc.rotation_blocks(0, enc.prepare(Grid(5, 3, 1)))
    assert r.shape[1:] == (1 + 15, 16 // enc.block_size, enc.block_size, enc.block_size)  # blocks, never dense
    eye = torch.eye(enc.block_size).expand_as(r)
    assert torch.allclose(r @ r.transpose(-1, -2), eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(r), torch.ones(()), atol=1e-4)


@pytest.mark.parametrize('kind', KINDS)
def test_relative_only_when_generators_commute(kind):
    enc = make(kind)
    pos = torch.rand(20, 2)
    q, k = torch.randn(2, 2, 4, 20, 16).unbind(0)

    def logits(p):
        qr, kr = enc.rotate(q, k, 0, enc.state_for_positions(p))
        return qr @ kr.transpose(-1, -2)

    ref = logits(pos)
    diff = (ref - logits(pos + torch.tensor([0.37, -1.3]))).abs().max() / ref.abs().max()
    if kind == 'liere':
        assert diff > 1e-3  # LieRE's per-axis generators do not commute: not relative
    else:
        assert diff < 1e-5, diff  # fp32 rounding


def test_ap_with_b2_is_rope_with_learned_frequencies():
    enc = make('ap', block_size=2)
    grid = Grid(3, 4, 1)
    q, k = torch.randn(2, 2, 4, grid.num_tokens, 16).unbind(0)
    qr, kr = enc.rotate(q, k, 1, enc.prepare(grid))
    # a 2x2 generator [[0, a], [-a, 0]] turns pair j by -a * p, p the coordinate of axis j mod 2
    s = enc.freqs[1] - enc.freqs[1].transpose(-1, -2)
    freq = -s[..., 0, 1]  # (H, d/2) learned frequencies
    pos = enc.positions(grid)
    angles = pos[:, torch.arange(8) % 2].unsqueeze(0) * freq.unsqueeze(1)  # (H, L, d/2)
    sin, cos = rope_tables(angles, 0)
    assert torch.allclose(qr, apply_rope(q, sin, cos), atol=1e-5)
    assert torch.allclose(kr, apply_rope(k, sin, cos), atol=1e-5)


def test_positions_rows_first_normalized_and_nonsquare():
    enc = make('ap')
    pos = enc.positions(Grid(2, 3, 1))
    rows, cols = torch.meshgrid(torch.arange(2.), torch.arange(3.), indexing='ij')
    expect = torch.stack([(rows.flatten() + .5) / 2, (cols.flatten() + .5) / 3], dim=-1)
    assert torch.equal(pos[0], torch.tensor([.5, .5]))  # the class token at the image centre
    assert torch.allclose(pos[1:], expect)
    rel = make('ap', coord_mode='normalized_ref', ref_hw=(2, 2)).positions(Grid(4, 4, 1))
    assert torch.equal(rel[0], torch.tensor([.5, .5])) and rel[1:].max() == 3.5 / 2  # train-relative


def test_prefix_token_options():
    grid = Grid(3, 5, 2)
    q, k = torch.randn(2, 1, 4, grid.num_tokens, 16).unbind(0)
    centre = make('ap', coord_mode='index', prefix_pos='center').positions(grid)
    assert torch.allclose(centre[:2], torch.tensor([[1., 2.], [1., 2.]]))
    fixed = make('ld', prefix_pos=(0.25, 0.75)).positions(grid)
    assert torch.equal(fixed[:2], torch.tensor([[.25, .75], [.25, .75]]))
    enc = make('ld', prefix_pos=None)
    assert enc.positions(grid).shape[0] == 15
    state = enc.prepare(grid)
    qr, kr = enc.rotate(q, k, 0, state)
    assert torch.equal(qr[:, :, :2], q[:, :, :2]) and torch.equal(kr[:, :, :2], k[:, :, :2])
    dense = dense_rotation(enc, 0, enc.positions(grid))
    assert torch.allclose(qr[:, :, 2:].double(), rotate_dense(q[:, :, 2:], dense), atol=1e-5)
    with pytest.raises(ValueError, match='positions for 17 tokens but attention got 15'):
        enc.rotate(q[:, :, 2:], k[:, :, 2:], 0, make('ld').prepare(grid))


def _upstream_ape(table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Upstream's sampling verbatim in shape: 5-D grid_sample at (0, 2 row - 1, 2 col - 1)."""
    book = table.permute(3, 0, 1, 2).unsqueeze(0)  # (1, C, 1, h, w)
    loc = torch.cat([torch.zeros(len(pos), 1), pos * 2 - 1], dim=-1)
    out = F.grid_sample(book, loc.view(1, 1, 1, -1, 3), align_corners=True, padding_mode='border')
    return out.reshape(table.shape[-1], -1).t()


def test_ape_rowonly_matches_upstream_and_bilinear_hits_table_nodes():
    enc = make('ap', dim=8, heads=2, grid=(4, 4), block_size=2, ape='rowonly', coord_mode='normalized_ref')
    state = enc.prepare(Grid(8, 6, 1))  # train-relative: positions beyond 1 are clamped by the border
    assert torch.allclose(enc.ape_table(state), _upstream_ape(enc.pos_embed, state.pos), atol=1e-6)
    enc = make('ap', dim=8, heads=2, grid=(4, 4), block_size=2, ape='bilinear')
    nodes = torch.tensor([[0., 0.], [1., 1. / 3], [2. / 3, 1.]])  # (row, col) exactly on table entries
    got = enc.ape_table(enc.state_for_positions(nodes))
    t = enc.pos_embed[0]
    assert torch.allclose(got, torch.stack([t[0, 0], t[3, 1], t[2, 3]]), atol=1e-6)


@pytest.mark.parametrize('name', ['vit_comrope_ap_tiny', 'vit_comrope_ld_tiny'])
def test_backends_agree(name):
    assert_backends_agree(create_tiny(name, dynamic_img_size=True).eval(), torch.randn(2, 3, 32, 48))  # 2 x 3 grid


@pytest.mark.parametrize('kind,extra', [('ap', dict(ape='bilinear')), ('ld', dict(ape='rowonly', prefix_pos=None)),
                                        ('liere', {})])
def test_gradients_reach_every_parameter(kind, extra):
    model = create_tiny('vit_comrope_ap_tiny', comrope_type=kind, dynamic_img_size=True, **extra).train()
    model(torch.randn(2, 3, 32, 48)).square().mean().backward()
    for n, p in model.pe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any(), n
    assert model.no_weight_decay() >= {f'pe.{n}' for n, _ in model.pe.named_parameters()}


@pytest.mark.parametrize('kwargs,match', [
    (dict(comrope_type='xx'), 'comrope_type must be one of'),
    (dict(comrope_type='ld', block_size=3), 'block_size 3 must divide the head dim 16'),
    (dict(block_size=16), 'block_size must divide head_dim / 2 = 8'),
    (dict(comrope_type='ld', block_size=0), 'positive integer'),
    (dict(comrope_type='vanilla', block_size=4), 'block_size must be 2'),
    (dict(init_std=0.), 'init_std must be positive'),
    (dict(comrope_type='liere', scale_factor=1e100), 'overflows'),
    (dict(prefix_pos='middle'), 'prefix_pos must be None'),
    (dict(ape='learned'), "ape must be None, 'bilinear' or 'rowonly'"),
    (dict(ape='rowonly', coord_mode='index'), "needs coord_mode 'normalized'"),
    (dict(coord_mode='pixels'), 'unknown coordinate mode'),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_tiny('vit_comrope_ap_tiny', **kwargs)


# ---------------------------------------------------------------------------------------------- converter
CLIP = dict(pre_norm=True, act_layer='quick_gelu', norm_eps=1e-5, fc_norm=True, patch_bias=False, init_values=0,
            embed_dim=32, depth=2, num_heads=2, mlp_ratio=2., patch_size=8, img_size=32, num_classes=5)


def to_upstream(model) -> dict:
    """Our weights in Longin-Yu/ComRoPE's HF CLIP key names (the inverse of the converter)."""
    sd, pe, out = model.state_dict(), model.pe, {}
    for i in range(len(model.blocks)):
        pre = f'vision_model.encoder.layers.{i}.'
        for p in ('weight', 'bias'):
            for n, t in zip('qkv', sd[f'blocks.{i}.attn.qkv.{p}'].chunk(3)):
                out[f'{pre}self_attn.{n}_proj.{p}'] = t
            out[f'{pre}self_attn.out_proj.{p}'] = sd[f'blocks.{i}.attn.proj.{p}']
            for ours, theirs in (('norm1', 'layer_norm1'), ('norm2', 'layer_norm2'), ('mlp.fc1', 'mlp.fc1'),
                                 ('mlp.fc2', 'mlp.fc2')):
                out[f'{pre}{theirs}.{p}'] = sd[f'blocks.{i}.{ours}.{p}']
        if pe.freqs is not None:
            out[f'{pre}self_attn.freqs'] = pe.freqs[i] if pe.comrope_type == 'liere' else pe.freqs[i].unsqueeze(1)
        if pe.multiplier is not None:
            out[f'{pre}self_attn.multiplier'] = pe.multiplier[i].reshape(1, 2, -1, 1, 1)
    out['vision_model.embeddings.class_embedding'] = sd['cls_token'].flatten()
    out['vision_model.embeddings.patch_embedding.weight'] = sd['patch_embed.proj.weight']
    if pe.pos_embed is not None:
        out['vision_model.embeddings.position_embedding'] = sd['pe.pos_embed']
    for p in ('weight', 'bias'):
        out[f'vision_model.pre_layrnorm.{p}'] = sd[f'norm_pre.{p}']
        out[f'vision_model.post_layernorm.{p}'] = sd[f'fc_norm.{p}']
        out[f'classification_head.{p}'] = sd[f'head.{p}']
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _save(sd: dict, tmp_path, name='ckpt.safetensors'):
    from safetensors.torch import save_file
    path = tmp_path / name
    save_file(sd, str(path))
    return str(path)


@pytest.mark.parametrize('kind,ape', [('ap', 'rowonly'), ('ld', None)])
def test_converter_round_trip_reads_the_architecture(kind, ape, tmp_path):
    src = timm.create_model(f'vit_comrope_{kind}_tiny', ape=ape, **CLIP).eval()
    for p in src.parameters():  # make every tensor matter (LayerNorms, biases)
        p.data.add_(torch.randn_like(p) * 0.1)
    path = _save(to_upstream(src), tmp_path)
    # the config reader supplies the CLIP architecture and sizes (the image size only when the file has
    # the absolute table): the model name and the file suffice
    extra = {} if ape else dict(img_size=32)
    dst = timm.create_model(f'vit_comrope_{kind}_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                            **extra).eval()
    assert isinstance(dst.fc_norm, torch.nn.LayerNorm) and dst.pe.block_size == 4 and dst.pe.ape == ape
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dst(x), src(x), atol=1e-6)


def test_converter_mismatches_raise_clear_errors(tmp_path):
    src = timm.create_model('vit_comrope_ld_tiny', **CLIP)
    up = to_upstream(src)
    cases = [
        (dict(name='vit_comrope_ap_tiny'), up, "comrope_type='ld'"),
        (dict(block_size=2), up, 'pass block_size=4'),
        (dict(ape='rowonly'), up, 'create the model with ape=None'),
        (dict(), {**up, 'vision_model.embeddings.position_ids': torch.arange(17)},
         'unexpected keys: vision_model.embeddings.position_ids'),
        (dict(), {k: v for k, v in up.items() if 'layers.1.mlp.fc1.bias' not in k}, r'missing keys: blocks\.1\.mlp\.fc1'),
        (dict(name='vit_rope2d_tiny'), up, 'no ComRoPE encoding'),
    ]
    for kw, sd, match in cases:
        name = kw.pop('name', 'vit_comrope_ld_tiny')
        path = _save(sd, tmp_path)
        with pytest.raises(CheckpointMismatchError, match=match):
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **{**CLIP, **kw})


@pytest.mark.skipif(not (golden_dir() / 'comrope_ap' / 'model_b4_noape').is_dir(),
                    reason='ComRoPE golden vectors not found (set VISIONPE_GOLDEN_DIR)')
def test_upstream_file_loads_by_model_name_only():
    from safetensors.torch import load_file
    root = golden_dir() / 'comrope_ap' / 'model_b4_defaultape'
    model = timm.create_model('vit_comrope_ap_tiny', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(root / 'state_dict.safetensors'))).eval()
    t = load_file(str(root / 'tensors.safetensors'))
    with torch.no_grad():
        assert torch.allclose(model(t['pixel_values_4x4']), t['logits_4x4'], atol=1e-5)
