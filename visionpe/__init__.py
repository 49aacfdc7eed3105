"""visionpe: which 2-D positional encoding should a vision transformer use, and what happens at
resolutions it was not trained at?

``import visionpe`` registers every model with timm, so ``timm.create_model("vit_rope2d_base")``
works; :func:`create_model` is the same call with friendlier errors.
"""
from __future__ import annotations

from typing import Any

__version__ = '0.1.0'

from .grid import COORD_MODES, Grid, grid_coords  # noqa: E402
from .attention import BACKENDS, set_attn_backend, use_backend  # noqa: E402
from . import models  # noqa: E402,F401  (registers the models)
from .models import check_model_name, list_models  # noqa: E402


def create_model(name: str, pretrained: bool = False, **kwargs: Any):
    """``timm.create_model`` for visionpe names, with a clear error for unknown names."""
    import timm
    check_model_name(name)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


__all__ = ['__version__', 'create_model', 'list_models', 'check_model_name', 'grid_coords', 'Grid', 'COORD_MODES', 'BACKENDS',
           'use_backend', 'set_attn_backend']
