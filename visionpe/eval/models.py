"""Models for the evaluator: where the weights come from, and the test-time knobs.

A :class:`ModelSource` is a registered name plus one of

* a Lightning ``.ckpt`` from ``train.py`` (rebuilt by :func:`visionpe.train.load_model_from_checkpoint`;
  read safely, :mod:`visionpe.train.ckpt_io`);
* a timm / safetensors / upstream file (``timm.create_model(name, pretrained=True,
  pretrained_cfg_overlay=dict(file=PATH))``: the converters detect the format and validate the keys);
* nothing: local weights found by timm's ``pretrained=True`` (``$VISIONPE_WEIGHTS_DIR``), or
  ``random`` for a randomly initialised model (speed and memory only; seeded, so every rebuild has the
  same weights).

Every model is built with ``dynamic_img_size=True`` so one instance runs at every resolution.

Test-time knobs are declared by the modules that have them (:class:`visionpe.pos.base.Knob`, listed in
a class's ``test_knobs``; docs/knobs.md): the evaluator knows none of them by name. A :class:`Knobs` is
one setting (knob name -> value), a :class:`KnobSpace` the values to sweep per knob;
:func:`knob_support` finds which knobs a model has, :func:`expand_knobs` the settings that apply to it,
:func:`build_overrides` / :func:`apply_knobs` / :func:`knob_contexts` apply one setting (at build
time, on the modules at a test size and undone after, or around the forward pass). A knob a model
does not have is not applicable: the model runs once at its own setting.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

__all__ = ['ModelSource', 'Knobs', 'KnobSpace', 'known_knobs', 'knob_support', 'expand_knobs', 'build_overrides',
           'apply_knobs', 'knob_contexts', 'train_resolution', 'patch_size_of', 'setting_patch_size', 'is_native_setting',
           'measure_tokens', 'RANDOM',
           'file_digest']

log = logging.getLogger(__name__)
RANDOM = 'random'
Size = tuple[int, int]


# ------------------------------------------------------------------------------------------ sources
@dataclass
class ModelSource:
    """A model to evaluate: ``name`` (timm / visionpe), ``checkpoint`` (path, None or ``'random'``),
    extra ``kwargs`` for ``timm.create_model`` (e.g. the architecture of a bare safetensors file)."""
    name: str
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    use_ema: bool = True
    trust: bool | None = None  # unpickle a .ckpt that asks for code (None: ckpt_io.trusting's choice)

    @property
    def is_lightning(self) -> bool:
        return self.checkpoint is not None and Path(self.checkpoint).suffix == '.ckpt'

    def hparams(self) -> dict[str, Any]:
        """The ``hyper_parameters`` of a ``train.py`` checkpoint (read once)."""
        if '_hparams' not in self.__dict__:
            from ..train.ckpt_io import checkpoint_hparams
            self.__dict__['_hparams'] = checkpoint_hparams(self.checkpoint, trust=self.trust)
        return self.__dict__['_hparams']

    def check(self, task: str = 'cls') -> None:
        """Fail early on an unknown name, a missing file, or a ``train.py`` checkpoint of another model or
        task."""
        import visionpe
        if self.checkpoint not in (None, RANDOM) and not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f'checkpoint {self.checkpoint} (for model {self.name}) does not exist')
        visionpe.check_model_name(self.name)
        if self.is_lightning and task == 'cls':
            hp = self.hparams()
            if is_detection_hparams(hp):
                raise ValueError(f'{self.checkpoint}: this is a detection checkpoint (a detector on '
                                 f'{hp["model_name"]}): use --task coco')
            if hp['model_name'] != self.name:
                raise ValueError(f'{self.checkpoint} is a train.py checkpoint of {hp["model_name"]}, but --models '
                                 f'says {self.name}: pass --models {hp["model_name"]}, or leave --models out '
                                 f'(the name is in the checkpoint)')

    def fingerprint(self) -> str | None:
        """What the weights are, beyond the path: a digest of the checkpoint file (None without a file)."""
        if self.checkpoint in (None, RANDOM):
            return None
        if '_digest' not in self.__dict__:
            self.__dict__['_digest'] = file_digest(self.checkpoint)
        return self.__dict__['_digest']

    def build(self, num_classes: int | None = None, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
        """The model in eval mode with its weights, and info (``img_size``, ``mean``, ``std``, ...)."""
        self.check()
        kwargs = {**self.kwargs, **overrides}
        if self.is_lightning:
            from ..train.checkpoint import load_model_from_checkpoint
            model, info = _with_dynamic_size(lambda **kw: load_model_from_checkpoint(
                self.checkpoint, 'cpu', use_ema=self.use_ema, trust=self.trust, **kw), kwargs)
            if num_classes is not None and info['num_classes'] != num_classes:
                raise ValueError(f'{self.checkpoint}: the model was trained with {info["num_classes"]} classes but '
                                 f'the data has {num_classes}; evaluate it on data with the same classes')
            return model, info
        import timm
        create: dict[str, Any] = dict(kwargs)
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


def is_detection_hparams(hp: dict[str, Any]) -> bool:
    """Whether ``train.py`` hyper-parameters are those of a detector (its feature pyramid)."""
    return 'fpn_channels' in hp


def file_digest(path: str, chars: int = 16) -> str:
    """SHA-256 of a file's content (hex, first ``chars``): a replaced checkpoint gets another one."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()[:chars]


