"""One attention: qkv projection, position-encoding hooks, backend dispatch.

``attend(q, k, v, ...)`` computes ``softmax(scale * q k^T + bias) v`` with one of four backends,
all equal to fp32 rounding:

``math``      the reference: explicit logits, softmax, product. Returns the probabilities when
              asked (iRPE on values needs them).
``sdpa``      ``torch.nn.functional.scaled_dot_product_attention``; additive biases are passed 4-D,
              ``(B or 1, heads, N, N)`` (a 3-D bias falls off SDPA's fast CPU kernel).
``xformers``  ``xformers.ops.memory_efficient_attention`` on CUDA; biases are stored padded to a
              multiple of 8 in the last dimension, as its kernels require.
``flex``      ``torch.nn.attention.flex_attention`` with a ``score_mod`` that computes the bias
              inside the kernel instead of materialising it (forward-only on CPU; compiled with
              ``torch.compile`` on CUDA, see :func:`flex_compiled`).

Bias memory: an additive bias is ``(B or 1, heads, N, N)``, 384 MiB per sample for a ViT-S at
1024 px. When no gradient is needed and the whole bias would exceed the bias budget
(``VISIONPE_MAX_BIAS_MB``, default 16, or :func:`bias_budget` in a ``with`` block), encodings that
can build it by query rows (``PosEncoding.row_bias``) get SDPA (or the math path, when they need the
probabilities) called one block of rows at a time (blocks of at most a quarter of that budget); the
result is the same, the peak memory is not. The evaluator sets a 1 GiB budget (``--max-bias-mb``).

``auto`` picks xformers on CUDA when it is installed, else SDPA, and the math path whenever an
encoding needs the attention probabilities. The backend is a setting, never a code edit: the
``attn_backend`` argument of a model or module, :func:`use_backend` as a context manager, or the
environment variable ``VISIONPE_ATTN_BACKEND``. Precedence: context manager, then an explicit
module setting, then the environment variable, then ``auto``.

Test-time knobs declared here (:class:`visionpe.pos.base.Knob`): ``temperature`` (:data:`TEMPERATURE`)
and ``backend`` (:data:`BACKEND`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import threading
import warnings
from typing import Callable, Iterator, Optional, Tuple, TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pos.base import Knob, KnobContext, register_knob

if TYPE_CHECKING:
    from .pos.base import LayerPos

__all__ = [
    'BACKENDS', 'Attention', 'attend', 'check_backend', 'run_backend', 'resolve_backend', 'use_backend',
    'set_attn_backend', 'xformers_available', 'flex_available', 'flex_compiled', 'bias_budget', 'max_bias_bytes', 'bias_block_rows',
    'attend_by_row_blocks', 'TEMPERATURE', 'BACKEND', 'attention_lengths',
]

BACKENDS = ('auto', 'math', 'sdpa', 'xformers', 'flex')
ENV_VAR = 'VISIONPE_ATTN_BACKEND'
MAX_BIAS_ENV_VAR = 'VISIONPE_MAX_BIAS_MB'
DEFAULT_MAX_BIAS_MB = 16.0
ScoreMod = Callable[..., torch.Tensor]

_override = threading.local()


def check_backend(name: str) -> str:
    """``name`` if it is a known backend (``BACKENDS``), else a ValueError that lists them."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)} "
                         f"(argument attn_backend=..., or environment variable {ENV_VAR})")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend for every attention call inside the ``with`` block (this thread)."""
    check_backend(name)
    prev = getattr(_override, 'name', None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = prev


def set_attn_backend(model: nn.Module, name: str) -> nn.Module:
    """Set the backend of every visionpe attention module inside ``model``."""
    check_backend(name)
    for m in model.modules():
        if hasattr(m, 'attn_backend'):
            m.attn_backend = name
    return model


_XFORMERS: Optional[bool] = None


def xformers_available() -> bool:
    global _XFORMERS
    if _XFORMERS is None:
        _XFORMERS = importlib.util.find_spec('xformers') is not None
    return _XFORMERS


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
        return True
    except ImportError:
        return False


def resolve_backend(
        requested: str,
        device: torch.device,
        needs_probs: bool = False,
        training: bool = False,
) -> str:
    """The backend one call will use. Explains itself with a warning when it must fall back."""
    name = getattr(_override, 'name', None) or (requested if requested != 'auto' else None) \
        or os.environ.get(ENV_VAR) or 'auto'
    check_backend(name)
    if needs_probs:
        if name not in ('auto', 'math'):
            _warn_once(f'attention backend {name!r} cannot return attention probabilities, which this '
                       f'encoding needs (e.g. iRPE on values); using the math path')
        return 'math'
    if name == 'auto':
        return 'xformers' if device.type == 'cuda' and xformers_available() else 'sdpa'
    if name == 'xformers' and not (device.type == 'cuda' and xformers_available()):
        why = 'not installed' if not xformers_available() else f'CUDA only (tensors are on {device.type})'
        _warn_once(f'xformers backend unavailable ({why}); using sdpa')
        return 'sdpa'
    if name == 'flex':
        if not flex_available():
            _warn_once('FlexAttention is not available in this torch build; using sdpa')
            return 'sdpa'
        if training and device.type == 'cpu' and torch.is_grad_enabled():
            _warn_once('FlexAttention has no CPU backward; using sdpa for this training step')
            return 'sdpa'
    return name


_warned: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def _math(q, k, v, scale, bias, dropout_p, training, into_bias=False):
    """``into_bias``: ``bias`` is a fresh tensor of the caller's (no autograd), so the logits may be
    accumulated into it (``baddbmm_``) when it is contiguous and has their shape: one (B, H, N, M)
    buffer and one pass over it fewer."""
    if (into_bias and bias is not None and bias.is_contiguous() and bias.shape == (*q.shape[:-1], k.shape[-2])
            and not _records_grad(q, k, v, bias)):
        attn = bias.view(-1, *bias.shape[-2:]).baddbmm_(
            (q * scale).reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:]).transpose(-2, -1)).view(bias.shape)
        bias = None
    else:
        attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn.add_(bias) if attn.shape == torch.broadcast_shapes(attn.shape, bias.shape) else attn + bias
    if _records_grad(q, k, v, bias):
        attn = attn.softmax(dim=-1)
    else:  # in place: a second (B, H, N, M) buffer cost 15% of the attention at 785 tokens (fresh pages)
        attn = torch.softmax(attn, dim=-1, out=attn)
    probs = attn
    if dropout_p > 0. and training:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v, probs


def _records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _sdpa(q, k, v, scale, bias, dropout_p, training):
    dv = v.shape[-1]
    if q.device.type == 'cpu' and q.shape[-1] > dv:
        # q, k wider than v (PoPE, PaPE): SDPA's fused CPU kernel needs one head width. Without autograd and
        # with logits within the bias budget, explicit logits (softmax in place, v at its own width) take
        # 0.82-0.85x the time of the fused kernel on zero-padded v (ViT-S heads, 197 x 4 and 785 tokens);
        # else zero columns of v (0.70x the time of SDPA's own unfused fallback at 785 tokens)
        logits_bytes = q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * 4
        if not (_records_grad(q, k, v, bias) or (training and dropout_p > 0.)) and logits_bytes <= max_bias_bytes():
            return _math(q, k, v, scale, bias, 0., False)[0]
        v_wide = v.new_empty(*v.shape[:-1], q.shape[-1])
        v_wide[..., dv:].zero_()
        v_wide[..., :dv] = v
        return _sdpa(q, k, v_wide, scale, bias, dropout_p, training)[..., :dv]
    if bias is not None:
        if bias.dim() < 4:
            bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        bias = bias.to(q.dtype)
    dq, dv = q.shape[-1], v.shape[-1]
    if dq != dv:
        # fused kernels need one head dim for q, k and v; q/k widened by an encoding (PaPE, PoPE) would fall back
        # to a slower one (ViT-S, 72 vs 64 channels on CPU: 1.8x the time). Zero channels change nothing.
        if dq > dv:
            v = F.pad(v, (0, dq - dv))
        else:
            q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout_p if training else 0., scale=scale)
    return out[..., :dv] if dq > dv else out


def pad_bias_for_xformers(bias: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(B|1, H|1, N, M) -> (B, H, N, M) view of a tensor whose last dim is padded to a multiple of 8."""
    n, m = bias.shape[-2:]
    m8 = (m + 7) // 8 * 8
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    store = bias.new_zeros(bias.shape[0], bias.shape[1], n, m8)
    store[..., :m] = bias
    return store[..., :m].expand(batch, heads, n, m)


