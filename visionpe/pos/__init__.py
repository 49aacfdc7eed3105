"""Position encodings, one file per family, all behind :class:`~visionpe.pos.base.PosEncoding`.

``build_encoding(name, ctx, **options)`` builds a registered encoding and rejects unknown options
with the list of valid ones.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Callable, Dict, List, Type

from .base import EncodingContext, LayerPos, PosEncoding

__all__ = ['EncodingContext', 'LayerPos', 'PosEncoding', 'register_encoding', 'build_encoding',
           'list_encodings', 'encoding_options', 'registered_name', 'coord_aug_encodings', 'check_coord_aug']

_ENCODINGS: Dict[str, Type[PosEncoding]] = {}


def register_encoding(name: str) -> Callable[[Type[PosEncoding]], Type[PosEncoding]]:
    def deco(cls: Type[PosEncoding]) -> Type[PosEncoding]:
        if name in _ENCODINGS and _ENCODINGS[name] is not cls:
            raise KeyError(f'encoding {name!r} registered twice')
        _ENCODINGS[name] = cls
        return cls
    return deco


def list_encodings() -> List[str]:
    _import_all()
    return sorted(_ENCODINGS)


def coord_aug_encodings() -> List[str]:
    """Registered encodings that take coordinate augmentation (``coord_aug_support`` set), sorted."""
    return [name for name in list_encodings() if _ENCODINGS[name].coord_aug_support is not None]


def check_coord_aug(pe: PosEncoding, per_sample: bool, per_sample_ok: bool = True, where: str = '') -> str:
    """Check that encoding ``pe`` takes coordinate augmentation (``coord_aug``); return its registry name.

    Raises a ValueError naming the encoding and the fix when it reads no continuous coordinates, uses
    polar coordinates, or cannot take a per-image draw (``per_sample``; ``per_sample_ok=False``: the
    model itself shares one draw across the batch, e.g. Swin's windows).
    """
    name = registered_name(pe)
    if pe.coord_aug_support is None:
        raise ValueError(f"coord_aug does not apply to the encoding {name!r}: it reads no continuous token "
                         f"coordinates. It applies to {', '.join(coord_aug_encodings())}{where}; remove coord_aug "
                         f"for this model")
    if getattr(pe, 'coord_mode', None) == 'polar':
        raise ValueError(f"coord_aug (shift / jitter / rescale) is defined on Cartesian coordinates; "
                         f"the encoding {name!r} uses coord_mode='polar'")
    if per_sample and not per_sample_ok:
        raise ValueError("coord_aug per_sample=True is not supported here: every window of the batch shares one "
                         "coordinate table; use per_sample=False (one draw per batch)")
    if per_sample and pe.coord_aug_support != 'sample':
        raise ValueError(f"coord_aug per_sample=True is not supported by the encoding {name!r} (its "
                         f"tables are shared by the batch): use per_sample=False (one draw per batch)")
    return name


def registered_name(enc: PosEncoding | type) -> str:
    """The registry name of an encoding (instance or class); its class name if it is not registered."""
    cls = enc if isinstance(enc, type) else type(enc)
    return next((name for name, c in _ENCODINGS.items() if c is cls), cls.__name__)


def encoding_options(name: str) -> List[str]:
    """Keyword options accepted by encoding ``name`` (besides the model-provided context)."""
    cls = _get(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ('self', 'ctx') and params[p].kind is not inspect.Parameter.VAR_KEYWORD]


def _get(name: str) -> Type[PosEncoding]:
    _import_all()
    if name not in _ENCODINGS:
        raise ValueError(f"unknown position encoding {name!r}; registered: {', '.join(sorted(_ENCODINGS))}")
    return _ENCODINGS[name]


def build_encoding(name: str, ctx: EncodingContext, **options) -> PosEncoding:
    cls = _get(name)
    valid = encoding_options(name)
    bad = sorted(set(options) - set(valid))
    if bad:
        raise TypeError(f"position encoding {name!r} got unknown option(s) {', '.join(bad)}; "
                        f"valid options: {', '.join(valid) or '(none)'}")
    return cls(ctx, **options)


def _import_all() -> None:
    """Import every encoding module of this package (``pkgutil``, like :mod:`visionpe.convert`): each
    registers its encodings on import, so a new ``pos/<name>.py`` needs no list entry here."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != 'base' and not mod.name.startswith('_'):
            importlib.import_module(f'{__name__}.{mod.name}')