def _with_dynamic_size(fn, kwargs: dict[str, Any]):
    """Call ``fn(dynamic_img_size=True, **kwargs)``; models without that option are built without it."""
    if 'dynamic_img_size' in kwargs:
        return fn(**kwargs)
    try:
        return fn(dynamic_img_size=True, **kwargs)
    except TypeError as e:
        if 'dynamic_img_size' not in str(e):
            raise
        return fn(**kwargs)


def patch_size_of(model: nn.Module) -> Size | None:
    pe = getattr(model, 'patch_embed', None)
    p = getattr(pe, 'patch_size', None)
    if p is None:
        return None
    return (int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))


def train_resolution(model: nn.Module, info: dict[str, Any]) -> Size | None:
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
def known_knobs() -> dict[str, Any]:
    """Every declared knob by name (rank order): the first declaration of each name (those sharing a name share
    its flag, default and parsing). Imports every model and encoding first, so all declarations are seen."""
    import visionpe  # noqa: F401  (models and attention)
    from ..pos import list_encodings
    from ..pos.base import registered_knobs
    list_encodings()
    out: dict[str, Any] = {}
    for k in registered_knobs():
        out.setdefault(k.name, k)
    return out


def _variants(name: str) -> list[Any]:
    from ..pos.base import registered_knobs
    return [k for k in registered_knobs() if k.name == name]


class Knobs:
    """One setting of the test-time knobs, ``{knob name: value}``; a knob not given keeps its default
    ("the model's own setting"). ``Knobs(rope_scaling='pi')``; values are read as ``knobs[name]``."""

    def __init__(self, **values: Any):
        known = known_knobs()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(f"unknown knob(s) {unknown}; declared knobs: {', '.join(known)}")
        self._values = {n: values.get(n, k.default) for n, k in known.items()}

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def items(self):
        return self._values.items()

    def changed(self) -> dict[str, Any]:
        """The knobs set to something else than their default."""
        known = known_knobs()
        return {n: v for n, v in self._values.items() if v != known[n].default}

    def label(self) -> str:
        known = known_knobs()
        return ', '.join(t for t in (known[n].text(v) for n, v in self._values.items()) if t)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Knobs) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __repr__(self) -> str:
        return f"Knobs({', '.join(f'{n}={v!r}' for n, v in self.changed().items())})"


class KnobSpace:
    """The values to sweep, per knob (each list is one axis of the sweep): ``KnobSpace(coord_mode=['index',
    'ref'])``; a knob not given has only its default."""

    def __init__(self, **axes: Sequence[Any]):
        known = known_knobs()
        unknown = sorted(set(axes) - set(known))
        if unknown:
            raise TypeError(f"unknown knob(s) {unknown}; declared knobs: {', '.join(known)}")
        self.axes: dict[str, list[Any]] = {n: list(axes.get(n, [k.default])) for n, k in known.items()}

    def __getitem__(self, name: str) -> list[Any]:
        return self.axes[name]

    def validate(self) -> 'KnobSpace':
        known = known_knobs()
        for name, values in self.axes.items():
            if not values:
                raise ValueError(f'{known[name].option}: give at least one value')
            self.axes[name] = [known[name].validate(v) for v in values]
        return self

    def is_default(self) -> bool:
        known = known_knobs()
        return all(v == [known[n].default] for n, v in self.axes.items())

    def as_dict(self) -> dict[str, list[Any]]:
        return {n: list(v) for n, v in self.axes.items()}


def knob_support(model: nn.Module) -> dict[str, list[tuple[Any, nn.Module]]]:
    """The knobs ``model`` has: ``{knob name: [(declaration, module), ...]}`` (missing key: not applicable)."""
    out: dict[str, list[tuple[Any, nn.Module]]] = {}
    for name in known_knobs():
        pairs = [(k, m) for k in _variants(name) for m in k.targets(model)]
        if pairs:
            out[name] = pairs
    return out


