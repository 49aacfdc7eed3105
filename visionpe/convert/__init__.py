"""Upstream checkpoint converters, one module per source format.

:func:`checkpoint_filter_fn` is every visionpe model's timm ``pretrained_filter_fn``: it unwraps
the checkpoint, detects its format, converts the keys, and validates the result against the model,
so a checkpoint that does not fit fails loudly with the offending keys named, never loads in part.
Each format module registers itself with :func:`register_converter` on import (adding one:
docs/architecture.md, "Converters"; the formats each encoding reads: docs/encodings.md).
"""
import importlib as _importlib
import pkgutil as _pkgutil

from ._core import (CheckpointMismatchError, checkpoint_filter_fn, convert_state_dict, detect_format,
                    list_formats, load_checkpoint_file, model_kwargs_from_checkpoint, register_config_reader,
                    register_converter, unwrap_state_dict)

for _mod in _pkgutil.iter_modules(__path__):
    if not _mod.name.startswith('_'):
        _importlib.import_module(f'{__name__}.{_mod.name}')

__all__ = ['CheckpointMismatchError', 'checkpoint_filter_fn', 'convert_state_dict', 'detect_format',
           'list_formats', 'load_checkpoint_file', 'model_kwargs_from_checkpoint', 'register_config_reader',
           'register_converter', 'unwrap_state_dict']
