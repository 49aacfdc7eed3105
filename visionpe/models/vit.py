"""Plain ViT that takes any position encoding; registered presets ``vit_<pe>_<size>``.

The model composes timm parts (PatchEmbed, Mlp, LayerScale, DropPath, feature helpers) with
:class:`visionpe.attention.Attention` and one :class:`visionpe.pos.base.PosEncoding`. It keeps
timm's key names (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks.{i}.attn.qkv`` ...),
so timm ViT/DeiT checkpoints map one to one; the encoding lives under ``pe.*``.

Presets are data: ``VIT_SIZES`` x ``VIT_ENCODINGS`` below, every entry overridable through
``timm.create_model(name, **kwargs)`` (model keywords and encoding options alike).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (DropPath, LayerScale, Mlp, PatchEmbed, SwiGLU, calculate_drop_path_rates, get_act_layer,
                         to_2tuple, trunc_normal_)
from timm.layers.patch_embed import PatchEmbedResamplerFixedOrigSize
from timm.models.vision_transformer import global_pool_nlc, init_weights_vit_timm

from ..attention import Attention
from ..grid import CoordAug, CoordDraw, Grid, GridCache, check_coord_mode
from ..layers import norm_layer_by_name
from ..pos import EncodingContext, build_encoding, check_coord_aug
from ..pos.absolute import SINCOS_COORD_MODE, resample_table, sample_table_cape, sincos_2d, tile_table
from ..pos.base import Knob, KnobContext, LayerPos, PosEncoding, register_knob
from ._base import TimmBackbone, maybe_checkpoint
from ._registry import default_cfg, model_builder, register_presets

__all__ = ['VisionTransformer', 'Block', 'VIT_SIZES', 'VIT_ENCODINGS', 'VIT_DEFAULTS']


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_norm: bool = False,
            proj_bias: bool = True,
            init_values: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
            attn_backend: str = 'auto',
            k_bias: bool = True,
            mlp_layer: str = 'mlp',
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
                              attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer,
                              attn_backend=attn_backend, k_bias=k_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        if mlp_layer == 'swiglu':  # SiLU(fc1_g x) * fc1_x x, hidden width rounded up to a multiple of 8 (DINOv3)
            self.mlp = SwiGLU(dim, int(dim * mlp_ratio), drop=proj_drop, align_to=8)
        else:
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, pos: Optional[LayerPos] = None) -> torch.Tensor:
        h = self.norm1(x)
        if pos is not None:
            h = pos.attn_input(h)
        x = x + self.drop_path1(self.ls1(self.attn(h, pos)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class MlpHead(nn.Module):
    """Two-layer classifier ``fc2(tanh(fc1(x)))`` (LookHere's head); ``pre_logits`` = tanh(fc1(x))."""

    def __init__(self, in_features: int, hidden_features: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.act(self.fc1(x))
        return x if pre_logits else self.fc2(x)


def _patch_size_value(p: Any) -> int:
    if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
        raise ValueError(f'--patch-sizes takes positive integers (a square patch, in pixels), got {p!r}')
    return p


def _patch_size_word(word: str) -> int:
    try:
        return _patch_size_value(int(word))
    except ValueError:
        raise ValueError(f'--patch-sizes: {word!r} is not a positive integer (or "default")') from None


def _set_patch_size(model: 'VisionTransformer', p: int, ctx: KnobContext) -> None:
    model.set_patch_size(p)


#: FlexiViT's test-time patch size (Beyer et al., CVPR 2023): the stored kernel resampled with timm's
#: pseudo-inverse resize (:meth:`VisionTransformer.set_patch_size`), undone after; the test sizes must be
#: multiples of it (checked before the sweep)
PATCH_SIZE = Knob('patch_size', 'ViT patch sizes at test time (FlexiViT: the kernel resampled with the pseudo-inverse '
                  'resize; numbers or default)', _patch_size_word, flag='--patch-sizes', check=_patch_size_value,
                  label=lambda p: f'patch={p}', rank=5, attrs=('_patch_override',), set=_set_patch_size,
                  patch=lambda p: (p, p))
register_knob(PATCH_SIZE)


class VisionTransformer(TimmBackbone):
    """ViT whose only position-dependent parts are ``pos_embed`` (absolute) and ``pe`` (any encoding).

    Args (beyond timm's VisionTransformer ones):
        pos_embed: absolute table, ``'learn'``, ``'sincos'`` (fixed, computed per grid) or ``'none'``.
        pos_embed_interp / pos_embed_antialias: how a learned table is resampled to another grid
            (timm's defaults: bicubic with antialias).
        pos_embed_coord_mode: coordinate mode of the sin-cos table (see :mod:`visionpe.grid`).
        abs_pos: how a learned table meets another grid: ``'interp'`` (resampled, ``pos_embed_interp``)
            or ``'tile'`` (window-absolute: the training-size table repeated, Bolya et al. 2023,
            "Window Attention is Bugged"; used by the detector at large inputs).
        qkv_k_bias: False holds the key part of the qkv bias at zero (DINOv3's masked k bias).
        mlp_layer: ``'mlp'`` (fc1, act, fc2) or ``'swiglu'`` (timm's SwiGLU, hidden width aligned to 8: DINOv3's
            ``plus`` sizes).
        pe: name of a registered encoding (``visionpe.pos.list_encodings()``) or None; every
            remaining keyword is an option of that encoding.
        head: ``'linear'`` or ``'mlp_tanh'`` (hidden size ``head_hidden_dim``).
        norm_layer: ``'layernorm'``, ``'rmsnorm'`` or ``'rmsnorm_eps_outside'`` (:mod:`visionpe.layers`).
        attn_backend: ``auto | math | sdpa | xformers | flex`` (see :mod:`visionpe.attention`).
        coord_aug: coordinate augmentation in training, ``dict(shift=, jitter=, rescale=, per_sample=)``
            (:class:`visionpe.grid.CoordAug`, DINOv3's semantics): every consumer of token coordinates
            (the encoding ``pe``, a sin-cos table, a learned table through CAPE sampling) gets the same draw.
        flexi_patch_sizes: FlexiViT patch-size randomisation (Beyer et al., CVPR 2023): in training every
            batch runs at a patch size drawn uniformly from this list, the kernel resampled from the stored
            one with timm's pseudo-inverse resize (``resample_patch_embed``). ``set_patch_size`` fixes it.
    """
    units_attr = 'blocks'
    norm_every_unit = True
    intermediate_fmts = ('NCHW', 'NLC')
    pad_hint = ', or create the model with dynamic_img_pad=True'
    plain_trunk = True
    stem_pattern = r'^cls_token|reg_token|pos_embed|patch_embed|norm_pre|pe\.'
    ABS_POS_MODES = ('interp', 'tile')

    test_knobs = (SINCOS_COORD_MODE, PATCH_SIZE)  # the sin-cos table's coordinate mode (pos_embed='sincos')

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qkv_k_bias: bool = True,
            mlp_layer: str = 'mlp',
            qk_norm: bool = False,
            proj_bias: bool = True,
            init_values: Optional[float] = None,
            class_token: bool = True,
            reg_tokens: int = 0,
            pos_embed: str = 'learn',
            no_embed_class: bool = False,
            pos_embed_interp: str = 'bicubic',
            pos_embed_antialias: bool = True,
            pos_embed_coord_mode: str = 'index',
            abs_pos: str = 'interp',
            pre_norm: bool = False,
            final_norm: bool = True,
            fc_norm: Optional[bool] = None,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_eps: float = 1e-6,
            norm_layer: str = 'layernorm',
            act_layer: Union[str, Callable[..., nn.Module], None] = None,
            head: str = 'linear',
            head_hidden_dim: Optional[int] = None,
            patch_bias: Optional[bool] = None,
            attn_backend: str = 'auto',
            coord_aug: Optional[Union[Dict[str, Any], CoordAug]] = None,
            flexi_patch_sizes: list[int] | None = None,
            pe: Optional[str] = None,
            **pe_options: Any,
    ) -> None:
        super().__init__()
        if global_pool not in ('', 'avg', 'token', 'max', 'avgmax'):
            raise ValueError(f"global_pool must be one of '', 'avg', 'token', 'max', 'avgmax'; got {global_pool!r}")
        if global_pool == 'token' and not class_token:
            raise ValueError("global_pool='token' needs class_token=True (use global_pool='avg' without one)")
        if pos_embed not in ('learn', 'sincos', 'none'):
            raise ValueError(f"pos_embed must be 'learn', 'sincos' or 'none'; got {pos_embed!r}")
        self.abs_pos = self.check_abs_pos(abs_pos, pos_embed)
        if mlp_layer not in ('mlp', 'swiglu'):
            raise ValueError(f"mlp_layer must be 'mlp' or 'swiglu'; got {mlp_layer!r}")
        if head not in ('linear', 'mlp_tanh'):
            raise ValueError(f"head must be 'linear' or 'mlp_tanh'; got {head!r}")
        if pe is None and pe_options:
            raise TypeError(f"unknown argument(s) {', '.join(sorted(pe_options))} (no position encoding 'pe' "
                            f"is set, so they cannot be encoding options)")
        use_fc_norm = global_pool in ('avg', 'max', 'avgmax') if fc_norm is None else fc_norm
        norm_layer = norm_layer_by_name(norm_layer, norm_eps)
        act_layer = get_act_layer(act_layer) if act_layer is not None else nn.GELU

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.attn_backend = attn_backend

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            bias=(not pre_norm) if patch_bias is None else patch_bias, output_fmt='NHWC',
            strict_img_size=not dynamic_img_size, dynamic_img_pad=dynamic_img_pad)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None

        self.pos_embed_type = pos_embed
        self.pos_embed_interp, self.pos_embed_antialias = pos_embed_interp, pos_embed_antialias
        self.pos_embed_coord_mode = check_coord_mode(pos_embed_coord_mode)
        self._ref_grid = tuple(self.patch_embed.grid_size)
        if pos_embed == 'learn':
            n = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
        else:
            self.pos_embed = None
        self._sincos = GridCache()
        self.pos_drop = nn.Dropout(pos_drop_rate)

        ctx = EncodingContext(dim=embed_dim, depth=depth, num_heads=num_heads,
                              grid_size=tuple(self.patch_embed.grid_size), num_prefix_tokens=self.num_prefix_tokens)
        self.pe: Optional[PosEncoding] = build_encoding(pe, ctx, **pe_options) if pe is not None else None

        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()
        dpr = calculate_drop_path_rates(drop_path_rate, depth)  # stochastic depth decay rule
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
                  init_values=init_values, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], act_layer=act_layer, norm_layer=norm_layer, attn_backend=attn_backend,
                  k_bias=qkv_k_bias, mlp_layer=mlp_layer)
            for i in range(depth)])
        reduction = self.patch_embed.feat_ratio() if hasattr(self.patch_embed, 'feat_ratio') else patch_size
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head_type = head
        self.head_hidden_size = embed_dim
        self.coord_aug = self._check_coord_aug(CoordAug.from_option(coord_aug))
        self.flexi_patch_sizes = self._check_flexi(flexi_patch_sizes)
        self._patch_override: Optional[Tuple[int, int]] = None
        self.patch_resampler = PatchEmbedResamplerFixedOrigSize(tuple(self.patch_embed.patch_size)) \
            if self.flexi_patch_sizes else None
        if head == 'mlp_tanh':
            self.head_hidden_size = head_hidden_dim or int(embed_dim * mlp_ratio)
            self.head = MlpHead(embed_dim, self.head_hidden_size, num_classes)
        else:
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ resolution-robust training options
    def _check_coord_aug(self, aug: Optional[CoordAug]) -> Optional[CoordAug]:
        if aug is None or not aug.active:
            return None
        consumers = []
        if self.pos_embed_type in ('learn', 'sincos'):
            if self.pos_embed_type == 'sincos' and self.pos_embed_coord_mode == 'polar':
                raise ValueError("coord_aug does not apply to a sin-cos table over polar coordinates "
                                 "(pos_embed_coord_mode='polar')")
            consumers.append(f'pos_embed={self.pos_embed_type!r}')
        if self.pe is not None:
            name = check_coord_aug(self.pe, aug.per_sample,
                                   where=" and to absolute tables (pos_embed='learn' via CAPE sampling, 'sincos')")
            consumers.append(f'pe={name!r}')
        if not consumers:
            raise ValueError("coord_aug needs a consumer of token coordinates, but this model has "
                             "pos_embed='none' and no position encoding")
        return aug

    def _check_flexi(self, sizes: list[int] | None) -> Optional[Tuple[int, ...]]:
        if not sizes:
            return None
        if isinstance(sizes, int) or any(isinstance(p, bool) or not isinstance(p, int) or p <= 0 for p in sizes):
            raise ValueError(f'flexi_patch_sizes must be a list of positive integers, got {sizes!r}')
        H, W = self.patch_embed.img_size
        bad = [p for p in sizes if H % p or W % p]
        if bad and not self.patch_embed.dynamic_img_pad:
            raise ValueError(f'flexi_patch_sizes {bad} do not divide the image size {H}x{W}; choose divisors or '
                             f'create the model with dynamic_img_pad=True')
        return tuple(sorted(set(sizes)))

    @property
    def patch_size(self) -> Tuple[int, int]:
        """The patch size used now: the one set by :meth:`set_patch_size`, else the stored kernel's."""
        return self._patch_override or tuple(self.patch_embed.patch_size)

    def set_patch_size(self, patch_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """Run at another patch size (FlexiViT; the evaluator's patch-size knob): the kernel is resampled from
        the stored one on every forward (timm's pseudo-inverse resize), so the state dict is unchanged and no
        loss accumulates over calls. ``None`` restores the stored size. Training with ``flexi_patch_sizes``
        draws its own size per batch and ignores this setting."""
        if patch_size is None:
            self._patch_override = None
            return
        p = to_2tuple(patch_size)
        if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in p):
            raise ValueError(f'patch_size must be a positive integer or a pair of them, got {patch_size!r}')
        p = tuple(p)
        if p != tuple(self.patch_embed.patch_size) and self.patch_resampler is None:
            self.patch_resampler = PatchEmbedResamplerFixedOrigSize(
                tuple(self.patch_embed.patch_size), device=self.patch_embed.proj.weight.device)
        self._patch_override = None if p == tuple(self.patch_embed.patch_size) else p

    def _draw_patch_size(self) -> Tuple[int, int]:
        if self.training and self.flexi_patch_sizes:
            p = self.flexi_patch_sizes[int(torch.randint(len(self.flexi_patch_sizes), ()))]
            return p, p
        return self.patch_size

    def _coord_draw(self, batch_size: int) -> Optional[CoordDraw]:
        if self.training and self.coord_aug is not None:
            return self.coord_aug.draw(batch_size)
        return None

    def _patchify(self, x: torch.Tensor, p: Tuple[int, int]) -> torch.Tensor:
        """Patch embedding ``(B, h, w, C)`` at patch size ``p`` (the stored kernel, or it resampled to ``p``)."""
        pe = self.patch_embed
        if p == tuple(pe.patch_size):
            return pe(x)
        if pe.dynamic_img_pad:
            H, W = x.shape[-2:]
            x = F.pad(x, (0, (p[1] - W % p[1]) % p[1], 0, (p[0] - H % p[0]) % p[0]))
        weight = self.patch_resampler(pe.proj.weight, list(p))
        x = F.conv2d(x, weight, pe.proj.bias, stride=p)
        return pe.norm(x.permute(0, 2, 3, 1))

    # ------------------------------------------------------------------ init / timm housekeeping
    def init_weights(self) -> None:
        if self.patch_embed.proj.weight.is_meta:
            return  # built on the meta device: no values to initialise (materialise, then load or init)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for name, m in self.named_modules():
            if name == '' or name.startswith('pe.') or name == 'pe':
                continue  # the model itself, and encodings, which initialise their own parameters
            init_weights_vit_timm(m, name)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        out = {'pos_embed', 'cls_token', 'reg_token'}
        if self.pe is not None:
            out |= {f'pe.{n}' for n in self.pe.no_weight_decay()}
        return out

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc2 if self.head_type == 'mlp_tanh' else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool == 'token' and not self.has_class_token:
                raise ValueError("global_pool='token' needs a class token")
            self.global_pool = global_pool
        if self.head_type == 'mlp_tanh':
            self.head.fc2 = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        else:
            self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: Optional[Tuple[int, int]] = None,
                       patch_size: Optional[Tuple[int, int]] = None) -> None:
        """Change the default input size: resample grid-sized tables once (timm semantics)."""
        prev = tuple(self.patch_embed.grid_size)
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        new = tuple(self.patch_embed.grid_size)
        if self.pos_embed is not None and new != prev:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            self.pos_embed = nn.Parameter(resample_table(
                self.pos_embed.detach(), new, prev, prefix, self.pos_embed_interp, self.pos_embed_antialias))
        if self.pe is not None:
            self.pe.set_grid_size(new, prev)

    # ------------------------------------------------------------------ forward (timm contract: TimmBackbone)
    @classmethod
    def check_abs_pos(cls, abs_pos: str, pos_embed: str) -> str:
        """``abs_pos`` if it is a mode (``ABS_POS_MODES``) that a model with this ``pos_embed`` can use."""
        if abs_pos not in cls.ABS_POS_MODES:
            raise ValueError(f"abs_pos must be one of {cls.ABS_POS_MODES}, got {abs_pos!r}")
        if abs_pos == 'tile' and pos_embed != 'learn':
            raise ValueError(f"abs_pos='tile' needs a learned absolute table (pos_embed='learn', e.g. vit_ape_*, "
                             f"vit_irpe_*); this model has pos_embed={pos_embed!r}")
        return abs_pos

    def _input_multiple(self) -> Optional[Tuple[int, int]]:
        """This call's patch size (drawn per batch under ``flexi_patch_sizes``), unless inputs are padded."""
        return None if self.patch_embed.dynamic_img_pad else self._call_patch

    def _check_input(self, x: torch.Tensor) -> None:
        self._call_patch = self._draw_patch_size()  # checked here, used by _embed in the same forward
        super()._check_input(x)

    def _abs_pos(self, grid: Grid, device: torch.device) -> Optional[torch.Tensor]:
        if self.pos_embed_type == 'learn':
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            if self.abs_pos == 'tile':
                return tile_table(self.pos_embed, grid.hw, tuple(self.patch_embed.grid_size), prefix)
            if grid.aug is not None:
                return sample_table_cape(self.pos_embed, tuple(self.patch_embed.grid_size), prefix, grid)
            return resample_table(self.pos_embed, grid.hw, tuple(self.patch_embed.grid_size), prefix,
                                  self.pos_embed_interp, self.pos_embed_antialias)
        if self.pos_embed_type == 'sincos':
            key = (grid, self.pos_embed_coord_mode, self._ref_grid)
            return self._sincos.get(key, device, lambda: sincos_2d(
                grid.h, grid.w, self.embed_dim, coord_mode=self.pos_embed_coord_mode, ref_hw=self._ref_grid,
                aug=grid.aug))
        return None

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        x = self._patchify(x, self._call_patch)  # (B, h, w, C)
        B, h, w, C = x.shape
        grid = Grid(h, w, self.num_prefix_tokens, aug=self._coord_draw(B))
        x = x.reshape(B, h * w, C)
        pos = self._abs_pos(grid, x.device)
        with_cls_entry = pos is not None and pos.shape[1] == grid.num_tokens and self.num_prefix_tokens > 0
        if pos is not None and not with_cls_entry:
            x = x + pos
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        if with_cls_entry:
            x = x + pos
        return self.pos_drop(x), grid

    def _stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[Grid, Any]]:
        """Tokens (prefix + patches, absolute table added), and the grid and encoding state of this call."""
        x, grid = self._embed(x)
        state = None
        if self.pe is not None:
            state = self.pe.prepare(grid)
            x = self.pe.embed(x, grid, state)
        return self.norm_pre(x), (grid, state)

    def _unit(self, i: int, x: torch.Tensor, ctx: Tuple[Grid, Any]) -> torch.Tensor:
        """Block ``i``, then the encoding's after-block hook."""
        grid, state = ctx
        pos = LayerPos(self.pe, i, state) if self.pe is not None else None
        x = maybe_checkpoint(self.grad_checkpointing, self.blocks[i], x, pos)
        return self.pe.after_block(x, i, grid, state) if self.pe is not None else x

    def _intermediate(self, y: torch.Tensor, ctx: Tuple[Grid, Any], output_fmt: str,
                      return_prefix_tokens: bool = False) -> Any:
        """Patch tokens as NCHW maps or NLC; with ``return_prefix_tokens`` a (patches, prefix) pair."""
        grid, _ = ctx
        p = self.num_prefix_tokens
        patches = y[:, p:]
        if output_fmt == 'NCHW':
            patches = patches.reshape(y.shape[0], grid.h, grid.w, -1).permute(0, 3, 1, 2).contiguous()
        return (patches, y[:, :p]) if return_prefix_tokens and p else patches

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        return global_pool_nlc(x, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        if self.head_type == 'mlp_tanh':
            return self.head(x, pre_logits=pre_logits)
        return x if pre_logits else self.head(x)


# ---------------------------------------------------------------------------------------------
# Presets: sizes x encodings, as data. One shared recipe (DeiT-III / RoPE-ViT): patch 16, 224 px,
# qkv bias, LayerNorm eps 1e-6, LayerScale 1e-5, class token with token pooling.
VIT_DEFAULTS: Dict[str, Any] = dict(patch_size=16, img_size=224, mlp_ratio=4., qkv_bias=True,
                                    init_values=1e-5, norm_eps=1e-6)

VIT_SIZES: Dict[str, Dict[str, Any]] = {
    'tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'small': dict(embed_dim=384, depth=12, num_heads=6),
    'base': dict(embed_dim=768, depth=12, num_heads=12),
    'large': dict(embed_dim=1024, depth=24, num_heads=16),
}

# name -> (description, model + encoding keywords)
VIT_ENCODINGS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    'ape': ('learned absolute table, DeiT-III style (no table entry for the class token)',
            dict(pos_embed='learn', no_embed_class=True)),
    'sincos': ('fixed 2-D sin-cos absolute table (MAE)', dict(pos_embed='sincos')),
    'nope': ('no position encoding', dict(pos_embed='none')),
    'lape': ('LaPE: learned table through a LayerNorm per layer, added to every attention input',
             dict(pos_embed='none', pe='lape')),
    'cpvt': ('CPVT: PEG after the first block, class token', dict(pos_embed='none', pe='peg', num_pegs=1)),
    'cpvt_gap': ('CPVT-GAP: PEGs after blocks 1..5, mean pooling, no class token',
                 dict(pos_embed='none', pe='peg', num_pegs=5, class_token=False, global_pool='avg')),
    'rope2d': ('2-D RoPE-Axial, theta 100 (RoPE-ViT)', dict(pos_embed='none', pe='rope2d', rope_type='axial',
                                                             theta=100.)),
    'rope2d_mixed': ('2-D RoPE-Mixed, learnable frequencies, theta 10 (RoPE-ViT)',
                     dict(pos_embed='none', pe='rope2d', rope_type='mixed', theta=10.)),
    'rope2d_polar': ('2-D RoPE over polar coordinates (log radius, angle) about the image centre',
                     dict(pos_embed='none', pe='rope2d', rope_type='axial', theta=100., coord_mode='polar')),
    'rope2d_ape': ('2-D RoPE-Axial, theta 100, plus a learned absolute table without a class-token entry '
                   '(RoPE-ViT "RoPE-Axial + APE")',
                   dict(pos_embed='learn', no_embed_class=True, pe='rope2d', rope_type='axial', theta=100.)),
    'rope2d_mixed_ape': ('2-D RoPE-Mixed, theta 10, plus a learned absolute table without a class-token entry '
                         '(RoPE-ViT "RoPE-Mixed + APE")',
                         dict(pos_embed='learn', no_embed_class=True, pe='rope2d', rope_type='mixed', theta=10.)),
    'irpe': ('iRPE contextual, product method, on keys, shared heads, ratio 1.9 (+ learned APE, as DeiT-iRPE)',
             dict(pos_embed='learn', pos_embed_antialias=False, pe='irpe', mode='ctx', method='product',
                  rpe_on='k', shared_head=True, ratio=1.9)),
    'irpe_qkv': ('iRPE contextual, product method, on queries, keys and values (+ learned APE)',
                 dict(pos_embed='learn', pos_embed_antialias=False, pe='irpe', mode='ctx', method='product',
                      rpe_on='qkv', shared_head=True, ratio=1.9)),
    'irpe_bias': ('iRPE bias mode, product method, per head, on keys (+ learned APE)',
                  dict(pos_embed='learn', pos_embed_antialias=False, pe='irpe', mode='bias', method='product',
                       rpe_on='k', shared_head=False, ratio=1.9)),
    'comrope_ap': ('ComRoPE-AP: trainable commuting rotations, axis-partitioned 4x4 blocks, normalised '
                   'coordinates, class token rotated at the centre',
                   dict(pos_embed='none', pe='comrope', comrope_type='ap', block_size=4, init_std=1.0,
                        coord_mode='normalized')),
    'comrope_ld': ('ComRoPE-LD: trainable commuting rotations, linearly dependent generators, 4x4 blocks, '
                   'normalised coordinates, class token rotated at the centre',
                   dict(pos_embed='none', pe='comrope', comrope_type='ld', block_size=4, init_std=1.0,
                        coord_mode='normalized')),
    'liere': ('LieRE: learned skew-symmetric generators per axis, 4x4 blocks exponentiated per token (not '
              'commuting, so not purely relative), normalised coordinates, class token rotated at the centre '
              '(the ComRoPE code base\'s LieRE baseline)',
              dict(pos_embed='none', pe='comrope', comrope_type='liere', block_size=4, init_std=1.0,
                   scale_factor=1.0, coord_mode='normalized')),
    'lookhere': ('LookHere LH-90 (quadrant heads): directed, distance-penalised attention heads',
                 dict(pos_embed='none', pe='lookhere', layout='lh90')),
    'lookhere180': ('LookHere LH-180 (half-plane heads)', dict(pos_embed='none', pe='lookhere', layout='lh180')),
    'lookhere45': ('LookHere LH-45 (45-degree cone heads)', dict(pos_embed='none', pe='lookhere', layout='lh45')),
    'rope2d_dinov3': ('DINOv3: axial RoPE on patch centres normalised to [-1, 1], periods 100^(4i/d), rows first, '
                      'rotate-half; the DINOv3 ViT (4 register tokens, LayerScale, LayerNorm eps 1e-5, no qkv bias: '
                      'qkv_bias=True loads the _qkvb weights, whose key bias stays zero)',
                      dict(pos_embed='none', pe='rope2d_dinov3', base=100., reg_tokens=4, qkv_bias=False,
                           qkv_k_bias=False, norm_eps=1e-5)),
    'pope2d': ('PoPE-2D: polar (magnitude x phase) position embedding on q and k, theta 10000, index '
               'coordinates', dict(pos_embed='none', pe='pope2d', theta=10000., coord_mode='index')),
    # --- issue 19: the 2025-26 frontier ---
    'pape': ('PaPE: 50 query-dependent parabolas per head on widened q/k, 1-based index positions',
             dict(pos_embed='none', pe='pape', parabolas=50)),
    'pape_ri': ('PaPE-RI: one query-dependent isotropic paraboloid per head (rotation invariant), widened q/k',
                dict(pos_embed='none', pe='pape_ri')),
    'spiral': ('Spiral RoPE: rotary pairs along 4 directions (rotate 2), frequencies 1.5 down, index coordinates '
               'clamped to the grid as upstream', dict(pos_embed='none', pe='spiral', rotate=2, max_freq=1.5)),
    'alibi2d': ('2-D ALiBi: -m_h * Euclidean patch distance, ALiBi geometric head slopes, class token unbiased',
                dict(pos_embed='none', pe='alibi2d')),
    'fire2d': ('FIRE-2D: per-layer MLP of the log-scaled patch distance over log of max(learned threshold, grid '
               'extent)', dict(pos_embed='none', pe='fire2d', mlp_hidden=32)),
}


