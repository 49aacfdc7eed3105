"""Model files: each composes layers and registers its presets with timm on import."""
from ._registry import list_models
from . import vit  # noqa: F401
from .vit import VisionTransformer

for _family in ('swin', 'cswin', 'rst'):
    try:
        __import__(f'{__name__}.{_family}')
    except ModuleNotFoundError as _e:  # family not written yet
        if _e.name != f'{__name__}.{_family}':
            raise

__all__ = ['VisionTransformer', 'list_models']
