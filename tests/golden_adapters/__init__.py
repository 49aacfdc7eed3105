"""Golden-vector sets and the adapters that reproduce them with visionpe models.

Every folder under the golden root that holds a ``config.json`` is one set. Its ``target``
(config key) selects an adapter registered here with :func:`golden_adapter`; the adapter builds
our model from the upstream config, loads the upstream ``state_dict.safetensors`` through the
package converters, and returns every output tensor the set stores, under the same names.
The harness compares all of them (not only logits); tensors matching the adapter's ``inputs``
patterns are inputs and are not compared.
"""
from __future__ import annotations

import fnmatch
import importlib
import json
import pkgutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from safetensors.torch import load_file

__all__ = ['GoldenSet', 'golden_adapter', 'discover', 'get_adapter', 'compare_set', 'ADAPTERS']


@dataclass
class GoldenSet:
    path: Path
    root: Path

    @property
    def name(self) -> str:
        return str(self.path.relative_to(self.root))

    @cached_property
    def config(self) -> dict:
        return json.loads((self.path / 'config.json').read_text())

    @property
    def target(self) -> str:
        return self.config['target']

    @cached_property
    def tensors(self) -> Dict[str, torch.Tensor]:
        return load_file(str(self.path / 'tensors.safetensors'))

    @property
    def state_dict_path(self) -> Path:
        return self.path / 'state_dict.safetensors'

    @cached_property
    def state_dict(self) -> Dict[str, torch.Tensor]:
        return load_file(str(self.state_dict_path))


@dataclass
class Adapter:
    target: str
    fn: Callable[[GoldenSet], Dict[str, torch.Tensor]]
    inputs: Tuple[str, ...] = ('input_*',)
    atol: float = 1e-5
    # (pattern, tolerance) for named ill-conditioned tensors; the adapter must say why in its docstring
    atol_for: Tuple[Tuple[str, float], ...] = ()
    # patterns of tensors with large values (golden NOTES say so): tolerance atol * max(1, max|reference|)
    relative: Tuple[str, ...] = ()

    def tolerance(self, name: str, reference: Optional[torch.Tensor] = None) -> float:
        tol = next((tol for pat, tol in self.atol_for if fnmatch.fnmatch(name, pat)), self.atol)
        if reference is not None and reference.numel() and any(fnmatch.fnmatch(name, p) for p in self.relative):
            tol *= max(1.0, float(reference.double().abs().max()))
        return tol


ADAPTERS: Dict[str, Adapter] = {}


def golden_adapter(*targets: str, inputs: Iterable[str] = ('input_*',), atol: float = 1e-5,
                   atol_for: Iterable[Tuple[str, float]] = (), relative: Iterable[str] = ()):
    def deco(fn):
        for t in targets:
            ADAPTERS[t] = Adapter(t, fn, tuple(inputs), atol, tuple(atol_for), tuple(relative))
        return fn
    return deco


def _load_all() -> None:
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f'{__name__}.{mod.name}')


def discover(root: Path) -> List[GoldenSet]:
    if not root.is_dir():
        return []
    return [GoldenSet(p.parent, root) for p in sorted(root.rglob('config.json'))]


def get_adapter(target: str) -> Optional[Adapter]:
    _load_all()
    return ADAPTERS.get(target)


def compare_set(gs: GoldenSet) -> List[Tuple[str, float, float]]:
    """Run the set's adapter; returns ``(tensor name, max abs diff, tolerance)`` for every output.

    Raises AssertionError when the adapter is missing or leaves a stored output uncomputed.
    """
    adapter = get_adapter(gs.target)
    assert adapter is not None, f'no golden adapter for target {gs.target!r} (set {gs.name})'
    expected = {k: v for k, v in gs.tensors.items()
                if not any(fnmatch.fnmatch(k, pat) for pat in adapter.inputs)}
    with torch.no_grad():
        got = adapter.fn(gs)
    missing = sorted(set(expected) - set(got))
    assert not missing, f'{gs.name}: adapter did not compute {missing}'
    rows = []
    for k in sorted(expected):
        e, g = expected[k], got[k]
        assert tuple(e.shape) == tuple(g.shape), f'{gs.name}/{k}: shape {tuple(g.shape)} != {tuple(e.shape)}'
        if e.dtype in (torch.int64, torch.int32, torch.bool):
            diff = float((e.long() != g.long()).sum())  # integer tensors must match exactly
        else:
            diff = float((e.double() - g.detach().double()).abs().max()) if e.numel() else 0.0
        rows.append((k, diff, 0.0 if e.dtype in (torch.int64, torch.int32, torch.bool) else adapter.tolerance(k, e)))
    return rows


def cases(tensors: Dict[str, torch.Tensor], prefix: str = 'input_') -> List[Tuple[str, int, int]]:
    """``(suffix, H, W)`` for every stored ``input_HxW`` tensor."""
    out = []
    for k, v in tensors.items():
        if k.startswith(prefix):
            suffix = k[len(prefix):]
            out.append((suffix, v.shape[-2], v.shape[-1]))
    return sorted(out)
