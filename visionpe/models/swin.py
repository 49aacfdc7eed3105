"""Swin Transformer with relative position bias or 2-D RoPE in its windows; presets ``swin_<pe>_<size>``.

Swin (Liu et al., ICCV 2021) as timm's ``swin_transformer`` builds it, with timm's parts (PatchEmbed,
PatchMerging, Mlp, DropPath, ClassifierHead, window partition helpers, window-size rules) and timm's
key names (``layers.{i}.blocks.{j}.attn.relative_position_bias_table`` ...), so timm Swin checkpoints
load one to one. What changes:

* attention runs through :mod:`visionpe.attention` (math | sdpa | xformers | flex). Whenever a
  window mask exists (shifted windows or padding), windows are folded into the head axis:
  q, k, v ``(B, nW * heads, N, d)`` with one 4-D bias ``(1, nW * heads, N, N)`` = position bias +
  mask, so the bias never grows with the batch (timm expands it to ``(B * nW, heads, N, N)``);
* position inside a window is any of: Swin's bias table (``rel_pos_bias='table'``, docs/encodings.md,
  "Swin"), SwinV2's continuous log-spaced bias (``'cpb'``), and/or a rotary encoding from
  :mod:`visionpe.pos` on window-local coordinates (``pe='rope2d'``: RoPE-ViT's Swin, same
  section; one encoding per stage, RoPE-Mixed frequencies ``layers.{i}.pe.freqs`` of shape
  ``(2, depth_i, heads_i, d_i / 2)``, no weight decay); ``coord_aug`` moves those window-local
  coordinates in training (DINOv3's shift / jitter / rescale, one draw per batch shared by every
  window and stage; the shift cancels in a relative rotation, jitter and rescale change the steps);
* any input size, two ways (per-call with ``dynamic_img_size=True``, chosen by ``window_policy``):
  ``'keep'`` keeps every window and pads the map to a window multiple; with ``pad_mask=True``
  (default) padded keys get exactly zero attention weight, with ``pad_mask=False`` the padded
  tokens are attended as timm does. ``'scale'`` grows each stage's window with the patch grid
  (``window * grid // train_grid``, timm's ``set_input_size`` rule; RoPE-ViT's Swin), resampling
  a bias table on the fly (``rpb_resize``) and padding only what is left over.
  ``set_input_size(img_size)`` follows timm: windows scale with the grid and bias tables are
  resampled in place; pass ``window_size=`` to keep them.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, to_2tuple, to_ntuple
from timm.models._input import update_model_input_size
from timm.models.swin_transformer import (PatchMerging, calc_stage_window_sizes, resolve_stage_window_sizes,
                                          resolve_window_args, window_partition, window_reverse)
from timm.models.vision_transformer import init_weights_vit_timm

from ..attention import check_backend, resolve_backend, run_backend
from ..grid import CoordAug, CoordDraw, Grid, GridCache
from ..pos import EncodingContext, build_encoding, check_coord_aug
from ..pos.base import LayerPos, PosEncoding
from ._base import TimmBackbone, maybe_checkpoint
from ._hierarchical import ClassifierHeadMixin
from ._window import (RPB_RESIZE_MODES, bias_from_table, continuous_bias, log_spaced_coords, make_cpb_mlp,
                      relative_position_index, resize_rpb_table)
from ._registry import default_cfg, model_builder, register_presets

__all__ = ['SwinTransformer', 'SwinTransformerStage', 'SwinTransformerBlock', 'WindowAttention',
           'window_attention_mask', 'SWIN_SIZES', 'SWIN_ENCODINGS', 'SWIN_DEFAULTS',
           'SHIFT_MASK_VALUE', 'PAD_MASK_VALUE']

Window = Tuple[int, int]
#: logit offset between tokens of different shifted regions (timm's value; exp(-100) ~ 4e-44)
SHIFT_MASK_VALUE = -100.
#: logit offset of padded keys: exp of it underflows to exactly 0 in fp32, bf16 and fp16
PAD_MASK_VALUE = -1e4
REL_POS_BIAS = ('table', 'cpb', 'none')
WINDOW_POLICIES = ('keep', 'scale')


def _region_labels(n: int, window: int, shift: int) -> torch.Tensor:
    """timm's shifted-window region ids along one padded axis (later slices overwrite earlier ones)."""
    lab = torch.zeros(n, dtype=torch.long)
    for i, (a, b) in enumerate(((0, -window), (-window, -shift), (-shift, None))):
        lab[a:b] = i
    return lab


