"""timm's backbone contract, once for every visionpe model (ViT, Swin, CSWin, RST).

A backbone is a stem followed by a sequence of *units* (ViT: blocks; hierarchical models: stages),
named by ``units_attr``. A model implements three small steps:

* ``_stem(images) -> (x, ctx)``: the input of unit 0 and whatever the units need per forward
  (ViT: the patch grid and the encoding's state; Swin: this call's windows);
* ``_unit(i, x, ctx) -> x``: run unit ``i`` (use :func:`maybe_checkpoint` for gradient checkpointing);
* ``_intermediate(y, ctx, output_fmt, **options) -> tensor``: a unit's output as timm returns it
  (default: NHWC map -> NCHW).

and this base derives from them timm's ``forward_features``, ``forward_intermediates``,
``prune_intermediate_layers``, ``set_grad_checkpointing``, ``forward`` and the input checks with
errors that name the fix.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

__all__ = ['TimmBackbone', 'maybe_checkpoint', 'nearest_multiples']


def nearest_multiples(v: int, p: int) -> list[int]:
    """The multiples of ``p`` nearest to ``v`` (below and above; at least ``p``)."""
    return sorted({max(p, v // p * p), -(-v // p) * p})


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, recomputed in backward (timm's ``checkpoint``) when ``enabled`` and not scripting."""
    if enabled and not torch.jit.is_scripting():
        return checkpoint(fn, *args)
    return fn(*args)


