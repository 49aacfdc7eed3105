"""PoPE-2D (lucidrains PoPE-pytorch ``AxialPoPE``): attention core on given q, k, v (no projections)."""
from __future__ import annotations

from typing import Dict

import torch

from . import GoldenSet, golden_adapter
from visionpe.attention import attend
from visionpe.grid import Grid, grid_coords
from visionpe.pos import EncodingContext, build_encoding
from visionpe.pos.pope import pope_frequencies, pope_phases

INPUTS = tuple(f'{t}_{c}*' for t in 'qkv' for c in ('[0-9]', 'randpos', 'cls')) + ('positions_randpos16',)


@golden_adapter('pope2d', inputs=INPUTS)
def pope2d(gs: GoldenSet) -> Dict[str, torch.Tensor]:
    c, sd = gs.config['init_kwargs'], gs.state_dict
    d, heads, theta = c['dim'], c['heads'], float(c['theta'])
    assert list(c['axial_dims']) == [d // 2, d // 2]
    enc = build_encoding('pope2d', EncodingContext(d * heads, 1, heads, (4, 4), 0), theta=theta).eval()
    enc.delta[0].copy_(sd['bias'])
    for axis in (0, 1):  # the reference stores its (fixed) frequencies; ours are computed
        assert torch.allclose(sd[f'inv_freqs.{axis}'], pope_frequencies(d // 2, theta), rtol=0, atol=1e-7)

    out = {'bias_clamped': enc.clamped_delta(0)}
    for case in gs.config['cases']:
        q, k, v = (gs.tensors[case[t]] for t in 'qkv')
        if case['grid'] is None:  # explicit positions
            phases = pope_phases(gs.tensors[case['positions']], d, theta)
            state = enc.state_for_phases(phases)
        else:
            prefix = 0 if case['pope_pos_emb_indices'] is None else q.shape[2] - case['grid'][0] * case['grid'][1]
            grid = Grid(case['grid'][0], case['grid'][1], prefix)
            out[case['positions']] = grid_coords(grid.h, grid.w, 'index')
            phases = enc.phases(grid)
            state = enc.prepare(grid)
            if prefix:
                out[case['pope_pos_emb_indices']] = torch.arange(prefix, prefix + grid.num_patches)
        out[case['freqs']] = phases
        q_t, k_t = enc.rotate(q, k, 0, state)  # widened when the sequence has unpositioned tokens
        if 'q_rot' in case:  # the reference interleaves (cos, sin) per channel; ours: cosine half, sine half
            interleave = lambda t: t.unflatten(-1, (2, d)).transpose(-1, -2).flatten(-2)  # noqa: E731
            out[case['q_rot']], out[case['k_rot']] = interleave(q_t), interleave(k_t)
        out[case['logits']] = q_t @ k_t.transpose(-1, -2)
        out[case['out']] = attend(q_t, k_t, v, d ** -0.5, backend='math')[0]
    return out
