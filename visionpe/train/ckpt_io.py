"""The one reader of Lightning ``.ckpt`` files: safe by default.

A Lightning checkpoint is a pickle. :func:`read_checkpoint` unpickles it with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers (dict, list,
tuple, str, numbers) plus the few extra types allow-listed in :data:`SAFE_GLOBALS`; a file that asks
for anything else (a function, a class that could run code) is refused with
:class:`UnsafeCheckpointError`, without running it. ``trust=True`` (``--trust-checkpoint`` on the
command lines) is the explicit opt-in for files the user vouches for.
"""
from __future__ import annotations

import pathlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ['CheckpointError', 'UnsafeCheckpointError', 'SAFE_GLOBALS', 'read_checkpoint', 'checkpoint_hparams']

#: types beyond torch's weights-only defaults that visionpe checkpoints may hold (paths in hyper-parameters)
SAFE_GLOBALS: list[Any] = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint (empty, truncated, another format)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle asks for code or classes outside the allow-list."""


def _blocked_global(message: str) -> str:
    m = re.search(r'GLOBAL ([\w.]+)', message)
    return m.group(1) if m else 'an object outside the allow-list'


def read_checkpoint(path: str | Path, map_location: str | torch.device = 'cpu', *, trust: bool = False
                    ) -> dict[str, Any]:
    """Load a ``.ckpt`` / ``.pth`` pickle as a dict, refusing anything that could run code unless ``trust``.

    Errors name the file and what it is: :class:`FileNotFoundError` (no such file),
    :class:`CheckpointError` (empty, truncated or not a PyTorch file, or not a dict),
    :class:`UnsafeCheckpointError` (the pickle asks for a global outside the allow-list).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f'{path} is empty (0 bytes): not a checkpoint; was the run killed while saving it?')
    if trust:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    else:
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                obj = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            what = _blocked_global(str(e))
            raise UnsafeCheckpointError(
                f'{path}: refused to load: its pickle asks for {what}, which a visionpe checkpoint never holds '
                f'(only tensors and plain values), and unpickling it could run code. If you made this file or '
                f'trust its source, pass --trust-checkpoint (trust=True in Python)') from None
        except (EOFError, RuntimeError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
            raise CheckpointError(f'{path} ({size} bytes) is not a readable PyTorch checkpoint (a truncated file or '
                                  f'another format: {type(e).__name__}); expected a .ckpt written by train.py') from None
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a checkpoint dict')
    return obj


def checkpoint_hparams(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """The ``hyper_parameters`` of a ``train.py`` checkpoint (``model_name``, ``model_kwargs``, ...)."""
    hp = read_checkpoint(path, trust=trust).get('hyper_parameters')
    if not isinstance(hp, dict) or 'model_name' not in hp:
        raise CheckpointError(f'{path} is not a visionpe train.py checkpoint (it has no hyper_parameters.model_name)')
    return hp
