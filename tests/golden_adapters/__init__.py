"""Golden-vector sets and the adapters that reproduce them with visionpe models.

Every folder under the golden root that holds a ``config.json`` is one set. Its ``target``
(config key) selects an adapter registered here with :func:`golden_adapter`; the adapter builds
our model from the upstream config, loads the upstream ``state_dict.safetensors`` through the
package converters, and returns every output tensor the set stores, under the same names.
The harness compares all of them (not only logits); tensors matching the adapter's ``inputs``
patterns are inputs and are not compared.

Tolerances scale with the tensor: the error of an output is ``max|diff| / max(1, max|ref|)`` (the
absolute difference for tensors within [-1, 1], relative for large-valued ones such as widened q/k),
and must be at most the adapter's ``atol`` (1e-5 by default, fp32). Tensors matching the adapter's
``exact`` patterns (e.g. a bias rounded to bf16 upstream) are compared at 1e-7 relative, entry by
entry (``max(|diff| / |ref|)``), which catches any rounding difference. Non-finite entries (masked
logits) must sit at the same places with the same values; integer tensors must match exactly.
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

__all__ = ['GoldenSet', 'golden_adapter', 'discover', 'get_adapter', 'compare_set', 'scaled_error',
           'ADAPTERS', 'EXACT_RTOL']


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
    # patterns of tensors compared exactly (1e-7 relative), e.g. values rounded to bf16 upstream
    exact: Tuple[str, ...] = ()

    def is_exact(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, pat) for pat in self.exact)

    def tolerance(self, name: str) -> float:
        if self.is_exact(name):
            return EXACT_RTOL
        return next((tol for pat, tol in self.atol_for if fnmatch.fnmatch(name, pat)), self.atol)


#: relative tolerance of the ``exact`` tensors
EXACT_RTOL = 1e-7


ADAPTERS: Dict[str, Adapter] = {}


def golden_adapter(*targets: str, inputs: Iterable[str] = ('input_*',), atol: float = 1e-5,
                   atol_for: Iterable[Tuple[str, float]] = (), exact: Iterable[str] = ()):
    def deco(fn):
        for t in targets:
            ADAPTERS[t] = Adapter(t, fn, tuple(inputs), atol, tuple(atol_for), tuple(exact))
        return fn
    return deco


def _load_all() -> None:
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f'{__name__}.{mod.name}')


def discover(*roots: Path) -> List[GoldenSet]:
    """Every set (folder with a ``config.json``) under the given roots; missing roots give none."""
    return [GoldenSet(p.parent, root) for root in roots if root.is_dir() for p in sorted(root.rglob('config.json'))]


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
            rows.append((k, float((e.long() != g.long()).sum()), 0.0))  # integer tensors must match exactly
        else:
            rows.append((k, scaled_error(e, g, relative=adapter.is_exact(k)), adapter.tolerance(k)))
    return rows


def scaled_error(ref: torch.Tensor, got: torch.Tensor, relative: bool = False) -> float:
    """``max|diff| / max(1, max|ref|)`` over the finite entries; with ``relative``, entry by entry
    ``max(|diff| / |ref|)`` (so that a few huge entries, such as LookHere's -3.4e38 masked logits, do
    not hide the rest). ``inf`` when the non-finite entries differ in place or value."""
    ref, got = ref.double(), got.detach().double()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(got)):
        return float('inf')
    if not torch.equal(ref[~finite].nan_to_num(0.), got[~finite].nan_to_num(0.)):  # -inf vs +inf, nan vs inf
        return float('inf')
    if not finite.any():
        return 0.0
    ref, got = ref[finite], got[finite]
    if relative:
        return float(((ref - got).abs() / ref.abs().clamp_min(torch.finfo(torch.float32).tiny)).max())
    return float((ref - got).abs().max()) / max(1.0, float(ref.abs().max()))


def cases(tensors: Dict[str, torch.Tensor], prefix: str = 'input_') -> List[Tuple[str, int, int]]:
    """``(suffix, H, W)`` for every stored ``input_HxW`` tensor."""
    out = []
    for k, v in tensors.items():
        if k.startswith(prefix):
            suffix = k[len(prefix):]
            out.append((suffix, v.shape[-2], v.shape[-1]))
    return sorted(out)
