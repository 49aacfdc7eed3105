"""Models for the evaluator: where the weights come from, and the test-time knobs.

A :class:`ModelSource` is a registered name plus one of

* a Lightning ``.ckpt`` from ``train.py`` (rebuilt by :func:`visionpe.train.load_model_from_checkpoint`);
* a timm / safetensors / upstream file (``timm.create_model(name, pretrained=True,
  pretrained_cfg_overlay=dict(file=PATH))``: the converters detect the format and validate the keys);
* nothing: local weights found by timm's ``pretrained=True`` (``$VISIONPE_WEIGHTS_DIR``), or
  ``random`` for a randomly initialised model (speed and memory only; seeded, so every rebuild has the
  same weights).

Every model is built with ``dynamic_img_size=True`` so one instance runs at every resolution.

Test-time knobs (:class:`Knobs`), all set by :func:`apply_knobs`:

* ``coord_mode``: token coordinates of the encoding (:mod:`visionpe.grid`): a construction
  argument, so the model is rebuilt with it and the same weights loaded;
* ``rope_scaling``: RoPE position interpolation (``pi``: positions times ``pos_scale``, Chen et al.
  2023) or NTK-aware base scaling (``ntk``: theta times ``s^(d/(d-2))``, bloc97 2023); ``pi`` / ``ntk``
  alone derive the factor per resolution, ``s = max(1, test grid / train grid)`` (longer ratio of the
  two axes), ``pi:F`` / ``ntk:F`` fix it;
* ``lookhere_slope``: LookHere's global slope ``s_global`` (Fuller et al. 2024);
* ``temperature``: softmax scale times ``log(N) / log(N_train)`` (entropy-invariant attention scaling,
  Chiang & Cholak 2022), ``N_train`` measured per attention module at the training resolution;
* ``backend``: attention backend (:func:`visionpe.attention.use_backend`).
A knob a model does not have is not applicable: the model runs once at its own setting.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['ModelSource', 'Knobs', 'KnobSpace', 'parse_rope_scaling', 'knob_support', 'expand_knobs',
           'apply_knobs', 'train_resolution', 'patch_size_of', 'measure_tokens', 'RANDOM']

log = logging.getLogger(__name__)
RANDOM = 'random'
Size = Tuple[int, int]


# ------------------------------------------------------------------------------------------ sources
@dataclass
class ModelSource:
    """A model to evaluate: ``name`` (timm / visionpe), ``checkpoint`` (path, None or ``'random'``),
    extra ``kwargs`` for ``timm.create_model`` (e.g. the architecture of a bare safetensors file)."""
    name: str
    checkpoint: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    use_ema: bool = True

    @property
    def is_lightning(self) -> bool:
        return self.checkpoint is not None and Path(self.checkpoint).suffix == '.ckpt'

    def check(self) -> None:
        """Fail early on an unknown name or a missing file."""
        import visionpe
        if self.checkpoint not in (None, RANDOM) and not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f'checkpoint {self.checkpoint} (for model {self.name}) does not exist')
        visionpe.check_model_name(self.name)

    def build(self, num_classes: Optional[int] = None, **overrides: Any) -> Tuple[nn.Module, Dict[str, Any]]:
        """The model in eval mode with its weights, and info (``img_size``, ``mean``, ``std``, ...)."""
        self.check()
        kwargs = {**self.kwargs, **overrides}
        if self.is_lightning:
            from ..train.checkpoint import load_model_from_checkpoint
            model, info = _with_dynamic_size(lambda **kw: load_model_from_checkpoint(
                self.checkpoint, 'cpu', use_ema=self.use_ema, **kw), kwargs)
            if num_classes is not None and info['num_classes'] != num_classes:
                raise ValueError(f'{self.checkpoint}: the model was trained with {info["num_classes"]} classes but '
                                 f'the data has {num_classes}; evaluate it on data with the same classes')
            return model, info
        import timm
        create: Dict[str, Any] = dict(kwargs)
        if num_classes is not None:
            create['num_classes'] = num_classes
        pretrained = self.checkpoint != RANDOM
        if self.checkpoint not in (None, RANDOM):
            create['pretrained_cfg_overlay'] = dict(file=str(self.checkpoint))
        if not pretrained:  # the same random weights at every rebuild (one per knob setting)
            torch.manual_seed(0)
        model = _with_dynamic_size(lambda **kw: timm.create_model(self.name, pretrained=pretrained, **kw), create)
        cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
        if pretrained and cfg.get('num_classes') == -1:
            raise ValueError(f'{self.checkpoint or self.name}: the classifier in the checkpoint has another number '
                             f'of classes than the data ({num_classes}); a fresh head cannot be evaluated. Use '
                             f'data with the checkpoint\'s classes')
        model.eval()
        info = dict(model_name=self.name, model_kwargs=dict(self.kwargs), img_size=None,
                    mean=tuple(cfg.get('mean', ())), std=tuple(cfg.get('std', ())),
                    interpolation=cfg.get('interpolation'), input_size=cfg.get('input_size'),
                    num_classes=getattr(model, 'num_classes', num_classes), path=self.checkpoint)
        return model, info


def _with_dynamic_size(fn, kwargs: Dict[str, Any]):
    """Call ``fn(dynamic_img_size=True, **kwargs)``; models without that option are built without it."""
    if 'dynamic_img_size' in kwargs:
        return fn(**kwargs)
    try:
        return fn(dynamic_img_size=True, **kwargs)
    except TypeError as e:
        if 'dynamic_img_size' not in str(e):
            raise
        return fn(**kwargs)


def patch_size_of(model: nn.Module) -> Optional[Size]:
    pe = getattr(model, 'patch_embed', None)
    p = getattr(pe, 'patch_size', None)
    if p is None:
        return None
    return (int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))


def train_resolution(model: nn.Module, info: Dict[str, Any]) -> Optional[Size]:
    """The training resolution: the checkpoint's ``img_size`` (``train.py``), else the size the model was
    built for (``patch_embed.img_size``), else timm's ``pretrained_cfg['input_size']``."""
    size = info.get('img_size')
    if size is None:
        pe = getattr(model, 'patch_embed', None)
        size = getattr(pe, 'img_size', None)
    if size is None and info.get('input_size'):
        size = tuple(info['input_size'][-2:])
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ------------------------------------------------------------------------------------------ knobs
_ROPE_MODES = ('none', 'pi', 'ntk')


