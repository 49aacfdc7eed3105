"""Test helpers: tiny overrides per model family so the whole zoo runs in seconds on a CPU."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Dict

import timm
import torch

import visionpe

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str) -> ModuleType:
    """Import a repository script that is not a package module (``benchmarks/*.py``, ``scripts/*.py``) by path;
    its folder goes on ``sys.path`` so that its sibling imports resolve."""
    path = ROOT / relpath
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Small but structurally complete versions of every family. Heads stay a multiple of 4 (LookHere
# layouts) and head_dim a multiple of 8 (ComRoPE blocks, RoPE pairs); three blocks so that per-layer
# parameters and "after block" hooks are exercised more than once.
FAMILY_TINY: Dict[str, Dict[str, Any]] = {
    'vit': dict(embed_dim=64, depth=3, num_heads=4),
    'swin': dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=7),
    'cswin': dict(embed_dim=32, depth=(1, 1, 2, 1), num_heads=(2, 2, 4, 4)),
    'rst': dict(embed_dim=32, depth=(1, 2, 2, 1), num_heads=(1, 2, 2, 4)),
}


# Deep and narrow ViT with many tokens (1024 at 256 px): per-layer state that grows with depth shows in memory.
DEEP_VIT = dict(embed_dim=32, depth=12, num_heads=2, patch_size=8, img_size=256, num_classes=5, dynamic_img_size=True)


def inference_peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Peak live tensor storage of one ``model(x)`` under ``torch.inference_mode`` (exact, CPU)."""
    from visionpe.benchmark import peak_memory
    with torch.inference_mode(), peak_memory('cpu') as mem:
        model(x)
    return mem.bytes


def family(name: str) -> str:
    return visionpe.models._registry._MODELS[name]


def tiny_kwargs(name: str) -> Dict[str, Any]:
    return dict(FAMILY_TINY.get(family(name), {}))


def create_tiny(name: str, **kwargs: Any) -> torch.nn.Module:
    return timm.create_model(name, **{**tiny_kwargs(name), **kwargs})


def all_models():
    return visionpe.list_models()


def one_size_per_encoding():
    """The ``*_tiny`` preset of every encoding and family (one per ViT encoding, Swin encoding, CSWin, RST)."""
    return visionpe.list_models('*_tiny')


def assert_backends_agree(model: torch.nn.Module, x: torch.Tensor, backends=('sdpa', 'flex'), atol: float = 1e-5,
                          features: bool = False) -> None:
    """``model`` (eval mode) gives the math path's output, within ``atol``, under every backend of ``backends``
    (``features``: compare ``forward_features`` instead of the logits)."""
    from visionpe.attention import use_backend
    run = model.forward_features if features else model
    outs = {}
    with torch.no_grad():
        for backend in ('math', *backends):
            with use_backend(backend):
                outs[backend] = run(x)
    for backend in backends:
        diff = (outs[backend] - outs['math']).abs().max()
        assert diff <= atol, (backend, float(diff))