def _xformers(q, k, v, scale, bias, dropout_p, training):
    import xformers.ops as xops
    B, H = q.shape[:2]
    if bias is not None:
        bias = pad_bias_for_xformers(bias.to(q.dtype), B, H)
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_bias=bias, p=dropout_p if training else 0., scale=scale)
    return out.transpose(1, 2)


FLEX_COMPILE_ENV_VAR = 'VISIONPE_FLEX_COMPILE'
_COMPILED_FLEX: Optional[Callable] = None


def flex_compiled(device: torch.device) -> bool:
    """Whether the flex backend runs ``torch.compile(flex_attention)`` on ``device``: on CUDA unless
    ``VISIONPE_FLEX_COMPILE=0``. Eager FlexAttention on CUDA computes the whole score matrix (no fused
    kernel); on CPU it stays eager (``VISIONPE_FLEX_COMPILE=1`` forces compiling there: each shape
    then costs tens of seconds of compilation, and torch 2.14's compiled CPU kernel was measured
    wrong with a captured bias at 24 tokens)."""
    raw = os.environ.get(FLEX_COMPILE_ENV_VAR, '')
    if raw not in ('', '0', '1'):
        raise ValueError(f'{FLEX_COMPILE_ENV_VAR} must be 0 or 1, got {raw!r}')
    return raw == '1' or (raw == '' and device.type == 'cuda')