# (encoding, size) -> keywords where a size's defaults do not suit an encoding. LH-45 is two families of four
# cone heads: on ViT-Tiny's 3 heads one family would get none (a warning); 8 heads of 24 dims keep the parameters.
VIT_SIZE_OVERRIDES: Dict[Tuple[str, str], Dict[str, Any]] = {
    ('lookhere45', 'tiny'): dict(num_heads=8),
}

VIT_PRESETS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    f'vit_{pe}_{size}': (f'ViT-{size} with {desc}',
                         {**VIT_DEFAULTS, **dims, **enc, **VIT_SIZE_OVERRIDES.get((pe, size), {})})
    for pe, (desc, enc) in VIT_ENCODINGS.items() for size, dims in VIT_SIZES.items()
}

# DINOv3's SwiGLU sizes (facebookresearch/dinov3 vit{s,l,h}16plus, ffn ratio 6 times 2/3; timm
# vit_{small,huge}_plus_patch16_dinov3): DINOv3 encoding only
DINOV3_PLUS_SIZES: Dict[str, Dict[str, Any]] = {
    'small_plus': dict(embed_dim=384, depth=12, num_heads=6, mlp_layer='swiglu'),
    'large_plus': dict(embed_dim=1024, depth=24, num_heads=16, mlp_layer='swiglu'),
    'huge_plus': dict(embed_dim=1280, depth=32, num_heads=20, mlp_layer='swiglu'),
}
VIT_PRESETS.update({
    f'vit_rope2d_dinov3_{size}': (f'ViT-{size} (SwiGLU) with {VIT_ENCODINGS["rope2d_dinov3"][0]}',
                                  {**VIT_DEFAULTS, **dims, **VIT_ENCODINGS['rope2d_dinov3'][1]})
    for size, dims in DINOV3_PLUS_SIZES.items()
})

register_presets(__name__, VIT_PRESETS, model_builder(VisionTransformer, 3),
                 {name: default_cfg() for name in VIT_PRESETS})