def parse_rope_scaling(spec: str) -> Tuple[str, Optional[float]]:
    """``none`` | ``pi`` | ``ntk`` | ``pi:F`` | ``ntk:F`` -> ``(mode, factor or None for per-resolution)``."""
    mode, _, value = spec.partition(':')
    if mode not in _ROPE_MODES or (mode == 'none' and value):
        raise ValueError(f"bad --rope-scaling {spec!r}: use none, pi, ntk (factor from the resolution) or "
                         f"pi:F / ntk:F (fixed factor, e.g. ntk:2)")
    if not value:
        return mode, None
    try:
        f = float(value)
    except ValueError:
        raise ValueError(f'bad --rope-scaling {spec!r}: {value!r} is not a number') from None
    if f <= 0:
        raise ValueError(f'bad --rope-scaling {spec!r}: the factor must be positive')
    return mode, f


@dataclass(frozen=True)
class Knobs:
    """One setting of the test-time knobs; ``None`` / ``'none'`` / False mean "the model's own"."""
    coord_mode: Optional[str] = None
    rope_scaling: str = 'none'
    lookhere_slope: Optional[float] = None
    temperature: bool = False
    backend: Optional[str] = None

    def label(self) -> str:
        parts = []
        if self.coord_mode is not None:
            parts.append(f'coord={self.coord_mode}')
        if self.rope_scaling != 'none':
            parts.append(f'rope={self.rope_scaling}')
        if self.lookhere_slope is not None:
            parts.append(f'slope={self.lookhere_slope:g}')
        if self.temperature:
            parts.append('temp=logN')
        if self.backend is not None:
            parts.append(f'attn={self.backend}')
        return ', '.join(parts)

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class KnobSpace:
    """The values to sweep, per knob (each list is one axis of the sweep)."""
    coord_mode: Sequence[Optional[str]] = (None,)
    rope_scaling: Sequence[str] = ('none',)
    lookhere_slope: Sequence[Optional[float]] = (None,)
    temperature: Sequence[bool] = (False,)
    backend: Sequence[Optional[str]] = (None,)

    def validate(self) -> 'KnobSpace':
        from ..attention import BACKENDS
        from ..grid import check_coord_mode
        for m in self.coord_mode:
            if m is not None:
                check_coord_mode(m)
        for r in self.rope_scaling:
            parse_rope_scaling(r)
        for b in self.backend:
            if b is not None and b not in BACKENDS:
                raise ValueError(f"unknown attention backend {b!r}; choose from {', '.join(BACKENDS)}")
        return self

    def is_default(self) -> bool:
        return all(list(getattr(self, f.name)) == [getattr(Knobs(), f.name)] for f in fields(self))


