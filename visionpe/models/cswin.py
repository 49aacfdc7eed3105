"""CSWin Transformer with LePE (Dong et al., "CSWin Transformer: A General Vision Transformer Backbone
with Cross-Shaped Windows", CVPR 2022; microsoft/CSWin-Transformer ``models/cswin.py``;
docs/encodings.md, "CSWin: LePE"). Registered presets ``cswin_<size>``.

Per block the channels (and heads) split in half: the first half attends inside *vertical* stripes
(full height x ``sw`` columns), the second inside *horizontal* stripes (``sw`` rows x full width);
the last stage attends globally (one branch over all channels). Each branch adds LePE
(:class:`visionpe.pos.lepe.LePE`, a depthwise 3x3 conv of V inside each stripe) to its attention
output. Stem: Conv 7x7 / stride 4 / padding 2 + LayerNorm; between stages Conv 3x3 / stride 2 /
padding 1 + LayerNorm; head: final LayerNorm, mean over tokens, Linear. LayerNorm eps 1e-5.

Unlike upstream, which needs square inputs whose stage sides divide by the stripe width, any H x W
runs: a branch pads its map (after the qkv projection, with zeros) to a multiple of its stripe
width and masks the padded keys, so they get exactly zero attention weight, and their V = 0 acts as
LePE's zero padding. Map sides are ``floor((H + 1) / 4)`` after the stem and ``ceil(s / 2)`` after each
merge, so every H, W >= 3 works; the feature strides are exactly 4, 8, 16, 32 when H and W are
multiples of 32.

Upstream quirk kept for checkpoint compatibility: a non-last stage whose side at the constructor
``img_size`` (``img_size // 4 / 8 / 16``) equals its stripe width is built as a single full-attention
branch (different state dict). The structure is fixed at construction; other input sizes keep it.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, calculate_drop_path_rates
from timm.models._manipulate import checkpoint

from ..attention import _check as check_backend
from ..attention import attend
from ..grid import GridCache
from ..pos.lepe import LePE
from ._hierarchical import ConvMerge, ConvStem, HierarchicalBase, IntOr4, to_4
from ._registry import default_cfg, model_builder, register_presets

__all__ = ['CSWinTransformer', 'CSWinBlock', 'CSWinAttention', 'StripeAttention', 'ConvStem', 'ConvMerge',
           'CSWIN_SIZES']

class StripeAttention(nn.Module):
    """One CSWin branch: attention inside stripes plus LePE (upstream ``LePEAttention``).

    ``orientation``: ``'vertical'`` (windows H x sw), ``'horizontal'`` (sw x W) or ``'full'``
    (the whole map). Input: the branch's slice of the fused qkv, (B, H, W, 3, C); output (B, H, W, C).
    """

    def __init__(self, dim: int, num_heads: int, split_size: int, orientation: str, attn_drop: float = 0.,
                 attn_backend: str = 'auto'):
        super().__init__()
        if orientation not in ('vertical', 'horizontal', 'full'):
            raise ValueError(f"orientation must be 'vertical', 'horizontal' or 'full', got {orientation!r}")
        if dim % num_heads:
            raise ValueError(f'branch width {dim} is not divisible by its {num_heads} heads')
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.split_size = split_size
        self.orientation = orientation
        self.attn_drop = attn_drop
        self.attn_backend = check_backend(attn_backend)
        self.lepe = LePE(dim)
        self._masks = GridCache()

    def window_size(self, H: int, W: int) -> Tuple[int, int]:
        if self.orientation == 'vertical':
            return H, self.split_size
        if self.orientation == 'horizontal':
            return self.split_size, W
        return H, W

    def _key_mask(self, H: int, W: int, Hs: int, Ws: int, device: torch.device) -> torch.Tensor:
        """(1, windows * heads, L, L) additive mask: -inf on padded keys, 0 elsewhere."""
        def build():
            nh, nw = -(-H // Hs), -(-W // Ws)
            rows = torch.arange(nh * Hs).view(nh, 1, Hs, 1) < H
            cols = torch.arange(nw * Ws).view(1, nw, 1, Ws) < W
            valid = (rows & cols).reshape(nh * nw, 1, 1, Hs * Ws)
            mask = torch.zeros(valid.shape).masked_fill(~valid, float('-inf'))
            L = Hs * Ws
            return mask.expand(nh * nw, self.num_heads, L, L).reshape(1, nh * nw * self.num_heads, L, L)
        return self._masks.get((H, W, Hs, Ws), device, build)

    def partition(self, qkv: torch.Tensor):
        """Pad and split into windows: q, k, v of shape (B, windows * heads, L, d) and the key mask."""
        B, H, W, three, C = qkv.shape
        Hs, Ws = self.window_size(H, W)
        Hp, Wp = -(-H // Hs) * Hs, -(-W // Ws) * Ws
        padded = (Hp, Wp) != (H, W)
        if padded:  # zeros after the projection: V = 0 there, i.e. LePE's zero padding
            qkv = F.pad(qkv, (0, 0, 0, 0, 0, Wp - W, 0, Hp - H))
        nh, nw = Hp // Hs, Wp // Ws
        t = qkv.reshape(B, nh, Hs, nw, Ws, 3, self.num_heads, self.head_dim)
        t = t.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B, nh * nw * self.num_heads, Hs * Ws, self.head_dim)
        q, k, v = t.unbind(0)
        mask = self._key_mask(H, W, Hs, Ws, qkv.device) if padded else None
        return q, k, v, mask, (B, H, W, Hs, Ws, nh, nw)

    def merge(self, out: torch.Tensor, meta) -> torch.Tensor:
        B, H, W, Hs, Ws, nh, nw = meta
        out = out.reshape(B, nh, nw, self.num_heads, Hs, Ws, self.head_dim)
        out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, nh * Hs, nw * Ws, self.dim)
        return out[:, :H, :W] if (nh * Hs, nw * Ws) != (H, W) else out

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v, mask, meta = self.partition(qkv)
        out, _ = attend(q, k, v, self.scale, bias=mask, backend=self.attn_backend,
                        dropout_p=self.attn_drop, training=self.training)
        B, Hs, Ws = meta[0], meta[3], meta[4]
        windows = q.shape[1] // self.num_heads
        shape = (B * windows, self.num_heads, Hs * Ws, self.head_dim)
        out = self.lepe.value(out.reshape(shape), v.reshape(shape), (Hs, Ws))
        return self.merge(out, meta)

    def extra_repr(self) -> str:
        sw = '' if self.orientation == 'full' else f', split_size={self.split_size}'
        return f'{self.orientation}, dim={self.dim}, heads={self.num_heads}{sw}, backend={self.attn_backend}'


class CSWinAttention(nn.Module):
    """Fused qkv, two stripe branches on the channel halves (or one full branch), output projection."""

    def __init__(self, dim: int, num_heads: int, split_size: int, full: bool, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., attn_backend: str = 'auto'):
        super().__init__()
        self.dim = dim
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if full:
            self.branches = nn.ModuleList([
                StripeAttention(dim, num_heads, split_size, 'full', attn_drop, attn_backend)])
        else:
            if dim % 2 or num_heads % 2:
                raise ValueError(f'a two-branch CSWin block needs an even width and head count, got dim {dim} '
                                 f'and {num_heads} heads')
            self.branches = nn.ModuleList([
                StripeAttention(dim // 2, num_heads // 2, split_size, o, attn_drop, attn_backend)
                for o in ('vertical', 'horizontal')])
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, C)
        if len(self.branches) == 1:
            x = self.branches[0](qkv)
        else:
            half = C // 2
            x = torch.cat([self.branches[0](qkv[..., :half]), self.branches[1](qkv[..., half:])], dim=-1)
        return self.proj_drop(self.proj(x))


class CSWinBlock(nn.Module):
    """``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` on NHWC maps."""

    def __init__(self, dim: int, num_heads: int, split_size: int, full: bool, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, act_layer: Callable[..., nn.Module] = nn.GELU,
                 attn_backend: str = 'auto'):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = CSWinAttention(dim, num_heads, split_size, full, qkv_bias, attn_drop, proj_drop, attn_backend)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """Optional downsampling (``ConvMerge``) followed by blocks; NHWC in and out."""

    def __init__(self, downsample: Optional[nn.Module], blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for blk in self.blocks:
                x = checkpoint(blk, x)
            return x
        return self.blocks(x)


class CSWinTransformer(HierarchicalBase):
    """CSWin: cross-shaped stripe attention with LePE, 4 stages at strides 4, 8, 16, 32.

    Args:
        img_size: default input size (strict unless ``dynamic_img_size``); also decides the upstream
            "stage side == stripe width" full-attention switch at construction.
        embed_dim: stage-1 width (stage i has ``embed_dim * 2**i`` channels).
        depth, num_heads, split_size: per stage (4 values); ``split_size[-1]`` is unused (global).
        norm_eps: LayerNorm epsilon (upstream 1e-5).
        attn_backend: ``auto | math | sdpa | xformers | flex`` (:mod:`visionpe.attention`).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depth: IntOr4 = (1, 2, 21, 1),
            num_heads: IntOr4 = (2, 4, 8, 16),
            split_size: IntOr4 = (1, 2, 7, 7),
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_eps: float = 1e-5,
            dynamic_img_size: bool = False,
            attn_backend: str = 'auto',
    ) -> None:
        super().__init__()
        depth, num_heads = to_4(depth, 'depth'), to_4(num_heads, 'num_heads')
        split_size = to_4(split_size, 'split_size')
        if any(s < 1 for s in split_size):
            raise ValueError(f'split_size (stripe widths) must be >= 1, got {split_size}')
        check_backend(attn_backend)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self._setup(in_chans, num_classes, global_pool, img_size, dynamic_img_size, embed_dim)
        self.split_size = split_size

        self.stem = ConvStem(in_chans, embed_dim, norm_layer)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depth), stagewise=False)
        stages, k = [], 0
        for i in range(4):
            side = [s // (4 * 2 ** i) for s in self.img_size]
            full = i == 3 or side[0] == side[1] == split_size[i]  # upstream: last stage, or side == sw
            blocks = [CSWinBlock(self.dims[i], num_heads[i], split_size[i], full, mlp_ratio, qkv_bias,
                                 proj_drop_rate, attn_drop_rate, dpr[k + j], norm_layer, nn.GELU, attn_backend)
                      for j in range(depth[i])]
            k += depth[i]
            down = ConvMerge(self.dims[i - 1], self.dims[i], norm_layer) if i else None
            stages.append(Stage(down, blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.dims[-1])
        self._finish(num_classes, global_pool, drop_rate)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()


# ---------------------------------------------------------------------------------------------
# Presets (upstream factories CSWin_64_12211_tiny_224, CSWin_64_24322_small_224, CSWin_96_24322_base_224,
# CSWin_144_24322_large_224, and the 384 fine-tunes with stripe widths 12 in stages 3-4).
CSWIN_SIZES: Dict[str, Tuple[str, Dict[str, Any]]] = {
    'tiny': ('CSWin-T (64, depths 1-2-21-1), 224 px',
             dict(embed_dim=64, depth=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7))),
    'small': ('CSWin-S (64, depths 2-4-32-2), 224 px',
              dict(embed_dim=64, depth=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7))),
    'base': ('CSWin-B (96, depths 2-4-32-2), 224 px',
             dict(embed_dim=96, depth=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), split_size=(1, 2, 7, 7))),
    'large': ('CSWin-L (144, depths 2-4-32-2), 224 px',
              dict(embed_dim=144, depth=(2, 4, 32, 2), num_heads=(6, 12, 24, 24), split_size=(1, 2, 7, 7))),
    'base_384': ('CSWin-B at 384 px (stripe widths 1-2-12-12)',
                 dict(embed_dim=96, depth=(2, 4, 32, 2), num_heads=(4, 8, 16, 32), split_size=(1, 2, 12, 12),
                      img_size=384)),
    'large_384': ('CSWin-L at 384 px (stripe widths 1-2-12-12)',
                  dict(embed_dim=144, depth=(2, 4, 32, 2), num_heads=(6, 12, 24, 24), split_size=(1, 2, 12, 12),
                       img_size=384)),
}
CSWIN_DEFAULTS: Dict[str, Any] = dict(mlp_ratio=4., qkv_bias=True, norm_eps=1e-5)


def _cfg(size: int) -> Dict[str, Any]:
    return default_cfg(input_size=(3, size, size), pool_size=(size // 32, size // 32),
                       crop_pct=0.9 if size == 224 else 1.0, fixed_input_size=False,
                       first_conv='stem.conv', classifier='head.fc', license='mit')


CSWIN_PRESETS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    f'cswin_{size}': (desc, {**CSWIN_DEFAULTS, **kw}) for size, (desc, kw) in CSWIN_SIZES.items()}

register_presets(__name__, CSWIN_PRESETS, model_builder(CSWinTransformer, (0, 1, 2, 3)),
                 {n: _cfg(kw.get('img_size', 224)) for n, (_, kw) in CSWIN_PRESETS.items()})
