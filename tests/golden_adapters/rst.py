"""RST radial strip attention solver (Calvin11311/MDT ``TransformerBlock(att=True)``): our
:class:`visionpe.models.rst.RSASBlock` with ``strips='row'``, built from config.json, upstream state dict
through the converter; block output, attention branch, strip windows, bias terms and strip indices."""
from __future__ import annotations

import torch

from . import GoldenSet, golden_adapter
from visionpe.convert import convert_state_dict
from visionpe.models.rst import RSASBlock


@golden_adapter('rst', inputs=('x', 'dist', 'theta_max'))
def rst(gs: GoldenSet):
    c = gs.config['init_kwargs']
    assert c['att'] and c['LayerNorm_type'] == 'WithBias' and c['drop_path'] == 0.0
    T = gs.tensors
    theta_max = T['theta_max']
    assert theta_max.numel() == 1, 'the block takes one theta_max (the constant the upstream loops feed)'
    H_res, W_res = c['input_resolution']
    block = RSASBlock(c['dim'], (H_res, W_res), c['ffn_expansion_factor'], c['bias'],
                      theta_max=float(theta_max)).eval()
    sd, fmt = convert_state_dict(gs.state_dict, block)
    block.load_state_dict(sd, strict=True)

    x = T['x']
    B, C, H, W = x.shape
    attn = block.attn
    lay = attn.layout(H, W, x.device)
    nW, L = lay.num_windows, lay.max_len
    xn = block.norm1(x.permute(0, 2, 3, 1))
    tokens = lambda t: t.reshape(B, H * W, C)[:, lay.index].reshape(B * nW, L, C)  # noqa: E731
    out = {
        'out_block': block(x),
        'out_attn_branch': block.attn_branch(x),
        'windows_in': tokens(xn),
        'windows_out': tokens(attn(xn)),
        'rel_bias_phi': attn.rel_pos.angular(lay)[:, 0],
        'rel_bias_theta': attn.rel_pos.radial(lay)[:, 0],
        'window_token_rc': torch.stack([lay.index // W, lay.index % W], dim=-1).reshape(nW, L, 2),
        'relative_azimuth_index': lay.az_offset[0],
        'relative_radius_index': lay.rad_offset[0],
    }
    return out