def window_attention_mask(
        size: Tuple[int, int],
        window: Window,
        shift: Window,
        pad_mask: bool = True,
) -> Optional[torch.Tensor]:
    """Additive ``(nW, N, N)`` mask of the windows of an ``H x W`` map (rolled by ``-shift``, then padded).

    Tokens of different shifted regions see each other at ``SHIFT_MASK_VALUE``. ``pad_mask=True``:
    regions are cut at the real wrap line ``H - shift`` and padded keys get ``PAD_MASK_VALUE``
    (zero weight). ``pad_mask=False``: timm's mask, regions cut on the padded frame, padded keys
    visible. None when nothing is masked.
    """
    (H, W), (wh, ww), (sh, sw) = size, window, shift
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    padded = (Hp, Wp) != (H, W)
    if not (sh or sw) and not (pad_mask and padded):
        return None
    if pad_mask:
        ry = (torch.arange(Hp) >= H - sh).long() if sh else torch.zeros(Hp, dtype=torch.long)
        rx = (torch.arange(Wp) >= W - sw).long() if sw else torch.zeros(Wp, dtype=torch.long)
    else:
        ry, rx = _region_labels(Hp, wh, sh), _region_labels(Wp, ww, sw)
    labels = (ry[:, None] * 3 + rx[None, :]).float()
    lab = window_partition(labels[None, :, :, None], (wh, ww)).reshape(-1, wh * ww)  # (nW, N)
    mask = torch.zeros(lab.shape[0], wh * ww, wh * ww)
    mask.masked_fill_(lab[:, :, None] != lab[:, None, :], SHIFT_MASK_VALUE)
    if pad_mask and padded:
        valid = (torch.arange(Hp)[:, None] < H) & (torch.arange(Wp)[None, :] < W)
        valid = window_partition(valid[None, :, :, None].float(), (wh, ww)).reshape(-1, 1, wh * ww)
        mask.masked_fill_(valid == 0, PAD_MASK_VALUE)
    return mask


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a relative position term and visionpe's backends.

    ``relative_position_bias_table`` (``'table'``) or ``cpb_mlp`` (``'cpb'``) hold the position bias
    of the window ``window_size``; a call with another window resamples (table) or re-evaluates
    (cpb) it. q and k are rotated by ``pos`` (a rotary encoding bound to this block) when given.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            head_dim: Optional[int] = None,
            window_size: Window = (7, 7),
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            rel_pos_bias: str = 'table',
            rpb_resize: str = 'bicubic',
            cpb_hidden: int = 512,
            attn_backend: str = 'auto',
    ) -> None:
        super().__init__()
        if rel_pos_bias not in REL_POS_BIAS:
            raise ValueError(f"rel_pos_bias must be one of {', '.join(REL_POS_BIAS)}; got {rel_pos_bias!r}")
        if rpb_resize not in RPB_RESIZE_MODES:
            raise ValueError(f"rpb_resize must be one of {', '.join(RPB_RESIZE_MODES)}; got {rpb_resize!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = to_2tuple(window_size)
        self.ref_window_size = self.window_size  # cpb normalises offsets by the training window
        self.rel_pos_bias = rel_pos_bias
        self.rpb_resize = rpb_resize
        self.attn_backend = check_backend(attn_backend)
        wh, ww = self.window_size
        if rel_pos_bias == 'table':
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=.02)
        else:
            self.relative_position_bias_table = None
        self.cpb_mlp = make_cpb_mlp(num_heads, cpb_hidden) if rel_pos_bias == 'cpb' else None
        self.register_buffer('relative_position_index', relative_position_index(wh, ww), persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._cache = GridCache()

    @property
    def has_position_bias(self) -> bool:
        return self.rel_pos_bias != 'none'

    def init_non_persistent_buffers(self) -> None:
        self.relative_position_index = relative_position_index(*self.window_size, device=self.qkv.weight.device)

    def set_window_size(self, window_size: Window) -> None:
        """Change the stored window: the bias table is resampled in place (``rpb_resize``)."""
        window_size = to_2tuple(window_size)
        if window_size == self.window_size:
            return
        if self.relative_position_bias_table is not None:
            with torch.no_grad():
                table = resize_rpb_table(self.relative_position_bias_table, window_size, self.window_size,
                                         self.rpb_resize)
            self.relative_position_bias_table = nn.Parameter(
                table, requires_grad=self.relative_position_bias_table.requires_grad)
        self.window_size = window_size
        self.relative_position_index = relative_position_index(*window_size,
                                                               device=self.relative_position_index.device)
        self._cache.clear()

    def _index(self, window: Window) -> torch.Tensor:
        if window == self.window_size:
            return self.relative_position_index
        return self._cache.get(('index', window), self.qkv.weight.device, lambda: relative_position_index(*window))

    def position_bias(self, window: Window) -> Optional[torch.Tensor]:
        """``(heads, N, N)`` position bias of one window of size ``window`` (None without one)."""
        if self.rel_pos_bias == 'table':
            table = resize_rpb_table(self.relative_position_bias_table, window, self.window_size, self.rpb_resize)
            return bias_from_table(table, self._index(window))
        if self.rel_pos_bias == 'cpb':
            key = ('cpb_coords', window, self.ref_window_size)
            coords = self._cache.get(key, self.qkv.weight.device,
                                     lambda: log_spaced_coords(window, self.ref_window_size))
            return continuous_bias(self.cpb_mlp, coords.to(self.qkv.weight.dtype), self._index(window))
        return None

    def forward(
            self,
            x: torch.Tensor,
            window: Window,
            mask: Optional[torch.Tensor] = None,
            pos: Optional[LayerPos] = None,
    ) -> torch.Tensor:
        """x: ``(B * nW, N, C)`` windows. ``mask``: ``(nW, 1, N, N)`` with a position bias, else already
        folded to ``(1, nW * heads, N, N)`` (see :meth:`SwinTransformerStage.window_mask`)."""
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if pos is not None:
            q, k = pos.rotate(q, k)
        bias = self.position_bias(window)
        if bias is not None:
            bias = bias.unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            # fold windows into heads: one (1, nW * heads, N, N) bias for the whole batch
            bias = (mask + bias).reshape(1, -1, N, N) if bias is not None else mask
            batch = B_ * self.num_heads // bias.shape[1]
            # each tensor keeps its own width: an encoding may widen q and k (``keeps_head_dim=False``, PoPE)
            q, k, v = (t.reshape(batch, -1, N, t.shape[-1]) for t in (q, k, v))
        backend = resolve_backend(self.attn_backend, x.device, training=self.training)
        out, _ = run_backend(backend, q, k, v, self.scale, bias, dropout_p=self.attn_drop, training=self.training)
        out = out.reshape(B_, self.num_heads, N, self.head_dim).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f'heads={self.num_heads}, head_dim={self.head_dim}, window={self.window_size}, '
                f'rel_pos_bias={self.rel_pos_bias}, backend={self.attn_backend}')


