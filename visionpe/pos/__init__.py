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
           'list_encodings', 'encoding_options', 'registered_name', 'coord_aug_encodings']

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
