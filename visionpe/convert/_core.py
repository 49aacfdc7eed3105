"""Converter registry, checkpoint unwrapping and strict validation."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

__all__ = ['CheckpointMismatchError', 'register_converter', 'detect_format', 'convert_state_dict',
           'checkpoint_filter_fn', 'unwrap_state_dict', 'load_checkpoint_file', 'list_formats',
           'register_config_reader', 'model_kwargs_from_checkpoint']

_logger = logging.getLogger(__name__)
StateDict = Dict[str, torch.Tensor]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose keys or shapes do not fit the model (after conversion)."""


@dataclass
class Converter:
    name: str
    detect: Callable[[Mapping[str, Any], nn.Module], bool]
    convert: Callable[[StateDict, nn.Module], StateDict]
    priority: int


_CONVERTERS: List[Converter] = []


def register_converter(name: str, detect: Callable[[Mapping[str, Any], nn.Module], bool], priority: int = 0):
    """Register ``convert(state_dict, model) -> state_dict`` for checkpoints where ``detect`` is true.

    Higher priority is tried first; the native format (keys already ours) is the fallback.
    """
    def deco(fn: Callable[[StateDict, nn.Module], StateDict]):
        _CONVERTERS.append(Converter(name, detect, fn, priority))
        _CONVERTERS.sort(key=lambda c: -c.priority)
        return fn
    return deco


ConfigReader = Callable[[Any, str], Optional[Dict[str, Any]]]
_CONFIG_READERS: List[ConfigReader] = []


def register_config_reader(fn: ConfigReader) -> ConfigReader:
    """Register ``fn(checkpoint_object, model_name) -> model kwargs or None``.

    For upstream files that carry their own architecture config (e.g. LookHere ``.pth`` files):
    the kwargs are applied when such a file is loaded with ``pretrained=True``; keywords the user
    passes explicitly win.
    """
    _CONFIG_READERS.append(fn)
    return fn


def model_kwargs_from_checkpoint(path: Union[str, Path], model_name: str) -> Dict[str, Any]:
    """Architecture keywords stored inside a checkpoint file, if a registered reader knows them."""
    if not _CONFIG_READERS:
        return {}
    obj = load_checkpoint_file(path)
    for reader in _CONFIG_READERS:
        kw = reader(obj, model_name)
        if kw:
            return dict(kw)
    return {}


def list_formats() -> List[str]:
    return [c.name for c in _CONVERTERS] + ['visionpe']


def unwrap_state_dict(obj: Any) -> StateDict:
    """Take the weights out of common checkpoint containers and strip DDP/compile prefixes."""
    if isinstance(obj, Mapping):
        for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model', 'module', 'weights'):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f'checkpoint holds a {type(obj).__name__}, not a state dict')
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ('module.', '_orig_mod.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_checkpoint_file(path: Union[str, Path]) -> Any:
    """Load a ``.safetensors`` / ``.pth`` / ``.ckpt`` file (weights only, CPU) without unwrapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint file {path} does not exist')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        return load_file(str(path), device='cpu')
    from ..train.ckpt_io import CheckpointError, read_checkpoint
    try:  # the one safe reader: says what an empty, truncated or foreign file is; refuses code-running pickles
        return read_checkpoint(path, 'cpu')
    except CheckpointError as e:
        raise CheckpointMismatchError(str(e)) from None


def detect_format(state_dict: Mapping[str, Any], model: nn.Module) -> Optional[Converter]:
    for conv in _CONVERTERS:
        if conv.detect(state_dict, model):
            return conv
    return None


def _model_family(model: nn.Module) -> str:
    return type(model).__module__.rsplit('.', 1)[-1]


def convert_state_dict(state_dict: Any, model: nn.Module) -> Tuple[StateDict, str]:
    """Unwrap, convert and validate; returns ``(state_dict, format_name)``."""
    sd = unwrap_state_dict(state_dict)
    conv = detect_format(sd, model)
    name = 'visionpe'
    if conv is not None:
        sd = conv.convert(dict(sd), model)
        name = conv.name
    validate_state_dict(sd, model, name)
    return sd, name


def _classifier_names(model: nn.Module) -> List[str]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('classifier', 'head')
    return [names] if isinstance(names, str) else list(names)


def validate_state_dict(sd: StateDict, model: nn.Module, fmt: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming every key that does not fit.

    A classifier of another size is dropped with a warning (fine-tuning to new classes is the one
    expected adaptation); everything else must match exactly.
    """
    own = model.state_dict()
    heads = {f'{c}.{p}' for c in _classifier_names(model) for p in ('weight', 'bias')}
    # another number of classes: the head's first (class) dimension differs and nothing else (a head of
    # another width is a plain shape mismatch: the whole model has another width)
    head_mismatch = [k for k in heads if k in sd and k in own and sd[k].shape != own[k].shape]
    if any(sd[k].shape[1:] != own[k].shape[1:] for k in head_mismatch):
        head_mismatch = []
    cfg = getattr(model, 'pretrained_cfg', None)
    if head_mismatch:
        _logger.warning(f'{fmt} checkpoint: classifier {sorted(head_mismatch)} has another number of classes '
                        f'({tuple(sd[head_mismatch[0]].shape)} vs {tuple(own[head_mismatch[0]].shape)}); '
                        f'the model keeps its freshly initialised head')
        for k in heads:
            sd.pop(k, None)
        if isinstance(cfg, dict):
            cfg['num_classes'] = -1  # tells timm's loader the head is not in the checkpoint
    elif isinstance(cfg, dict) and getattr(model, 'num_classes', None) is not None:
        cfg['num_classes'] = model.num_classes  # the checkpoint's head fits: load it strictly
    missing = sorted(k for k in own if k not in sd and not (head_mismatch and k in heads))
    unexpected = sorted(k for k in sd if k not in own)
    wrong = sorted(f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}'
                   for k in sd if k in own and sd[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        lines = [f'checkpoint (detected format: {fmt}) does not fit {type(model).__name__}'
                 f' {getattr(model, "pretrained_cfg", {}).get("architecture", "")}:']
        for title, keys in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', wrong)):
            if keys:
                shown = ', '.join(keys[:12]) + (f', ... ({len(keys)} in all)' if len(keys) > 12 else '')
                lines.append(f'  {title}: {shown}')
        lines.append('  check that the model name and its options (size, encoding, class token, ...) match '
                     'the checkpoint; known formats: ' + ', '.join(list_formats()))
        raise CheckpointMismatchError('\n'.join(lines))


def checkpoint_filter_fn(state_dict: Any, model: nn.Module) -> StateDict:
    """timm ``pretrained_filter_fn`` for every visionpe model."""
    sd, fmt = convert_state_dict(state_dict, model)
    _logger.info(f'loaded a {fmt} checkpoint into {type(model).__name__}')
    return sd