class SwinTransformerBlock(nn.Module):
    """Swin block: ``x + attn(norm1(x))`` over (shifted) windows, then ``x + mlp(norm2(x))``.

    ``window_size`` / ``shift_size`` are timm's: the target window clipped to the stored
    ``input_resolution`` (no shift where the map fits in one window) unless ``always_partition``.
    """

    def __init__(
            self,
            dim: int,
            input_resolution: Tuple[int, int],
            num_heads: int = 4,
            head_dim: Optional[int] = None,
            window_size: Window = (7, 7),
            shifted: bool = False,
            always_partition: bool = False,
            pad_mask: bool = True,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
            **attn_kwargs: Any,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.shifted = shifted
        self.always_partition = always_partition
        self.pad_mask = pad_mask
        self.window_size, self.shift_size = self.window_shift(self.input_resolution, to_2tuple(window_size))
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, head_dim=head_dim, window_size=self.window_size,
                                    qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **attn_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def window_shift(self, resolution: Tuple[int, int], target: Optional[Window] = None) -> Tuple[Window, Window]:
        """(window, shift) for a feature map of ``resolution`` and a target window (timm's rule)."""
        if target is None:
            return self.window_size, self.shift_size
        shift = (target[0] // 2, target[1] // 2) if self.shifted else (0, 0)
        if self.always_partition:
            return tuple(target), shift
        window = tuple(r if r <= w else w for r, w in zip(resolution, target))
        shift = tuple(0 if r <= w else s for r, w, s in zip(resolution, window, shift))
        return window, shift

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Window,
                       always_partition: Optional[bool] = None) -> None:
        self.input_resolution = tuple(feat_size)
        if always_partition is not None:
            self.always_partition = always_partition
        self.window_size, self.shift_size = self.window_shift(self.input_resolution, to_2tuple(window_size))
        self.attn.set_window_size(self.window_size)

    def _attn(self, x: torch.Tensor, window: Window, shift: Window, mask: Optional[torch.Tensor],
              pos: Optional[LayerPos]) -> torch.Tensor:
        B, H, W, C = x.shape
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        pad_h, pad_w = (-H) % window[0], (-W) % window[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        windows = window_partition(x, window).reshape(-1, window[0] * window[1], C)
        windows = self.attn(windows, window, mask, pos)
        x = window_reverse(windows.reshape(-1, window[0], window[1], C), window, Hp, Wp)[:, :H, :W].contiguous()
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor, window: Optional[Window] = None, shift: Optional[Window] = None,
                mask: Optional[torch.Tensor] = None, pos: Optional[LayerPos] = None) -> torch.Tensor:
        """x: ``(B, H, W, C)``. Without ``window``/``shift`` the stored ones are used and the mask is
        built here (convenient for tests; the stage passes everything, cached)."""
        B, H, W, C = x.shape
        if window is None:
            window, shift = self.window_size, self.shift_size
            mask = _fold_mask(window_attention_mask((H, W), window, shift, self.pad_mask), self.attn)
            mask = mask.to(x.device) if mask is not None else None
        x = x + self.drop_path1(self._attn(self.norm1(x), window, shift, mask, pos))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


def _fold_mask(mask: Optional[torch.Tensor], attn: WindowAttention) -> Optional[torch.Tensor]:
    """``(nW, N, N)`` -> ``(nW, 1, N, N)`` (added to a position bias) or ``(1, nW * heads, N, N)``."""
    if mask is None:
        return None
    nw, n, _ = mask.shape
    if attn.has_position_bias:
        return mask.unsqueeze(1)
    return mask.unsqueeze(1).expand(nw, attn.num_heads, n, n).reshape(1, nw * attn.num_heads, n, n)


class SwinTransformerStage(nn.Module):
    """Patch merging (stages > 0), then ``depth`` blocks alternating plain and shifted windows.

    Owns the stage's rotary encoding (``pe``, built on the window grid) and a cache of window masks.
    ``block_kwargs`` go to every :class:`SwinTransformerBlock` (``num_heads``, ``window_size``, ...).
    """

    def __init__(
            self,
            dim: int,
            out_dim: int,
            input_resolution: Tuple[int, int],
            depth: int,
            downsample: bool = True,
            drop_path: Union[List[float], float] = 0.,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
            pe: Optional[str] = None,
            pe_options: Optional[Dict[str, Any]] = None,
            **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.output_resolution = tuple((i + 1) // 2 for i in input_resolution) if downsample else self.input_resolution
        self.depth = depth
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim=dim, out_dim=out_dim, norm_layer=norm_layer) if downsample else nn.Identity()
        if not downsample and dim != out_dim:
            raise ValueError(f'a stage without downsampling keeps its width; got dim {dim} -> out_dim {out_dim}')
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(
                out_dim, self.output_resolution, shifted=i % 2 == 1, norm_layer=norm_layer,
                drop_path=drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path, **block_kwargs)
            for i in range(depth)])
        attn = self.blocks[0].attn
        self.pe: Optional[PosEncoding] = None
        if pe is not None:
            ctx = EncodingContext(dim=attn.head_dim * attn.num_heads, depth=depth, num_heads=attn.num_heads,
                                  grid_size=self.blocks[0].window_size, num_prefix_tokens=0)
            self.pe = build_encoding(pe, ctx, **(pe_options or {}))
            if not self.pe.qk_only:
                raise ValueError(
                    f"position encoding {pe!r} acts through {sorted(self.pe.hooks)}; Swin windows take encodings "
                    f"that act on q and k only (capability PosEncoding.qk_only: hook 'rotate', e.g. pe='rope2d' "
                    f"or 'pope2d'); window bias comes from rel_pos_bias='table' or 'cpb'")
        self._masks = GridCache(max_entries=16)

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Window,
                       always_partition: Optional[bool] = None) -> None:
        self.input_resolution = tuple(feat_size)
        self.output_resolution = self.input_resolution if isinstance(self.downsample, nn.Identity) \
            else tuple((i + 1) // 2 for i in feat_size)
        old = self.blocks[0].window_size
        for block in self.blocks:
            block.set_input_size(self.output_resolution, window_size, always_partition)
        if self.pe is not None:
            self.pe.set_grid_size(self.blocks[0].window_size, old)
        self._masks.clear()

    def window_mask(self, size: Tuple[int, int], window: Window, shift: Window, block: SwinTransformerBlock):
        """Cached mask of one block, shaped for its attention (see :func:`_fold_mask`)."""
        attn = block.attn
        key = (size, window, shift, block.pad_mask, attn.has_position_bias, attn.num_heads)
        return self._masks.get(key, attn.qkv.weight.device,
                               lambda: _fold_mask(window_attention_mask(size, window, shift, block.pad_mask), attn))

    def forward(self, x: torch.Tensor, window: Optional[Window] = None,
                aug: Optional[CoordDraw] = None) -> torch.Tensor:
        """x: ``(B, H, W, C)``; ``window``: this call's target window (None: the stored ones); ``aug``: the
        coordinate draw of this call (training with ``coord_aug``), applied to the window-local coordinates."""
        x = self.downsample(x)
        size = (x.shape[1], x.shape[2])
        states: Dict[Window, Any] = {}
        for j, blk in enumerate(self.blocks):
            win, shift = blk.window_shift(size, window)
            mask = self.window_mask(size, win, shift, blk)
            pos = None
            if self.pe is not None:
                if win not in states:
                    states[win] = self.pe.prepare(Grid(win[0], win[1], 0, aug=aug))
                pos = LayerPos(self.pe, j, states[win])
            x = maybe_checkpoint(self.grad_checkpointing, blk, x, win, shift, mask, pos)
        return x


class SwinTransformer(ClassifierHeadMixin, TimmBackbone):
    """Swin Transformer (timm's layout and key names) with a choice of window position encoding.

    Args beyond timm's ``SwinTransformer`` ones:
        rel_pos_bias: ``'table'`` (Swin), ``'cpb'`` (SwinV2's continuous log-spaced bias, hidden
            width ``cpb_hidden``) or ``'none'``.
        rpb_resize: how a bias table is resampled to another window: ``'bicubic'`` or ``'beit'``
            (timm's ``resize_rel_pos_bias_table``, what timm's own ``set_input_size`` uses).
        window_policy: per-call behaviour at another input size with ``dynamic_img_size=True``:
            ``'keep'`` the windows and pad, or ``'scale'`` them with the patch grid.
        pad_mask: padded keys get zero attention weight (True) or are attended like timm (False).
        pe: a rotary encoding from :mod:`visionpe.pos` applied on window-local coordinates (one per
            stage, built on the window grid); every remaining keyword is an option of it.
        coord_aug: coordinate augmentation of ``pe``'s window-local coordinates in training,
            ``dict(shift=, jitter=, rescale=)`` (:class:`visionpe.grid.CoordAug`); one draw per batch.
        attn_backend: ``auto | math | sdpa | xformers | flex`` (see :mod:`visionpe.attention`).
    """

    units_attr = 'layers'
    stem_pattern = r'^patch_embed'

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: Union[int, Sequence[int]] = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (3, 6, 12, 24),
            head_dim: Optional[int] = None,
            window_size: Union[int, Window, Sequence[Union[int, Window]]] = 7,
            always_partition: bool = False,
            strict_img_size: bool = True,
            dynamic_img_size: bool = False,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0., proj_drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
            norm_eps: float = 1e-5,
            rel_pos_bias: str = 'table',
            rpb_resize: str = 'bicubic',
            cpb_hidden: int = 512,
            window_policy: str = 'keep',
            pad_mask: bool = True,
            attn_backend: str = 'auto',
            pe: Optional[str] = None,
            coord_aug: Optional[Union[Dict[str, Any], CoordAug]] = None,
            **pe_options: Any,
    ) -> None:
        super().__init__()
        if window_policy not in WINDOW_POLICIES:
            raise ValueError(f"window_policy must be one of {', '.join(WINDOW_POLICIES)}; got {window_policy!r}")
        if pe is None and pe_options:
            raise TypeError(f"unknown argument(s) {', '.join(sorted(pe_options))} (no position encoding 'pe' "
                            f"is set, so they cannot be encoding options)")
        if dynamic_img_size:
            strict_img_size = False
        self.dynamic_img_size = not strict_img_size
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        self.window_policy = window_policy
        self.attn_backend = attn_backend
        self.num_layers = len(depths)
        if not isinstance(embed_dim, (tuple, list)):
            embed_dim = [int(embed_dim * 2 ** i) for i in range(self.num_layers)]
        self.embed_dim = embed_dim[0]
        self.num_features = embed_dim[-1]
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim[0], norm_layer=norm_layer,
                                      strict_img_size=strict_img_size, output_fmt='NHWC')
        patch_grid = tuple(self.patch_embed.grid_size)
        windows = resolve_stage_window_sizes(window_size, self.num_layers)
        self._ref_window_sizes = windows  # set_input_size / window_policy='scale' scale these with the grid
        self._ref_grid_size = patch_grid
        head_dim = to_ntuple(self.num_layers)(head_dim)
        for i, (width, heads) in enumerate(zip(embed_dim, num_heads)):  # as ViT: no silently truncated head dim
            if head_dim[i] is None and width % heads:
                raise ValueError(f'stage {i}: width {width} is not divisible by num_heads {heads}; choose num_heads '
                                 f'that divide embed_dim * 2**stage, or set head_dim')
        mlp_ratio = to_ntuple(self.num_layers)(mlp_ratio)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        attn_kwargs = dict(rel_pos_bias=rel_pos_bias, rpb_resize=rpb_resize, cpb_hidden=cpb_hidden,
                           attn_backend=attn_backend)
        self.feature_info: List[Dict[str, Any]] = []
        layers, in_dim, scale = [], embed_dim[0], 1
        for i in range(self.num_layers):
            layers.append(SwinTransformerStage(
                in_dim, embed_dim[i], ((patch_grid[0] + scale - 1) // scale, (patch_grid[1] + scale - 1) // scale),
                depths[i], downsample=i > 0, num_heads=num_heads[i], head_dim=head_dim[i], window_size=windows[i],
                always_partition=always_partition, pad_mask=pad_mask, mlp_ratio=mlp_ratio[i], qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
                pe=pe, pe_options=pe_options, **attn_kwargs))
            in_dim = embed_dim[i]
            if i > 0:
                scale *= 2
            self.feature_info.append(dict(num_chs=embed_dim[i], reduction=patch_size * scale, module=f'layers.{i}'))
        self.layers = nn.ModuleList(layers)
        self.coord_aug = self._check_coord_aug(CoordAug.from_option(coord_aug))
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt='NHWC')
        self.head_hidden_size = self.head.num_features
        self.init_weights()

    # ------------------------------------------------------------------ init / timm housekeeping
    def init_weights(self) -> None:
        if self.patch_embed.proj.weight.is_meta:
            return  # built on the meta device: no values to initialise (materialise, then load or init)
        for name, m in self.named_modules():
            if name == '' or re.search(r'(^|\.)pe(\.|$)', name):
                continue  # encodings initialise their own parameters
            init_weights_vit_timm(m, name, needs_reset=False)  # Linear: trunc-normal(0.02), zero bias

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        out = {n for n, _ in self.named_parameters() if 'relative_position_bias_table' in n or '.cpb_mlp.' in n}
        for i, stage in enumerate(self.layers):
            if stage.pe is not None:
                out |= {f'layers.{i}.pe.{n}' for n in stage.pe.no_weight_decay()}
        return out

    def set_input_size(
            self,
            img_size: Optional[Tuple[int, int]] = None,
            patch_size: Optional[Tuple[int, int]] = None,
            window_size: Optional[Union[int, Window, Sequence[Union[int, Window]]]] = None,
            window_ratio: Optional[Union[int, Sequence[int]]] = None,
            always_partition: Optional[bool] = None,
    ) -> None:
        """timm semantics: windows scale with the patch grid (tables resampled in place, ``rpb_resize``)
        unless ``window_size`` (per stage or one for all) or ``window_ratio`` is given."""
        window_size, window_ratio = resolve_window_args(window_size, window_ratio, len(self.layers))
        if img_size is not None or patch_size is not None:
            self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        if patch_size is not None:
            for i, info in enumerate(self.feature_info):
                info['reduction'] = max(self.patch_embed.patch_size) * 2 ** i
        patch_grid = tuple(self.patch_embed.grid_size)
        windows = calc_stage_window_sizes(patch_grid, self._ref_window_sizes, self._ref_grid_size,
                                          window_size=window_size, window_ratio=window_ratio)
        if window_size is not None or window_ratio is not None:
            self._ref_window_sizes, self._ref_grid_size = windows, patch_grid
        for i, stage in enumerate(self.layers):
            stage_scale = 2 ** max(i - 1, 0)
            stage.set_input_size(tuple((g + stage_scale - 1) // stage_scale for g in patch_grid), windows[i],
                                 always_partition)
        update_model_input_size(self, self.patch_embed.img_size, patch_size=patch_size, window_size=windows,
                                always_partition=always_partition)

    def _check_coord_aug(self, aug: Optional[CoordAug]) -> Optional[CoordAug]:
        if aug is None or not aug.active:
            return None
        if self.layers[0].pe is None:
            raise ValueError("coord_aug needs a rotary encoding in the windows (pe='rope2d', ...): a relative "
                             "position bias table (rel_pos_bias='table' / 'cpb') reads no token coordinates; "
                             "remove coord_aug or use a swin_rope2d* preset")
        check_coord_aug(self.layers[0].pe, aug.per_sample, per_sample_ok=False,
                        where=" (in Swin: as pe= of the windows)")
        return aug

    # ------------------------------------------------------------------ forward (timm contract: TimmBackbone)
    def _call_windows(self, grid: Tuple[int, int]) -> List[Optional[Tuple[Window, ...]]]:
        """Per-stage target window of this call: None keeps the stored windows."""
        if self.window_policy == 'keep' or grid == tuple(self.patch_embed.grid_size):
            return [None] * len(self.layers)
        return list(calc_stage_window_sizes(grid, self._ref_window_sizes, self._ref_grid_size))

    def _stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, '_SwinCall']:
        x = self.patch_embed(x)
        aug = self.coord_aug.draw() if self.training and self.coord_aug is not None else None
        return x, _SwinCall(self._call_windows((x.shape[1], x.shape[2])), aug)

    def _unit(self, i: int, x: torch.Tensor, call: '_SwinCall') -> torch.Tensor:
        return self.layers[i](x, call.windows[i], call.aug)

    def _pruned(self, max_index: int) -> None:
        self._ref_window_sizes = self._ref_window_sizes[:max_index + 1]