def _accepted(pairs: list[tuple[Any, nn.Module]], value: Any) -> str | None:
    """None if some module takes ``value``, else why not (the first reason)."""
    reasons = [k.accepts(m, value) if k.accepts is not None else None for k, m in pairs]
    return None if any(r is None for r in reasons) else reasons[0]


def expand_knobs(space: KnobSpace, support: dict[str, Any]) -> tuple[list[Knobs], list[str]]:
    """Every knob setting of ``space`` that applies to a model with ``support`` (knobs it lacks collapse to
    the model's own setting), and notes on what was not applicable. A value no module of the model takes
    (e.g. a coordinate mode of another family) is dropped; if none is left, the model runs at its own
    value (the knob's ``own``, else its default)."""
    axes: dict[str, list[Any]] = {}
    notes: list[str] = []
    for name, knob in known_knobs().items():
        values = list(dict.fromkeys(space[name]))
        wanted = [v for v in values if v != knob.default]
        pairs = support.get(name)
        if not pairs:
            if wanted:
                notes.append(f'{name} {wanted} not applicable')
            axes[name] = [knob.default]
            continue
        why = {v: _accepted(pairs, v) for v in wanted}
        rejected = [v for v in wanted if why[v] is not None]
        if rejected:
            notes.append(f'{name} {rejected} not applicable' + (f': {why[rejected[0]]}' if why[rejected[0]] else ''))
        ok = [v for v in values if v not in rejected]
        own = next((k.own(m) for k, m in pairs if k.own is not None), knob.default)
        axes[name] = ok or [own]
    combos = [Knobs(**dict(zip(axes, vals))) for vals in itertools.product(*axes.values())]
    return combos, notes


def is_native_setting(knobs: Knobs, support: dict[str, Any]) -> bool:
    """Whether ``knobs`` is the model's own setting: every knob at its default or at the value the model was
    built with (its ``own``, e.g. the coordinate mode it was trained with)."""
    for name, value in knobs.changed().items():
        owns = [k.own(m) for k, m in support.get(name, ()) if k.own is not None]
        if not owns or any(o != value for o in owns):
            return False
    return True


def setting_patch_size(knobs: Knobs, support: dict[str, Any]) -> Size | None:
    """The patch size a knob setting runs the model at (a knob with ``patch``, e.g. FlexiViT's), else None."""
    for name, value in knobs.changed().items():
        for k, _ in support.get(name, ()):
            if k.patch is not None:
                return tuple(k.patch(value))
    return None


def build_overrides(knobs: Knobs, support: dict[str, Any]) -> dict[str, Any]:
    """Construction keywords of a knob setting (knobs applied by rebuilding the model)."""
    out: dict[str, Any] = {}
    for name, value in knobs.changed().items():
        for k, _ in support.get(name, ()):
            if k.build is not None:
                out[k.build] = value
    return out


def measure_tokens(model: nn.Module, hw: Size, device: torch.device | None = None) -> dict[nn.Module, int]:
    """Sequence length seen by every attention module at ``hw`` (:func:`visionpe.attention.attention_lengths`)."""
    from ..attention import attention_lengths
    return attention_lengths(model, hw)


def apply_knobs(model: nn.Module, knobs: Knobs, hw: Size, train_hw: Size | None,
                memo: dict[str, Any] | None = None) -> Callable[[], None]:
    """Set the knobs of ``knobs`` that act on modules, for evaluation at ``hw`` (training size ``train_hw``);
    returns the function that undoes it. ``memo``: shared by every call on the same model (measurements
    made once per model, e.g. the training sequence lengths of the temperature knob). Construction knobs
    are applied by :func:`build_overrides`, context knobs by :func:`knob_contexts`."""
    from ..pos.base import KnobContext
    ctx = KnobContext(tuple(hw), tuple(train_hw) if train_hw else None, model, memo if memo is not None else {})
    done = []
    for name, value in knobs.changed().items():
        for k in _variants(name):
            if k.set is None:
                continue
            if k.needs_train_size(value) and train_hw is None:
                raise ValueError(f'{k.option} {value} needs the training resolution (pass --train-res)')
            for m in k.targets(model):
                if k.accepts is None or k.accepts(m, value) is None:
                    done.append((k, m, k.apply(m, value, ctx)))

    def undo() -> None:
        for k, m, saved in reversed(done):
            k.undo(m, saved)
    return undo


@contextlib.contextmanager
def knob_contexts(knobs: Knobs) -> Iterator[None]:
    """The context-manager knobs of ``knobs`` (e.g. the attention backend) around a forward pass."""
    with contextlib.ExitStack() as stack:
        for name, value in knobs.changed().items():
            for k in _variants(name):
                if k.context is not None:
                    stack.enter_context(k.context(value))
        yield