def _encodings(model: nn.Module) -> List[nn.Module]:
    from ..pos.base import PosEncoding
    return [m for m in model.modules() if isinstance(m, PosEncoding)]


def knob_support(model: nn.Module) -> Dict[str, Any]:
    """Which knobs ``model`` has: ``{knob: how it is set}`` (missing key: not applicable); for
    ``coord_mode``: ``(construction keyword, the model's own mode)``."""
    encs = _encodings(model)
    out: Dict[str, Any] = {}
    with_mode = [e for e in encs if hasattr(e, 'coord_mode')]
    if with_mode:  # (construction keyword, the mode the model was built with)
        out['coord_mode'] = ('coord_mode', with_mode[0].coord_mode)
    elif getattr(model, 'pos_embed_type', None) == 'sincos':
        out['coord_mode'] = ('pos_embed_coord_mode', model.pos_embed_coord_mode)
    rope = [e for e in encs if hasattr(e, 'pos_scale') and hasattr(e, 'ntk_scale')]
    if rope:
        out['rope_scaling'] = ['pi'] + (['ntk'] if any(getattr(e, 'rope_type', 'axial') == 'axial' for e in rope)
                                        else [])
    if any(hasattr(e, 'global_slope') for e in encs):
        out['lookhere_slope'] = 'global_slope'
    if any(hasattr(m, 'temperature_ref_tokens') for m in model.modules()):
        out['temperature'] = True
    if any(hasattr(m, 'attn_backend') for m in model.modules()):
        out['backend'] = True
    return out


def expand_knobs(space: KnobSpace, support: Dict[str, Any]) -> Tuple[List[Knobs], List[str]]:
    """Every knob setting of ``space`` that applies to a model with ``support`` (knobs it lacks collapse to
    the model's own setting), and notes on what was not applicable."""
    axes: Dict[str, List[Any]] = {}
    notes: List[str] = []
    default = Knobs()
    for f in fields(Knobs):
        values = list(dict.fromkeys(getattr(space, f.name)))
        wanted = [v for v in values if v != getattr(default, f.name)]
        if f.name not in support:
            if wanted:
                notes.append(f'{f.name} {wanted} not applicable')
            axes[f.name] = [getattr(default, f.name)]
        elif f.name == 'coord_mode':
            axes[f.name] = _coord_modes(values, support['coord_mode'][1], notes)
        elif f.name == 'rope_scaling':
            ok = [v for v in values if parse_rope_scaling(v)[0] in ('none', *support['rope_scaling'])]
            if len(ok) < len(values):
                notes.append(f'rope_scaling {[v for v in values if v not in ok]} not applicable')
            axes[f.name] = ok or ['none']
        else:
            axes[f.name] = values
    combos = [Knobs(**dict(zip(axes, vals))) for vals in itertools.product(*axes.values())]
    return combos, notes