def _flex_attention(device: torch.device) -> Callable:
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if not flex_compiled(device):
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def _flex(q, k, v, scale, bias, score_mod):
    flex_attention = _flex_attention(q.device)
    if score_mod is None and bias is not None:
        b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        bb, bh = b4.shape[0] > 1, b4.shape[1] > 1

        def score_mod(score, b, h, qi, ki):
            return score + b4[b if bb else 0, h if bh else 0, qi, ki]
    return flex_attention(q, k, v, score_mod=score_mod, scale=scale)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None,
           score_mod: Optional[ScoreMod] = None, backend: str = 'auto', dropout_p: float = 0., training: bool = False,
           need_probs: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``softmax(scale * q k^T + bias) v`` for q, k: (B, H, N, Dk), v: (B, H, M, Dv).

    ``bias`` broadcasts to (B, H, N, M). ``score_mod`` (flex only) is the in-kernel equivalent
    of ``bias``; other backends use ``bias``, so an encoding that offers a score_mod must also
    be able to produce the tensor. Returns ``(out, probs)``; probs only from the math path.
    """
    name = resolve_backend(backend, q.device, needs_probs=need_probs, training=training)
    return run_backend(name, q, k, v, scale, bias, score_mod, dropout_p, training)


def run_backend(
        name: str,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        bias: Optional[torch.Tensor] = None,
        score_mod: Optional[ScoreMod] = None,
        dropout_p: float = 0.,
        training: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run one already-resolved backend (see :func:`resolve_backend`)."""
    if name == 'math':
        return _math(q, k, v, scale, bias, dropout_p, training)
    if name == 'sdpa':
        return _sdpa(q, k, v, scale, bias, dropout_p, training), None
    if name == 'xformers':
        return _xformers(q, k, v, scale, bias, dropout_p, training), None
    return _flex(q, k, v, scale, bias, score_mod), None