class _SwinCall(NamedTuple):
    """What every stage needs from one forward call: target windows and the coordinate draw."""
    windows: List[Optional[Window]]
    aug: Optional[CoordDraw]


# ---------------------------------------------------------------------------------------------
# Presets: sizes x encodings, as data. Swin-T/S/B of the paper (patch 4, window 7, 224 px). The
# official recipes train with drop_path_rate 0.2 / 0.3 / 0.5 (T / S / B); presets default to 0 like
# the ViT presets, pass drop_path_rate=... to create_model (or the training config).
SWIN_DEFAULTS: Dict[str, Any] = dict(img_size=224, patch_size=4, window_size=7, mlp_ratio=4., qkv_bias=True)

SWIN_SIZES: Dict[str, Dict[str, Any]] = {
    'tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'small': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}

# name prefix -> (description, model + encoding keywords); the preset is f'{prefix}_{size}'
SWIN_ENCODINGS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    'swin': ('relative position bias table per window (Swin; timm weights load one to one)',
             dict(rel_pos_bias='table', window_policy='keep')),
    'swin_cpb': ("SwinV2's continuous log-spaced position bias (MLP), any window size",
                 dict(rel_pos_bias='cpb', window_policy='scale')),
    'swin_rope2d': ('2-D RoPE-Axial on window-local coordinates, theta 100, no bias (RoPE-ViT Swin)',
                    dict(rel_pos_bias='none', pe='rope2d', rope_type='axial', theta=100., window_policy='scale')),
    'swin_rope2d_mixed': ('2-D RoPE-Mixed on window-local coordinates, learnable frequencies, theta 10 (RoPE-ViT Swin)',
                          dict(rel_pos_bias='none', pe='rope2d', rope_type='mixed', theta=10., window_policy='scale')),
}


SWIN_PRESETS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    f'{prefix}_{size}': (f'Swin-{size} with {desc}', {**SWIN_DEFAULTS, **dims, **enc})
    for prefix, (desc, enc) in SWIN_ENCODINGS.items() for size, dims in SWIN_SIZES.items()
}

register_presets(__name__, SWIN_PRESETS,
                 model_builder(SwinTransformer, lambda kw: tuple(range(len(kw.get('depths', (2, 2, 6, 2)))))),
                 {name: default_cfg(first_conv='patch_embed.proj', classifier='head.fc', pool_size=(7, 7),
                                    crop_pct=0.9) for name in SWIN_PRESETS})
