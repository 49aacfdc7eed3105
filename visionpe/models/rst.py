"""Radial-strip transformer (RST: "Spread Your Wings: A Radial Strip Transformer for Image Deblurring",
arXiv 2404.00358; official code Calvin11311/MDT ``basicsr/models/archs/mdt_arch.py``;
docs/encodings.md, "Radial-strip transformer"), as a hierarchical classification / detection backbone ``rst_<size>``.

Four stages at strides 4, 8, 16, 32 (CSWin's conv stem and conv merges), each block
``x + StripAttention(LN(x))``, ``x + Mlp(LN(x))``. :class:`StripAttention` attends inside strips
(:mod:`visionpe.models._strips`):

``strips='polar'`` (default of the backbones, the paper's idea): tokens binned by azimuth sector x
    radius ring about the map centre, odd blocks use the half-shifted partition; logit bias = angular
    Fourier term over the azimuth offset + radial Fourier term over the ring offset; q and k rotated
    by 2-D RoPE over polar coordinates ``(log(r + 1), theta)`` (``rope=True``, :mod:`visionpe.pos.rope`
    with ``coord_mode='polar'``: integer frequencies on the angle keep it 2 pi periodic).
``strips='row'`` (the official code): single-head style ``1 x Ww`` row strips with bias
    ``a[d] cos(2 pi d / Ww) + b[d] sin(2 pi d / Ww)`` plus the constant radius term; in the backbone,
    odd blocks use ``Ww x 1`` column strips so that rows exchange information.

Strips hold different token counts: they run as one padded batch of strips with a key mask (every
backend), or, on CUDA with xformers and no additive bias (``strip_bias=False``), packed without
padding under a ``BlockDiagonalMask``. No Python loop over strips. Any H x W runs (H, W >= 3).

:class:`RSASBlock` is the official ``TransformerBlock(att=True)`` (RSAS + DFFN, NCHW) for parity
with the golden sets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp

from ..attention import check_backend, resolve_backend, run_backend
from ..grid import Grid, GridCache
from ..pos import EncodingContext, LayerPos, PosEncoding, build_encoding
from ._base import maybe_checkpoint
from ._hierarchical import ConvMerge, HierarchicalBase, IntOr4, to_4
from ._registry import default_cfg, model_builder, register_presets
from ._strips import StripBias, StripLayout, StripSpec

__all__ = ['RadialStripTransformer', 'StripAttention', 'RSTBlock', 'RSASBlock', 'DFFN', 'RST_SIZES']


class StripAttention(nn.Module):
    """Multi-head attention inside strips (radial strip attention solver, RSAS).

    ``forward(x, layout=None, pos=None)``: x (B, H, W, C) -> (B, H, W, C). ``layout`` is the strip
    layout of this grid (built and cached per grid when not given), ``pos`` an optional rotary
    encoding bound to this block (:class:`~visionpe.pos.base.LayerPos`) that rotates q and k
    before partitioning. Key names follow
    upstream ``WindowAttention``: ``qkv``, ``proj``; the bias tables live in ``rel_pos``
    (``a_p, b_p, a_r, b_r``).
    """

    def __init__(self, dim: int, num_heads: int, spec: StripSpec, qkv_bias: bool = True, strip_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., attn_backend: str = 'auto'):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.spec = spec
        self.attn_backend = check_backend(attn_backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # the radius term exists upstream (row strips, constant there) and for rings wider than one token
        radial = spec.strips == 'row' or spec.rad_rows > 1
        self.rel_pos = StripBias(num_heads, spec.az_rows, spec.rad_rows, radial) if strip_bias else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._layouts = GridCache()

    def layout(self, h: int, w: int, device: torch.device, shifted: bool = False) -> StripLayout:
        return get_layout(self._layouts, self.spec, h, w, device, shifted)

    def bias(self, lay: StripLayout, group: Optional[StripGroup] = None) -> Optional[torch.Tensor]:
        """(1, heads * windows, L, L) additive logits (position bias and padding mask) or None, of the
        whole layout or of one of its length groups."""
        if group is None:
            nW, L, mask = lay.num_windows, lay.max_len, lay.mask
        else:
            nW, L, mask = group.num_windows, group.max_len, group.mask
        if self.rel_pos is not None:
            pair = None if group is None else group.pair_of(lay)
            return self.rel_pos(lay, pair).reshape(1, self.num_heads * nW, L, L)
        if mask is not None:
            return mask[None].expand(self.num_heads, nW, L, L).reshape(1, self.num_heads * nW, L, L)
        return None

    def forward(self, x: torch.Tensor, layout: Optional[StripLayout] = None, pos: Optional[LayerPos] = None
                ) -> torch.Tensor:
        B, H, W, C = x.shape
        lay = layout if layout is not None else self.layout(H, W, x.device)
        if lay.grid_hw != (H, W):
            raise ValueError(f'strip layout built for a {lay.grid_hw} grid used on {H}x{W}')
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d)
        if pos is not None:
            q, k = pos.rotate(q, k)
        backend = resolve_backend(self.attn_backend, x.device, training=self.training)
        if backend == 'xformers' and self.rel_pos is None:
            out = self._packed_xformers(q, k, v, lay)
        else:
            out = self._padded(backend, q, k, v, lay)
        x = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))

    def _padded(self, backend: str, q, k, v, lay: StripLayout) -> torch.Tensor:
        """Strips grouped by length (:func:`length_buckets`), each group a padded batch folded into the head
        axis, (B, heads * nW_g, L_g, d), one kernel call per group; the outputs are put back in token order."""
        B, heads, d = q.shape[0], self.num_heads, self.head_dim
        groups, inverse = length_buckets(self._layouts, lay)
        outs = []
        for g in groups:
            nW, L = g.num_windows, g.max_len
            shape = (B, heads * nW, L, d)
            qw, kw, vw = (t.index_select(2, g.index).reshape(shape) for t in (q, k, v))
            out, _ = run_backend(backend, qw, kw, vw, self.scale, self.bias(lay, g), None,
                                 dropout_p=self.attn_drop, training=self.training)
            outs.append(out.reshape(B, heads, nW * L, d))
        return (outs[0] if len(outs) == 1 else torch.cat(outs, 2)).index_select(2, inverse)

    def _packed_xformers(self, q, k, v, lay: StripLayout) -> torch.Tensor:
        """CUDA + xformers, no additive bias: variable-length strips without padding."""
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
        B, heads, N, d = q.shape
        qp, kp, vp = (t.index_select(2, lay.order).permute(0, 2, 1, 3).reshape(1, B * N, heads, d)
                      for t in (q, k, v))
        mask = BlockDiagonalMask.from_seqlens(list(lay.lengths) * B)
        out = xops.memory_efficient_attention(qp, kp, vp, attn_bias=mask, p=self.attn_drop if self.training else 0.,
                                              scale=self.scale)
        return out.reshape(B, N, heads, d).permute(0, 2, 1, 3).index_select(2, lay.order_inverse)

    def extra_repr(self) -> str:
        s = self.spec
        part = f'row strips 1x{s.strip_len}' if s.strips == 'row' else \
            f'polar strips: {s.num_sectors} sectors x rings of {s.ring_width}, {s.azimuth_bins} azimuth bins'
        return f'dim={self.dim}, heads={self.num_heads}, {part}, backend={self.attn_backend}'


#: a strip joins the current length group while its length is at least this fraction of the group's longest
BUCKET_FILL = 0.75
#: per layout, the groups keep their own cut of the offset-pair index up to this many MiB; above it
#: (e.g. rst_tiny at 1024 px) each group cuts it from the layout's index at every call instead
GROUP_COPY_MB = 256.


@dataclass(frozen=True)
class StripGroup:
    """Strips of similar length: their window ids, their longest length, their tokens' slots
    (``(num_windows * max_len,)``, padded slots repeat the strip's first token as in the layout), their
    key mask (None without padding) and their offset-pair index (``StripLayout.pair`` cut to them,
    ``(num_windows, max_len, max_len)``) when it fits ``GROUP_COPY_MB``."""
    windows: torch.Tensor
    max_len: int
    index: torch.Tensor
    mask: Optional[torch.Tensor] = None
    pair: Optional[torch.Tensor] = None

    @property
    def num_windows(self) -> int:
        return self.windows.numel()

    def pair_of(self, lay: StripLayout) -> torch.Tensor:
        """The group's rows of ``lay.pair``: kept, or cut now."""
        if self.pair is not None:
            return self.pair
        return lay.pair.index_select(0, self.windows)[:, :self.max_len, :self.max_len]


def length_buckets(cache: GridCache, lay: StripLayout) -> Tuple[List[StripGroup], torch.Tensor]:
    """``lay``'s strips in groups of similar length (longest first; a new group starts below
    ``BUCKET_FILL`` of the current group's longest), and the slot of every token in the groups'
    padded slots put one after the other. Cached with the layout.

    Padding all strips to the longest one computed about twice the needed attention at 448 px
    (rst_tiny: 46-57% of the slots were real tokens); in groups, 80-95%."""
    def build() -> Dict[str, Any]:
        lengths = torch.tensor(lay.lengths)
        order = torch.argsort(lengths, descending=True, stable=True)
        index = lay.index.view(lay.num_windows, lay.max_len).cpu()
        slot_of_token = torch.empty(sum(lay.lengths), dtype=torch.long)
        groups, start, offset, copied = [], 0, 0, 0
        while start < len(order):
            end = start + int((lengths[order[start:]] >= BUCKET_FILL * lengths[order[start]]).sum())
            wins = order[start:end].sort().values
            L = int(lengths[wins].max())
            idx = index[wins, :L]
            valid = torch.arange(L)[None, :] < lengths[wins][:, None]
            slot_of_token[idx[valid]] = offset + torch.arange(wins.numel() * L).view(-1, L)[valid]
            dev = lay.index.device
            mask = None if bool(valid.all()) else lay.mask[wins.to(dev), :, :L]
            groups.append(StripGroup(wins.to(dev), L, idx.reshape(-1).to(dev), mask))
            start, offset = end, offset + wins.numel() * L
            copied += wins.numel() * L * L * lay.pair.element_size()
        if copied <= GROUP_COPY_MB * 2 ** 20:
            groups = [dataclasses.replace(g, pair=g.pair_of(lay)) for g in groups]
        return dict(groups=groups, inverse=slot_of_token, of=lay.index)
    # keyed by the layout's index tensor, which the entry holds ('of'): no other tensor can take its id
    got = cache.get(('buckets', id(lay.index), BUCKET_FILL), lay.index.device, build)
    return got['groups'], got['inverse']


def get_layout(cache: GridCache, spec: StripSpec, h: int, w: int, device: torch.device,
               shifted: bool = False) -> StripLayout:
    """The strip layout of an ``h x w`` grid, built once per (grid, device) and kept in ``cache``."""
    fields = cache.get((spec, h, w, shifted), device, lambda: spec.build(h, w, shifted).tensors())
    return StripLayout(**fields)


class RSTBlock(nn.Module):
    """``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` on NHWC maps (strip layout given by the stage)."""

    def __init__(self, dim: int, num_heads: int, spec: StripSpec, mlp_ratio: float = 4., qkv_bias: bool = True,
                 strip_bias: bool = True, proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, attn_backend: str = 'auto'):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = StripAttention(dim, num_heads, spec, qkv_bias, strip_bias, attn_drop, proj_drop, attn_backend)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, layout: StripLayout, pos: Optional[LayerPos] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), layout, pos))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class RSTStage(nn.Module):
    """Downsampling, then blocks alternating plain / shifted strip layouts; shares layouts and the state
    of its rotary encoding (``rope``, a :class:`~visionpe.pos.base.PosEncoding` over the stage's grid)."""

    def __init__(self, downsample: Optional[nn.Module], blocks: List[RSTBlock], spec: StripSpec, shift: bool,
                 rope: Optional[PosEncoding]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.spec, self.shift = spec, shift
        self.rope = rope
        self.grad_checkpointing = False
        self._layouts = GridCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        B, H, W, C = x.shape
        layouts = [get_layout(self._layouts, self.spec, H, W, x.device, shifted=s)
                   for s in ((False, True) if self.shift and len(self.blocks) > 1 else (False,))]
        state = self.rope.prepare(Grid(H, W, 0)) if self.rope is not None else None
        for i, blk in enumerate(self.blocks):
            pos = LayerPos(self.rope, i, state) if self.rope is not None else None
            x = maybe_checkpoint(self.grad_checkpointing, blk, x, layouts[i % len(layouts)], pos)
        return x


class RadialStripTransformer(HierarchicalBase):
    """4-stage backbone with radial-strip attention (see module docstring).

    Args (per-stage ones take 4 values or one for all; the others are
    :class:`~visionpe.models._hierarchical.HierarchicalBase`'s, e.g. ``img_size``, ``dynamic_img_size``):
        strips: ``'polar'`` or ``'row'``.
        num_sectors, ring_width, azimuth_bins: polar strips (``azimuth_bins`` a multiple of ``num_sectors``;
            ``azimuth_bins / num_sectors`` azimuth offsets per strip; ring width in tokens).
        strip_len: row strips' ``Ww``.
        shift: alternate plain and half-shifted (polar) / transposed (row) strips between blocks.
        strip_bias: the Fourier bias tables; rope: 2-D RoPE over polar coordinates (theta ``rope_theta``).
    """

    def __init__(
            self,
            embed_dim: int = 96,
            depth: IntOr4 = (2, 2, 6, 2),
            num_heads: IntOr4 = (3, 6, 12, 24),
            strips: str = 'polar',
            num_sectors: IntOr4 = (16, 8, 4, 1),
            ring_width: IntOr4 = (4, 4, 4, 8),
            azimuth_bins: IntOr4 = (128, 64, 32, 16),
            strip_len: IntOr4 = (56, 28, 14, 7),
            shift: bool = True,
            strip_bias: bool = True,
            rope: bool = True,
            rope_theta: float = 100.,
            **kwargs: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, **kwargs)
        depth, num_heads = to_4(depth, 'depth'), to_4(num_heads, 'num_heads')
        sectors, rings = to_4(num_sectors, 'num_sectors'), to_4(ring_width, 'ring_width')
        bins, lens = to_4(azimuth_bins, 'azimuth_bins'), to_4(strip_len, 'strip_len')
        self.strips = strips
        for i, (d, h) in enumerate(zip(self.dims, num_heads)):
            if d % h:
                raise ValueError(f'stage {i}: width {d} is not divisible by {h} heads')
            if rope and (d // h) % 4:
                raise ValueError(f'stage {i}: 2-D RoPE needs a head dim divisible by 4, got {d // h} '
                                 f'(use other num_heads or rope=False)')
        stages = []
        for i, dpr in enumerate(self.drop_path_rates(depth)):
            spec = StripSpec(strips, strip_len=lens[i], num_sectors=sectors[i], ring_width=rings[i],
                             azimuth_bins=bins[i])
            blocks = [RSTBlock(self.dims[i], num_heads[i], spec, self.mlp_ratio, self.qkv_bias, strip_bias,
                               self.proj_drop_rate, self.attn_drop_rate, dp, self.norm_layer, self.attn_backend)
                      for dp in dpr]
            pe = None
            if rope:
                side = tuple(s // (4 * 2 ** i) for s in self.img_size)
                ctx = EncodingContext(dim=self.dims[i], depth=depth[i], num_heads=num_heads[i], grid_size=side,
                                      num_prefix_tokens=0)
                pe = build_encoding('rope2d', ctx, rope_type='axial', theta=rope_theta, coord_mode='polar')
            down = ConvMerge(self.dims[i - 1], self.dims[i], self.norm_layer) if i else None
            stages.append(RSTStage(down, blocks, spec, shift, pe))
        self.stages = nn.Sequential(*stages)
        self._finish()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {n for n, _ in self.named_parameters() if '.rel_pos.' in n}


# ---------------------------------------------------------------------------------------------
# The official block (reference for the golden sets): NCHW, nn.LayerNorm before RSAS, WithBias
# LayerNorm (= LayerNorm over channels, eps 1e-5) before the DFFN.
class DFFN(nn.Module):
    """Frequency-domain FFN (FFTformer / RST): ``project_in`` 1x1 conv to 2 x hidden, per 8x8 patch
    ``irfft2(rfft2(x) * fft)``, depthwise 3x3 conv, ``gelu(x1) * x2``, ``project_out`` 1x1 conv.
    H and W must be multiples of the patch size (8)."""

    def __init__(self, dim: int, ffn_expansion_factor: float = 2.66, bias: bool = False, patch_size: int = 8):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.patch_size = patch_size
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, stride=1, padding=1, groups=hidden * 2,
                                bias=bias)
        self.fft = nn.Parameter(torch.ones(hidden * 2, 1, 1, patch_size, patch_size // 2 + 1))
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f'DFFN filters {p}x{p} patches in the frequency domain: H and W must be multiples of '
                             f'{p}, got {H}x{W} (pad or crop the map)')
        x = self.project_in(x)
        c = x.shape[1]
        patches = x.reshape(B, c, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5)
        patches = torch.fft.irfft2(torch.fft.rfft2(patches.float()) * self.fft, s=(p, p))
        x = patches.permute(0, 1, 2, 4, 3, 5).reshape(B, c, H, W).to(x.dtype)
        x1, x2 = self.dwconv(x).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class RSASBlock(nn.Module):
    """Official ``TransformerBlock(att=True)``: ``x + RSAS(LN(x))`` then ``x + DFFN(LN(x))``, NCHW.

    ``input_resolution = (H_res, W_res)`` fixes the strips to ``1 x W_res`` (any map size runs: a
    width that is not a multiple gets a masked shorter last strip); ``theta_max`` is upstream's
    radius-term frequency numerator (3.0 with the distortion the training code feeds).
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], ffn_expansion_factor: float = 2.66,
                 bias: bool = False, theta_max: float = 3.0, drop_path: float = 0., attn_backend: str = 'auto'):
        super().__init__()
        spec = StripSpec('row', strip_len=int(input_resolution[1]), rad_freq=theta_max / input_resolution[0])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = StripAttention(dim, 1, spec, qkv_bias=True, attn_backend=attn_backend)
        self.norm2 = LayerNorm2d(dim, eps=1e-5)
        self.ffn = DFFN(dim, ffn_expansion_factor, bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        t = x.permute(0, 2, 3, 1)
        t = t + self.drop_path(self.attn(self.norm1(t)))
        return t.permute(0, 3, 1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_branch(x)
        return x + self.ffn(self.norm2(x))


# ---------------------------------------------------------------------------------------------
# Presets: Swin-T / Swin-S shapes (head dim 32) with polar strips.
RST_SIZES: Dict[str, Tuple[str, Dict[str, Any]]] = {
    'tiny': ('RST-T: 96 wide, depths 2-2-6-2, polar radial strips + polar RoPE',
             dict(embed_dim=96, depth=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))),
    'small': ('RST-S: 96 wide, depths 2-2-18-2, polar radial strips + polar RoPE',
              dict(embed_dim=96, depth=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))),
}
RST_DEFAULTS: Dict[str, Any] = dict(mlp_ratio=4., qkv_bias=True, strips='polar', num_sectors=(16, 8, 4, 1),
                                    ring_width=(4, 4, 4, 8), azimuth_bins=(128, 64, 32, 16), shift=True,
                                    strip_bias=True, rope=True, norm_eps=1e-5)


RST_PRESETS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    f'rst_{size}': (desc, {**RST_DEFAULTS, **kw}) for size, (desc, kw) in RST_SIZES.items()}

register_presets(__name__, RST_PRESETS, model_builder(RadialStripTransformer, (0, 1, 2, 3)), {
    n: default_cfg(input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9, first_conv='stem.conv',
                   classifier='head.fc') for n in RST_PRESETS})