@contextlib.contextmanager
def bias_budget(mb: float) -> Iterator[None]:
    """Set the bias budget (MiB, see :func:`max_bias_bytes`) inside the ``with`` block (this thread),
    over ``VISIONPE_MAX_BIAS_MB``. Large batches want a larger one: a block is at most a quarter of
    the budget across the whole batch, so batch 256 at 1,024 tokens gets one query row per call with
    the 16 MiB default (4x slower than 64-row blocks, measured)."""
    if not mb > 0:
        raise ValueError(f'the bias budget must be a positive number of MiB, got {mb!r}')
    prev = getattr(_override, 'bias_mb', None)
    _override.bias_mb = float(mb)
    try:
        yield
    finally:
        _override.bias_mb = prev


def max_bias_bytes() -> int:
    """Largest bias SDPA gets whole when no gradient is needed: :func:`bias_budget` if set, else
    ``VISIONPE_MAX_BIAS_MB`` (MiB, default 16)."""
    override = getattr(_override, 'bias_mb', None)
    if override is not None:
        return int(override * 2 ** 20)
    raw = os.environ.get(MAX_BIAS_ENV_VAR)
    try:
        mb = DEFAULT_MAX_BIAS_MB if raw is None else float(raw)
    except ValueError:
        raise ValueError(f'{MAX_BIAS_ENV_VAR} must be a number of MiB, got {raw!r}') from None
    if mb <= 0:
        raise ValueError(f'{MAX_BIAS_ENV_VAR} must be positive, got {raw!r}')
    return int(mb * 2 ** 20)


def bias_block_rows(pos: 'LayerPos', q: torch.Tensor, k: torch.Tensor) -> Optional[int]:
    """Query rows per block when ``pos``'s bias should be built by rows, else None (build it whole).

    Only without autograd: SDPA's backward keeps every block's bias, so blocks would save nothing.
    """
    kind = pos.row_bias
    if kind is None or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return None
    B, H, N, _ = q.shape
    row_bytes = (B if kind == 'per_sample' else 1) * H * k.shape[-2] * 4
    limit = max_bias_bytes()
    if row_bytes * N <= limit:
        return None
    return max(1, limit // 4 // row_bytes)


def attend_by_row_blocks(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         pos: 'LayerPos', rows: int) -> torch.Tensor:
    """Attention with ``pos``'s bias built and applied ``rows`` query rows at a time (same result as
    whole). ``backend``: ``'sdpa'``, or ``'math'`` for encodings that need the probabilities, whose
    value term is then added per block (:meth:`PosEncoding.value_rows`)."""
    N = q.shape[-2]
    if backend == 'math':  # once here, not once per block (a batched matmul copies strided operands)
        k, v = k.contiguous(), v.contiguous()
    out = []
    for r0 in range(0, N, rows):
        block = slice(r0, min(N, r0 + rows))
        bias = pos.bias_rows(q, k, scale, block)
        if backend == 'math':  # a per-sample bias is built fresh for each block: the logits go into it
            o, probs = _math(q[:, :, block], k, v, scale, bias, 0., False, into_bias=pos.row_bias == 'per_sample')
            out.append(pos.value_rows(o, v, probs, block) if pos.needs_probs else o)
        else:
            out.append(_sdpa(q[:, :, block], k, v, scale, bias, 0., False))
    return torch.cat(out, dim=-2)


# ------------------------------------------------------------------------------------ test-time knobs
@torch.no_grad()
def attention_lengths(model: nn.Module, hw: tuple[int, int]) -> dict:
    """Sequence length seen by every :class:`Attention` of ``model`` at input size ``hw`` (one forward of one
    image)."""
    seen: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod, int(args[0].shape[-2])))
             for m in TEMPERATURE.targets(model)]
    try:
        p = next(model.parameters(), None)
        model(torch.zeros(1, getattr(model, 'in_chans', 3), *hw, device=p.device if p is not None else None))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _on_off(word: str) -> bool:
    raise ValueError(f'--temperature takes off or on, not {word!r}')