class TimmBackbone(nn.Module):
    """timm's model contract over ``_stem`` / ``_unit`` / ``_intermediate`` (see module docstring).

    Expects ``in_chans``, ``norm`` (final norm), ``feature_info`` and the classifier API
    (``forward_head``, ``reset_classifier``) on the subclass.
    """
    #: attribute holding the units that ``forward_intermediates`` indexes
    units_attr: ClassVar[str] = 'stages'
    #: every unit has the final norm's width (plain ViT): ``norm=True`` normalises every intermediate
    norm_every_unit: ClassVar[bool] = False
    #: output formats ``forward_intermediates`` accepts
    intermediate_fmts: ClassVar[tuple[str, ...]] = ('NCHW',)
    #: smallest image side the stem accepts, and why (hierarchical conv stems)
    min_input_side: ClassVar[int] = 1
    min_input_reason: ClassVar[str] = ''
    #: how a size that is not a patch multiple can be made to run besides resizing (ViT: padding)
    pad_hint: ClassVar[str] = ''
    #: single-scale trunk (every unit at the patch stride): detection uses ViTDet's simple pyramid
    plain_trunk: ClassVar[bool] = False
    #: parameters before the first unit, for timm's layer-wise groups (``group_matcher``)
    stem_pattern: ClassVar[str] = r'^stem'
    grad_checkpointing: bool = False

    # ------------------------------------------------------------------ the three model steps
    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def _unit(self, i: int, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def _intermediate(self, y: torch.Tensor, ctx: Any, output_fmt: str) -> torch.Tensor:
        return y.permute(0, 3, 1, 2).contiguous()

    # ------------------------------------------------------------------ input checks
    @property
    def units(self) -> nn.Module:
        return getattr(self, self.units_attr)

    def _strict_input_size(self) -> tuple[int, int] | None:
        """The only accepted (H, W), or None for any size."""
        pe = getattr(self, 'patch_embed', None)
        if pe is not None:
            return tuple(pe.img_size) if pe.strict_img_size else None
        return None if self.dynamic_img_size else tuple(self.img_size)

    def _input_multiple(self) -> tuple[int, int] | None:
        """(H, W) must be multiples of this (the patch), or None."""
        pe = getattr(self, 'patch_embed', None)
        if pe is None or getattr(pe, 'dynamic_img_pad', False):
            return None
        return tuple(pe.patch_size)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}')
        H, W = x.shape[-2:]
        m = self.min_input_side
        if H < m or W < m:
            raise ValueError(f'image size {H}x{W} is too small: {self.min_input_reason or f"need at least {m}x{m}"}')
        multiple = self._input_multiple()
        if multiple is not None and (H % multiple[0] or W % multiple[1]):
            ph, pw = multiple
            raise ValueError(
                f'image size {H}x{W} is not a multiple of the patch size {ph}x{pw}; resize or crop to height in '
                f'{nearest_multiples(H, ph)} and width in {nearest_multiples(W, pw)}{self.pad_hint}')
        strict = self._strict_input_size()
        if strict is not None and (H, W) != strict:
            raise ValueError(
                f'this model was built for {strict[0]}x{strict[1]} images and got {H}x{W}; create it with '
                f'dynamic_img_size=True (any size per call) or call model.set_input_size(({H}, {W}))')

    # ------------------------------------------------------------------ forward
    def _run(self, x: torch.Tensor, stop_at: int | None = None) -> Iterator[tuple[int, torch.Tensor, Any]]:
        """Checks the images, runs the stem, then yields ``(i, x, ctx)`` after every unit up to ``stop_at``."""
        self._check_input(x)
        x, ctx = self._stem(x)
        n = len(self.units) if stop_at is None else min(stop_at + 1, len(self.units))
        for i in range(n):
            x = self._unit(i, x, ctx)
            yield i, x, ctx

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for _, x, _ in self._run(x):
            pass
        return self.norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            **options: Any,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's API: ``(final features, [unit outputs])``. ``norm`` applies the final norm to the last
        unit's output (to every one where all units share its width); ``options`` go to
        ``_intermediate`` (ViT: ``return_prefix_tokens``)."""
        if output_fmt not in self.intermediate_fmts:
            raise ValueError(f"output_fmt must be one of {', '.join(map(repr, self.intermediate_fmts))} for "
                             f'{type(self).__name__}, got {output_fmt!r}')
        take_indices, max_index = feature_take_indices(len(self.units), indices)
        last = len(self.units) - 1
        intermediates, i = [], -1
        for i, x, ctx in self._run(x, stop_at=max_index if stop_early else None):
            if i in take_indices:
                y = self.norm(x) if norm and (i == last or self.norm_every_unit) else x
                intermediates.append(self._intermediate(y, ctx, output_fmt, **options))
        if intermediates_only:
            return intermediates
        if i == last or self.norm_every_unit:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep the units up to the last of ``indices``; a cut below the last unit of a hierarchical
        model also drops the final norm and head (they have the last stage's width)."""
        take_indices, max_index = feature_take_indices(len(self.units), indices)
        cut_width = max_index < len(self.units) - 1 and not self.norm_every_unit
        setattr(self, self.units_attr, self.units[:max_index + 1])
        self._pruned(max_index)
        if prune_norm or cut_width:
            self.norm = nn.Identity()
        if cut_width:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or cut_width:
            if hasattr(self, 'fc_norm'):
                self.fc_norm = nn.Identity()
            self.reset_classifier(0, '')
        return take_indices

    def _pruned(self, max_index: int) -> None:
        """Trim per-unit bookkeeping after ``prune_intermediate_layers`` (none by default)."""

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer-wise lr decay): the stem, then one group per block (plain
        trunks) or per stage / block with the stage's downsampling and encoding in its first group."""
        u = self.units_attr
        if self.plain_trunk:
            return dict(stem=self.stem_pattern, blocks=[(rf'^{u}\.(\d+)', None), (r'^norm', (99999,))])
        return dict(stem=self.stem_pattern, blocks=rf'^{u}\.(\d+)' if coarse else [
            (rf'^{u}\.(\d+)\.downsample', (0,)),
            (rf'^{u}\.(\d+)\.blocks\.(\d+)', None),
            (rf'^{u}\.(\d+)\.pe\.', (0,)),
            (r'^norm', (99999,)),
        ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for unit in self.units:
            if hasattr(unit, 'grad_checkpointing'):
                unit.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
