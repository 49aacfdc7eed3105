"""Small reusable layers that timm does not provide, and the model-level ``norm_layer`` names."""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict

import torch
import torch.nn as nn
from timm.layers import RmsNorm

__all__ = ['RmsNormEpsOutside', 'NORM_LAYERS', 'norm_layer_by_name']


class RmsNormEpsOutside(nn.Module):
    """``weight * x / (sqrt(mean(x^2)) + eps)``: RMSNorm with ``eps`` added to the RMS outside the square root
    (DeiT-III RoPE code, ``models_v2.RMSNorm``, used by Spiral RoPE's models; timm's :class:`RmsNorm` adds it
    inside). The two differ visibly for small activations (e.g. a class token of scale 0.02)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.float().norm(dim=-1, keepdim=True) * x.shape[-1] ** -0.5
        return (x.float() / (rms + self.eps)).to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f'{self.weight.shape[0]}, eps={self.eps}'


#: ``norm_layer`` names a ViT accepts (all take ``eps``)
NORM_LAYERS: Dict[str, Callable[..., nn.Module]] = {
    'layernorm': nn.LayerNorm,
    'rmsnorm': RmsNorm,
    'rmsnorm_eps_outside': RmsNormEpsOutside,
}


def norm_layer_by_name(name: str, eps: float) -> Callable[[int], nn.Module]:
    if name not in NORM_LAYERS:
        raise ValueError(f"unknown norm_layer {name!r}; choose one of {', '.join(NORM_LAYERS)}")
    return partial(NORM_LAYERS[name], eps=eps)
