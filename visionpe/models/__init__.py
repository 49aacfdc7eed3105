"""Model files: each composes layers and registers its presets with timm on import.

Every module of this package whose name does not start with ``_`` is a model family and is imported
here (``pkgutil``), so a new family file registers itself without being listed anywhere.
"""
import importlib
import pkgutil

from ._registry import check_model_name, list_models
from .vit import VisionTransformer

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith('_'):
        importlib.import_module(f'{__name__}.{_mod.name}')

__all__ = ['VisionTransformer', 'list_models', 'check_model_name']