#: coordinate modes that give the training coordinates at the training resolution, by training mode:
#: only these are test-time alternatives (e.g. ``ref`` for an ``index`` model = position interpolation);
#: another frame (``normalized`` positions in (0, 1) for a model trained on 0..w-1) is not a knob setting
COORD_FAMILIES: Dict[str, Tuple[str, ...]] = {
    'index': ('index', 'ref'), 'ref': ('index', 'ref'),
    'normalized': ('normalized', 'normalized_ref'), 'normalized_ref': ('normalized', 'normalized_ref'),
    'centered': ('centered',), 'polar': ('polar',),
}


def _coord_modes(values: List[Optional[str]], native: Optional[str], notes: List[str]) -> List[Optional[str]]:
    """The requested coordinate modes that agree with the model's own (``native``) mode at the training
    resolution; the rest are noted as not applicable. None of them left: the model's own mode."""
    wanted = [v for v in values if v is not None]
    if native is None or not wanted:
        return values
    family = COORD_FAMILIES.get(native, (native,))
    ok = [v for v in values if v is None or v in family]
    if len(ok) < len(values):
        notes.append(f'coord_mode {[v for v in values if v not in ok]} not applicable: trained with '
                     f'{native!r} coordinates (test-time alternatives: {", ".join(family)})')
    return ok or [native]


def build_overrides(knobs: Knobs, support: Dict[str, Any]) -> Dict[str, Any]:
    """Construction keywords of a knob setting (only the coordinate mode is one)."""
    if knobs.coord_mode is None:
        return {}
    return {support['coord_mode'][0]: knobs.coord_mode}


@torch.no_grad()
def measure_tokens(model: nn.Module, hw: Size, device: torch.device) -> Dict[nn.Module, int]:
    """Sequence length seen by every attention module at ``hw`` (one forward of one image)."""
    seen: Dict[nn.Module, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod, int(args[0].shape[-2])))
             for m in model.modules() if hasattr(m, 'temperature_ref_tokens')]
    try:
        model(torch.zeros(1, getattr(model, 'in_chans', 3), *hw, device=device))
    finally:
        for h in hooks:
            h.remove()
    return seen


def apply_knobs(model: nn.Module, knobs: Knobs, hw: Size, train_hw: Optional[Size],
                ref_tokens: Optional[Dict[nn.Module, int]] = None) -> None:
    """Set the attribute knobs of ``model`` for evaluation at ``hw`` (``coord_mode`` is set at build time,
    see :func:`build_overrides`; the backend by :func:`visionpe.attention.use_backend` around the forward).

    ``ref_tokens``: per-attention training sequence lengths (:func:`measure_tokens`), for ``temperature``.
    """
    encs = _encodings(model)
    mode, factor = parse_rope_scaling(knobs.rope_scaling)
    if mode != 'none' and factor is None:
        if train_hw is None:
            raise ValueError('--rope-scaling pi / ntk needs the training resolution (pass --train-res)')
        factor = max(1.0, hw[0] / train_hw[0], hw[1] / train_hw[1])
    for e in encs:  # the model is built fresh per knob setting: only the knobs that are set are touched
        if mode == 'pi' and hasattr(e, 'pos_scale'):
            e.pos_scale = 1.0 / factor
        if mode == 'ntk' and hasattr(e, 'ntk_scale'):
            e.ntk_scale = factor
        if knobs.lookhere_slope is not None and hasattr(e, 'global_slope'):
            e.global_slope = float(knobs.lookhere_slope)
    if knobs.temperature and not ref_tokens:
        raise ValueError('the temperature knob needs the training sequence lengths (measure_tokens)')
    if knobs.temperature:
        for m, n in ref_tokens.items():
            m.temperature_ref_tokens = n if n > 1 else None