def _set_temperature(attn: 'Attention', on: bool, ctx: KnobContext) -> None:
    if on:
        n = ctx.once('attention_lengths', lambda: attention_lengths(ctx.model, ctx.train_size)).get(attn, 0)
        attn.temperature_ref_tokens = n if n > 1 else None


#: softmax scale times log(N) / log(N_train) (entropy-invariant attention scaling, Chiang & Cholak 2022),
#: N_train measured per attention module at the training size
TEMPERATURE = Knob('temperature', 'attention temperature log(N)/log(N_train): "--temperature" alone = on; '
                   '"off on" sweeps', _on_off, default=False, words=(('off', False), ('on', True)), bare=True,
                   check=bool, label=lambda on: 'temp=logN', rank=80, attrs=('temperature_ref_tokens',),
                   set=_set_temperature, needs_train_size=bool)
#: the attention backend of every attention call (:func:`use_backend`)
BACKEND = Knob('backend', 'attention backends: auto math sdpa xformers flex', check_backend, flag='--backends',
               check=check_backend, label=lambda b: f'attn={b}', rank=90, context=use_backend,
               find=lambda model: [m for m in model.modules() if hasattr(m, 'attn_backend')])
register_knob(TEMPERATURE, BACKEND)


class Attention(nn.Module):
    """Multi-head self-attention with position-encoding hooks (timm key names: qkv, proj).

    Per call it asks ``pos`` (a :class:`visionpe.pos.base.LayerPos`) to rotate q and k, for an
    additive bias (or an in-kernel score_mod), and to add a value term after attention.
    """
    test_knobs = (TEMPERATURE,)

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            qk_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
            attn_backend: str = 'auto',
            k_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_backend = check_backend(attn_backend)
        #: test-time knob: when set to the training sequence length N_train, the softmax scale is
        #: multiplied by log(N) / log(N_train) (attention temperature / entropy-invariant scaling)
        self.temperature_ref_tokens: Optional[int] = None
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        #: False: the key third of the qkv bias is held at zero (DINOv3's masked k bias; it gets no gradient)
        self.k_bias = k_bias
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, pos: Optional['LayerPos'] = None) -> torch.Tensor:
        B, N, C = x.shape
        if self.k_bias or self.qkv.bias is None:
            qkv = self.qkv(x)
        else:
            q_b, _, v_b = self.qkv.bias.chunk(3)
            qkv = F.linear(x, self.qkv.weight, torch.cat([q_b, torch.zeros_like(q_b), v_b]))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        scale = self.scale
        if self.temperature_ref_tokens:
            scale = scale * math.log(N) / math.log(self.temperature_ref_tokens)
        bias = score_mod = None
        if pos is not None:
            q, k = pos.rotate(q, k)
        backend = resolve_backend(self.attn_backend, x.device, needs_probs=pos is not None and pos.needs_probs,
                                  training=self.training)
        by_rows = backend in ('sdpa', 'math') and pos is not None and not (self.training and self.attn_drop > 0)
        rows = bias_block_rows(pos, q, k) if by_rows else None
        if rows:
            out = attend_by_row_blocks(backend, q, k, v, scale, pos, rows)
            if not pos.needs_probs:  # else the value term was added block by block
                out = pos.value(out, v, None)
        else:
            if pos is not None:
                if backend == 'flex':
                    score_mod = pos.score_mod(q, k, scale)
                if score_mod is None:
                    bias = pos.bias(q, k, scale)
            out, probs = run_backend(backend, q, k, v, scale, bias, score_mod,
                                     dropout_p=self.attn_drop, training=self.training)
            if pos is not None:
                out = pos.value(out, v, probs)
        x = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, head_dim={self.head_dim}, backend={self.attn_backend}'

