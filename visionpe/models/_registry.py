"""Register preset tables with timm: one entrypoint and one pretrained cfg per preset name.

Every model file calls :func:`register_presets` with a table ``name -> (description, kwargs)``
and a builder; the result is ``timm.create_model(name)`` after ``import visionpe``. Weights come
only from local files (nothing is downloaded): ``pretrained_cfg_overlay=dict(file=PATH)``, or a
file ``<name>.safetensors`` / ``<name>.pth`` in ``$VISIONPE_WEIGHTS_DIR``.
"""
from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ['register_presets', 'model_builder', 'list_models', 'check_model_name', 'preset_kwargs', 'default_cfg',
           'local_weights', 'resolve_pretrained_kwargs']

_MODELS: Dict[str, str] = {}  # name -> family (file) name
_PRESETS: Dict[str, Dict[str, Any]] = {}  # name -> the preset's constructor keywords
WEIGHTS_ENV = 'VISIONPE_WEIGHTS_DIR'


def default_cfg(**kwargs: Any) -> Dict[str, Any]:
    cfg = dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=1.0,
               interpolation='bicubic', fixed_input_size=True, mean=IMAGENET_DEFAULT_MEAN,
               std=IMAGENET_DEFAULT_STD, first_conv='patch_embed.proj', classifier='head', license='apache-2.0')
    cfg.update(kwargs)
    return cfg


def local_weights(name: str) -> Optional[Path]:
    root = os.environ.get(WEIGHTS_ENV)
    if not root:
        return None
    for ext in ('.safetensors', '.pth', '.pt', '.bin'):
        p = Path(root) / f'{name}{ext}'
        if p.is_file():
            return p
    return None


def resolve_pretrained_kwargs(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Point ``pretrained=True`` at a local file, or fail with the two ways to give one."""
    if not pretrained:
        return kwargs
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    cfg = kwargs.get('pretrained_cfg')
    if overlay.get('file') or overlay.get('state_dict') is not None or (isinstance(cfg, dict) and cfg.get('file')):
        if overlay.get('file'):
            if not Path(overlay['file']).is_file():
                raise FileNotFoundError(f"pretrained weights file {overlay['file']} does not exist")
            from ..convert import model_kwargs_from_checkpoint
            return {**model_kwargs_from_checkpoint(overlay['file'], name), **kwargs}
        return kwargs
    found = local_weights(name)
    if found is None:
        raise RuntimeError(
            f'{name}: pretrained=True needs local weights (visionpe downloads nothing). Pass '
            f'pretrained_cfg_overlay=dict(file=PATH) to timm.create_model, or put {name}.safetensors '
            f'(or .pth) in the folder named by ${WEIGHTS_ENV}.')
    overlay['file'] = str(found)
    from ..convert import model_kwargs_from_checkpoint
    return {**model_kwargs_from_checkpoint(found, name), **kwargs, 'pretrained_cfg_overlay': overlay}


OutIndices = Union[int, Tuple[int, ...]]


def model_builder(cls: type, out_indices: Union[OutIndices, Callable[[Dict[str, Any]], OutIndices]]
                  ) -> Callable[..., Any]:
    """The builder of one model class for :func:`register_presets`: timm's ``build_model_with_cfg``
    with visionpe's checkpoint filter (every converter) and getter-style ``features_only``.

    ``out_indices``: the default feature indices, or a function of the preset's kwargs giving them.
    """
    def build(variant: str, pretrained: bool = False, **kwargs: Any):
        from ..convert import checkpoint_filter_fn
        default = out_indices(kwargs) if callable(out_indices) else out_indices
        return build_model_with_cfg(
            cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=kwargs.pop('out_indices', default), feature_cls='getter'), **kwargs)
    build.__name__ = build.__qualname__ = f'build_{cls.__name__}'
    build.model_cls = cls
    return build


def register_presets(
        module_name: str,
        table: Dict[str, Tuple[str, Dict[str, Any]]],
        builder: Callable[..., Any],
        cfgs: Dict[str, Dict[str, Any]],
) -> List[str]:
    """Register ``name -> (description, kwargs)`` as timm entrypoints of module ``module_name``."""
    mod = sys.modules[module_name]
    if not hasattr(mod, 'default_cfgs'):
        mod.default_cfgs = {}
    mod.default_cfgs.update(generate_default_cfgs({n: cfgs[n] for n in table}))
    family = module_name.rsplit('.', 1)[-1]
    for name, (description, preset) in table.items():
        def entry(pretrained: bool = False, _name=name, _preset=preset, **kwargs):
            kwargs = resolve_pretrained_kwargs(_name, pretrained, kwargs)
            return builder(_name, pretrained=pretrained, **{**_preset, **kwargs})
        entry.__name__ = entry.__qualname__ = name
        entry.__module__ = module_name
        entry.__doc__ = description
        entry.model_cls = getattr(builder, 'model_cls', None)  # capabilities are class attributes (plain_trunk)
        setattr(mod, name, entry)
        register_model(entry)
        _MODELS[name] = family
        _PRESETS[name] = dict(preset)
    return list(table)


def list_models(pattern: str = '*', family: Optional[str] = None) -> List[str]:
    """Every model name visionpe registers (optionally filtered by glob pattern or family)."""
    import fnmatch
    return sorted(n for n, f in _MODELS.items()
                  if fnmatch.fnmatch(n, pattern) and (family is None or f == family))


def preset_kwargs(name: str) -> Dict[str, Any]:
    """The constructor keywords of a registered preset (a copy)."""
    if name not in _PRESETS:
        raise ValueError(f'{name!r} is not a visionpe preset.{suggest(name)}')
    return dict(_PRESETS[name])


def suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(close)}?" if close else ''


def check_model_name(name: str, what: str = 'model') -> str:
    """``name`` if it is a visionpe or timm model name (a ``.tag`` suffix allowed), else a ValueError
    with close visionpe names and where to list them."""
    import timm
    if not timm.is_model(name.split('.')[0]):
        raise ValueError(f'unknown {what} {name!r}.{suggest(name)} Use a visionpe model name '
                         f'(visionpe.list_models(), {len(_MODELS)} models) or a timm one (timm.list_models())')
    return name
