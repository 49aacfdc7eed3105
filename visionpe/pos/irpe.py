"""iRPE: image relative position encoding (Wu et al., "Rethinking and Improving Relative Position
Encoding for Vision Transformer", ICCV 2021; microsoft/Cream ``iRPE/DeiT-with-iRPE/irpe.py``;
docs/encodings.md, "iRPE").

Every query/key pair falls in a bucket given by the 2-D offset ``query - key`` (rows ``dr``,
columns ``dc``, patch units) through the piecewise index ``g`` (``alpha = r``, ``beta = 2r``,
``gamma = 8r`` for ``ratio = r``)::

    g(x) = round(x)                                                      if |x| <= alpha
    g(x) = trunc(sign(x) * min(beta, round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha))))

(the reference clips to the float ``beta`` and then truncates, so ``g`` saturates at ``int(beta)``).
Methods: ``product`` (``(g(dr) + B)(2B + 1) + g(dc) + B``, ``B = int(beta)``), ``cross`` (one table
for ``g(dr)`` and one for ``g(dc)``, summed), ``euclidean`` (``g(round(sqrt(dr^2 + dc^2)))``) and
``quantization`` (``g(dr^2 + dc^2)``). Prefix tokens (class, registers) share one extra bucket.

Modes, with tables per head or shared across heads (zero-initialised, as upstream):

* ``bias``: ``logit_ij += t_k[bucket(i, j)] + t_q[bucket(j, i)]``;
* ``ctx`` (contextual): on keys ``logit_ij += (s q_i) . r_k[:, bucket(i, j)]``; on queries
  ``logit_ij += (s k_j) . r_q[:, bucket(j, i)]``; on values ``out_i += sum_j a_ij r_v[bucket(i, j)]``.

``s = head_dim^-0.5`` is the only scaling. Efficiency: the contextual term is computed as
``(s q) @ r`` of shape ``(B, H, N, buckets)`` followed by a gather with the per-grid bucket ids
(never an ``N x N x head_dim`` tensor); the value term scatters the attention probabilities into
``(B, H, N, buckets)`` and multiplies by ``r_v``. FlexAttention gets a ``score_mod`` that reads
the ``(B, H, N, buckets)`` products inside the kernel, so no ``N x N`` bias is built.

Parameter names follow upstream inside ``pe.layers.{i}``: ``rpe_k.lookup_table_weight``,
``rpe_q.lookup_table_bias``, ``rpe_v.rp_rows.lookup_table_weight`` (cross) ...
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..grid import Grid, GridCache, check_coord_mode, grid_coords
from . import register_encoding
from .base import COORD_MODE, EncodingContext, PosEncoding

__all__ = ['IRPE', 'IRPETable', 'piecewise_index', 'irpe_bucket_ids', 'irpe_num_buckets', 'IRPE_METHODS']

IRPE_METHODS = ('product', 'cross', 'euclidean', 'quantization')
_METHOD_ALIASES = {'euc': 'euclidean', 'quant': 'quantization'}
_MODES = {'ctx': 'ctx', 'contextual': 'ctx', 'bias': 'bias'}
_COORD_MODES = ('index', 'ref')


def _coefficients(ratio: float) -> Tuple[float, float, float]:
    return 1.0 * ratio, 2.0 * ratio, 8.0 * ratio


def piecewise_index(rel: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """The piecewise index ``g`` of the module docstring, elementwise; int64 result.

    Evaluated in float32 in the reference's order of operations, so bucket ids match it exactly.
    """
    rel = rel.float()
    rel_abs = rel.abs()
    far = rel_abs > alpha
    y = torch.log(rel_abs.clamp_min(alpha) / alpha) / math.log(gamma / alpha) * (beta - alpha)
    y = torch.sign(rel) * (alpha + y).round().clip(max=beta)
    return torch.where(far, y, rel.round()).long()  # float -> int64 truncates (3.8 -> 3)


def irpe_num_buckets(method: str, ratio: float) -> int:
    """Buckets of one table, without the prefix bucket: ``(2B+1)^2`` (product) or ``2B+1``."""
    b = int(_coefficients(ratio)[1])
    return (2 * b + 1) ** 2 if method == 'product' else 2 * b + 1


def irpe_bucket_ids(
        h: int,
        w: int,
        num_prefix: int,
        method: str = 'product',
        ratio: float = 1.9,
        coord_mode: str = 'index',
        ref_hw: Optional[Tuple[int, int]] = None,
        dtype: torch.dtype = torch.int64,
        block_rows: int = 256,
) -> Tuple[torch.Tensor, ...]:
    """Bucket ids ``(P + h*w, P + h*w)`` in ``dtype`` for query i, key j: one matrix, or (rows, cols)
    for cross.

    Every pair involving one of the ``num_prefix`` prefix tokens gets the extra bucket
    ``irpe_num_buckets(method, ratio)``. Built ``block_rows`` query rows at a time, so the float
    offsets never exceed ``block_rows x h*w`` (at 1024 px a whole float offset matrix is 64 MiB).
    """
    if method not in IRPE_METHODS:
        raise ValueError(f"unknown iRPE method {method!r}; choose one of {', '.join(IRPE_METHODS)}")
    alpha, beta, gamma = _coefficients(ratio)
    b = int(beta)

    def g(x: torch.Tensor) -> torch.Tensor:
        return piecewise_index(x, alpha, beta, gamma) + b

    def block(dr: torch.Tensor, dc: torch.Tensor) -> List[torch.Tensor]:
        if method == 'product':
            return [g(dr) * (2 * b + 1) + g(dc)]
        if method == 'cross':
            return [g(dr), g(dc)]
        if method == 'euclidean':
            return [g((dr * dr + dc * dc).sqrt().round())]
        return [g(dr * dr + dc * dc)]  # quantization

    xy = grid_coords(h, w, coord_mode, ref_hw=ref_hw)
    n, p = xy.shape[0], num_prefix
    extra = irpe_num_buckets(method, ratio)
    out = [torch.full((p + n, p + n), extra, dtype=dtype) for _ in range(2 if method == 'cross' else 1)]
    for r0 in range(0, n, block_rows):
        q = xy[r0:r0 + block_rows]
        mats = block(q[:, None, 1] - xy[None, :, 1], q[:, None, 0] - xy[None, :, 0])  # query minus key
        for o, m in zip(out, mats):
            o[p + r0:p + r0 + q.shape[0], p:] = m
    return tuple(out)


def _index(ids: torch.Tensor) -> torch.Tensor:
    """Compactly stored bucket ids as an index tensor (int64: gather and advanced indexing need it,
    and a uint8 index would be read as a boolean mask)."""
    return ids.long()


def _separable_index(ids: torch.Tensor, grid: Grid, C: int) -> Dict[str, torch.Tensor]:
    """Gather indices of the product method's row x column structure: on the patch tokens,
    ``ids[(r, c), (r', c')] = A[r, r'] C + K[c, c']`` (``C = 2B + 1``; the row bucket depends on the rows
    only, the column bucket on the columns only). With ``n = h w`` tokens:

    * ``col_k`` (n, C w): ``a C + K[c_i, c']`` (query i, row bucket a, key column c');
    * ``row_k`` (n h,): ``i C + A[r_i, r']`` (query i, key row r');
    * ``col_q`` (w, C w): ``a C + K[c', c]`` at ``[c', (a, c)]`` (key column c', query column c);
    * ``row_q`` (n h,): ``(r' C + A[r', r_i]) w + c_i`` at ``(query i, key row r')``.

    Raises if ``ids`` do not have that structure (they always do for the product method)."""
    P, h, w = grid.num_prefix, grid.h, grid.w
    patch = ids[P:, P:]
    rows, cols = torch.arange(h) * w, torch.arange(w)
    A, K = patch[rows][:, rows].long() // C, patch[cols][:, cols].long() % C
    r, c = torch.arange(h * w) // w, torch.arange(h * w) % w
    for r0 in range(0, h * w, 256):  # checked by blocks of query rows: no (n, n) int64 tensor
        blk = slice(r0, r0 + 256)
        if not torch.equal(patch[blk].long(), A[r[blk]][:, r] * C + K[c[blk]][:, c]):
            raise AssertionError('iRPE product bucket ids are not a row bucket x column bucket table')
    a = torch.arange(C)
    return dict(
        col_k=(a[None, :, None] * C + K[c][:, None, :]).reshape(h * w, C * w),
        row_k=(torch.arange(h * w)[:, None] * C + A[r]).reshape(-1),
        col_q=(a[None, :, None] * C + K[:, None, :]).reshape(w, C * w),
        row_q=((torch.arange(h)[None, :] * C + A.t()[r]) * w + c[:, None]).reshape(-1))


def _rows_of(state: Dict[str, Any], rows: slice) -> Dict[str, Any]:
    """``state`` with the bucket ids of the query rows ``rows`` only (for a block of queries)."""
    return dict(state, ids=[m[rows] for m in state['ids']])


def _gather(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = scores[..., i, ids[i, j]]`` for scores (..., N, C) and ids (N, M)."""
    return torch.gather(scores, -1, ids.expand(*scores.shape[:-2], *ids.shape))


def _gather_transposed(scores: torch.Tensor, ids_t: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = scores[..., j, ids_t[i, j]]`` for scores (..., M, C) and ids_t (R, M): the
    transpose of :func:`_gather` built in place, for the q-side term (adding a transposed (N, N) term
    strides through memory). Inference only: its backward would materialise (..., R, M * C)."""
    M, C = scores.shape[-2:]
    flat = _index(ids_t) + torch.arange(M, device=ids_t.device) * C
    src = scores.flatten(-2).unsqueeze(-2).expand(*scores.shape[:-2], ids_t.shape[0], M * C)
    return torch.gather(src, -1, flat.expand(*scores.shape[:-2], *ids_t.shape))


class IRPETable(nn.Module):
    """One iRPE lookup table with the upstream parameter names.

    ``kind``: ``'bias'`` -> ``lookup_table_bias`` (heads, buckets); ``'qk'`` -> ``lookup_table_weight``
    (heads, head_dim, buckets); ``'v'`` -> ``lookup_table_weight`` (heads, buckets, head_dim). The cross
    method holds two such tables, ``rp_rows`` and ``rp_cols``.
    """

    def __init__(self, kind: str, heads: int, head_dim: int, buckets: int, cross: bool = False):
        super().__init__()
        self.kind = kind
        if cross:
            self.rp_rows = IRPETable(kind, heads, head_dim, buckets)
            self.rp_cols = IRPETable(kind, heads, head_dim, buckets)
        elif kind == 'bias':
            self.lookup_table_bias = nn.Parameter(torch.zeros(heads, buckets))
        elif kind == 'qk':
            self.lookup_table_weight = nn.Parameter(torch.zeros(heads, head_dim, buckets))
        elif kind == 'v':
            self.lookup_table_weight = nn.Parameter(torch.zeros(heads, buckets, head_dim))
        else:
            raise ValueError(f'unknown iRPE table kind {kind!r}')

    def tables(self) -> List[torch.Tensor]:
        """The table(s), aligned with the bucket-id matrices of :func:`irpe_bucket_ids`."""
        if hasattr(self, 'rp_rows'):
            return self.rp_rows.tables() + self.rp_cols.tables()
        return [self.lookup_table_bias if self.kind == 'bias' else self.lookup_table_weight]


class IRPELayer(nn.Module):
    """The tables of one block: ``rpe_q``, ``rpe_k``, ``rpe_v`` (None where iRPE is not attached)."""

    def __init__(self, mode: str, rpe_on: str, heads: int, head_dim: int, buckets: int, cross: bool):
        super().__init__()
        qk_kind = 'bias' if mode == 'bias' else 'qk'
        self.rpe_q = IRPETable(qk_kind, heads, head_dim, buckets, cross) if 'q' in rpe_on else None
        self.rpe_k = IRPETable(qk_kind, heads, head_dim, buckets, cross) if 'k' in rpe_on else None
        self.rpe_v = IRPETable('v', heads, head_dim, buckets, cross) if 'v' in rpe_on else None


@register_encoding('irpe')
class IRPE(PosEncoding):
    """iRPE on queries, keys and/or values of every block (see module docstring).

    Args:
        mode: ``'ctx'`` (alias ``'contextual'``) or ``'bias'``.
        method: ``'product'`` (default), ``'cross'``, ``'euclidean'`` (alias ``'euc'``) or
            ``'quantization'`` (alias ``'quant'``).
        ratio: ``r`` of the piecewise index (1.9 gives 7 x 7 product buckets).
        rpe_on: where to attach, any of ``'q'``, ``'k'``, ``'v'`` (e.g. ``'k'``, ``'qk'``, ``'qkv'``).
        shared_head: one table for all heads (True) or one per head.
        prefix_bucket: prefix tokens (class, registers) get one learned extra bucket (the reference's
            ``skip``); False gives every pair involving a prefix token no iRPE term.
        coord_mode: ``'index'`` (patch offsets, the reference) or ``'ref'`` (offsets rescaled to the
            training grid ``ref_hw``, default the model's grid).
    """
    hooks = frozenset({'bias', 'value'})
    #: product method, contextual: build the whole bias by rows and columns (:meth:`_product_bias`);
    #: False: through the reference's per-pair terms (:meth:`term_qk`), e.g. to record them
    factorized: bool = True
    test_knobs = (COORD_MODE,)

    def __init__(
            self,
            ctx: EncodingContext,
            mode: str = 'ctx',
            method: str = 'product',
            ratio: float = 1.9,
            rpe_on: str = 'k',
            shared_head: bool = True,
            prefix_bucket: bool = True,
            coord_mode: str = 'index',
            ref_hw: Optional[Tuple[int, int]] = None,
    ):
        super().__init__(ctx)
        if mode not in _MODES:
            raise ValueError(f"iRPE mode must be 'ctx' (contextual) or 'bias', got {mode!r}")
        self.mode = _MODES[mode]
        method = _METHOD_ALIASES.get(method, method)
        if method not in IRPE_METHODS:
            raise ValueError(f"unknown iRPE method {method!r}; choose one of {', '.join(IRPE_METHODS)}")
        self.method = method
        if not isinstance(rpe_on, str) or not rpe_on or set(rpe_on) - set('qkv') or len(set(rpe_on)) != len(rpe_on):
            raise ValueError(f"iRPE rpe_on must name where to attach with the letters q, k, v (each at most "
                             f"once), e.g. 'k', 'qk' or 'qkv'; got {rpe_on!r}")
        if self.mode == 'bias' and 'v' in rpe_on:
            raise ValueError(f"iRPE bias mode has no value term (rpe_on={rpe_on!r}); use mode='ctx' to attach "
                             f"iRPE to values, or drop 'v' from rpe_on")
        self.rpe_on = ''.join(c for c in 'qkv' if c in rpe_on)
        if not ratio >= 0.5:
            raise ValueError(f'iRPE ratio must be >= 0.5 (beta = 2 * ratio needs at least one bucket per side), '
                             f'got {ratio}')
        self.ratio = float(ratio)
        self.alpha, self.beta, self.gamma = _coefficients(self.ratio)
        if coord_mode not in _COORD_MODES:
            check_coord_mode(coord_mode)
            raise ValueError(f"iRPE buckets patch offsets; coord_mode must be one of {', '.join(_COORD_MODES)}, "
                             f"got {coord_mode!r}")
        self.coord_mode = coord_mode
        self.ref_hw = tuple(ref_hw) if ref_hw is not None else tuple(ctx.grid_size)
        self.shared_head = bool(shared_head)
        self.prefix_bucket = bool(prefix_bucket)
        self.num_buckets = irpe_num_buckets(self.method, self.ratio)  # without the prefix bucket
        self.has_prefix_bucket = self.prefix_bucket and ctx.num_prefix_tokens > 0
        buckets = self.num_buckets + int(self.has_prefix_bucket)
        heads = 1 if self.shared_head else ctx.num_heads
        self.needs_probs = 'v' in self.rpe_on
        self.layers = nn.ModuleList([
            IRPELayer(self.mode, self.rpe_on, heads, ctx.head_dim, buckets, cross=self.method == 'cross')
            for _ in range(ctx.depth)])
        self._cache = GridCache(max_entries=8)  # per grid: (T, T) ids in the smallest integer dtype, their factors

    # --- bucket ids, cached per grid ---------------------------------------------------------
    def bucket_ids(self, grid: Grid) -> Tuple[torch.Tensor, ...]:
        """The (P + N, P + N) bucket-id matrices of ``grid`` on this module's device (cached).

        Stored compactly (uint8 up to 256 buckets: 16 MiB at 1024 px with patch 16, against 128 MiB
        in int64); every use widens the part it needs with :func:`_index`.
        """
        key = self._ids_key(grid)
        dtype = torch.uint8 if self.num_buckets < 256 else torch.int16 if self.num_buckets < 2 ** 15 else torch.int32
        return self._cache.get(key, self.device, lambda: irpe_bucket_ids(
            grid.h, grid.w, grid.num_prefix, self.method, self.ratio, self.coord_mode, self.ref_hw, dtype=dtype))

    def _ids_key(self, grid: Grid) -> Tuple[Any, ...]:
        return grid, self.method, self.ratio, self.coord_mode, self.ref_hw

    def prepare(self, grid: Grid) -> Dict[str, Any]:
        return dict(grid=grid, ids=self.bucket_ids(grid))

    def _separable(self, state: Dict[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
        """:func:`_separable_index` of the state's grid (cached per grid), or None where the bias is not
        built by rows and columns (other methods, bias mode, :attr:`factorized` off). Built on first use
        only: row blocks (large grids without autograd) never need it."""
        grid = state['grid']
        if not (self.factorized and self.method == 'product' and self.mode == 'ctx' and grid.h * grid.w > 1):
            return None
        C = irpe_num_buckets('cross', self.ratio)  # 2B + 1 row (column) buckets
        return self._cache.get(('separable',) + self._ids_key(grid), self.device,
                               lambda: _separable_index(state['ids'][0], grid, C))

    def _tables(self, table: IRPETable, state: Dict[str, Any]) -> List[torch.Tensor]:
        """The table(s), with a zero prefix bucket appended where the grid has prefix tokens the
        tables hold no bucket for (``prefix_bucket=False``, or a model built without them)."""
        out = table.tables()
        if state['grid'].num_prefix and not self.has_prefix_bucket:
            dim = -2 if table.kind == 'v' else -1
            out = [torch.cat([t, t.new_zeros(t.shape[:dim] + (1,) + t.shape[dim:][1:])], dim=dim) for t in out]
        return out

    # --- the reference's module outputs (also what the golden tests record) -------------------
    def term_qk(self, which: str, x: torch.Tensor, layer: int, state: Dict[str, Any],
                cols: slice = slice(None)) -> torch.Tensor:
        """Upstream ``rpe_q`` / ``rpe_k`` output for input ``x`` (``s q`` for k, ``s k`` for q).

        ``out[b, h, i, j] = x_i . r[:, ids[i, j]]`` (ctx, shape (B, H, N, N)) or ``t[h, ids[i, j]]``
        (bias, shape (1, H, N, N)). The q-side term enters the logits transposed. ``x`` may be a
        block of rows ``i`` (its ids are then ``ids[rows]``: pass them as ``state['ids']``), and
        ``cols`` keeps only those columns ``j``.
        """
        table = getattr(self.layers[layer], f'rpe_{which}')
        out = None
        for t, ids in zip(self._tables(table, state), state['ids']):
            ids = _index(ids[..., cols])
            if self.mode == 'bias':
                term = t[:, ids].unsqueeze(0)
            else:
                term = _gather(x @ t, ids)
            out = term if out is None else out + term
        if self.mode == 'bias':
            out = out.expand(1, x.shape[1], *out.shape[-2:])
        return out

    def term_v(self, probs: torch.Tensor, layer: int, state: Dict[str, Any]) -> torch.Tensor:
        """Upstream ``rpe_v`` output: ``out[b, h, i] = sum_j probs[b, h, i, j] r_v[ids[i, j]]``."""
        out = None
        for t, ids in zip(self._tables(self.layers[layer].rpe_v, state), state['ids']):
            ids = _index(ids)
            summed = probs.new_zeros(*probs.shape[:-1], t.shape[-2])
            summed = summed.scatter_add(-1, ids.expand(probs.shape), probs)  # (B, H, N, buckets)
            term = summed @ t
            out = term if out is None else out + term
        return out

    # --- hooks ---------------------------------------------------------------------------------
    def bias(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any) -> Optional[torch.Tensor]:
        return self.bias_rows(q, k, scale, layer, state, slice(None))

    def row_bias(self, layer: int) -> Optional[str]:
        lay = self.layers[layer]
        if lay.rpe_k is None and lay.rpe_q is None:
            return None
        return 'shared' if self.mode == 'bias' else 'per_sample'

    def bias_rows(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any,
                  rows: slice) -> Optional[torch.Tensor]:
        """Query rows ``rows`` of the bias: the k-side term of those queries, plus the q-side term
        ``(s k_j) . r_q[ids[j, i]]`` (computed for every key ``j``, kept for the rows ``i``)."""
        lay = self.layers[layer]
        if self.row_bias(layer) and (rows == slice(None) or self._factors_fit(q, state)):
            sep = self._separable(state)
            if sep is not None:
                return self._product_bias(q, k, scale, layer, state, sep, rows)
        out = None
        if lay.rpe_k is not None:
            out = self.term_qk('k', q[:, :, rows] * scale, layer, _rows_of(state, rows))
        if lay.rpe_q is not None:
            if self.mode == 'ctx' and not torch.is_grad_enabled():  # both terms fresh (B, H, rows, N) tensors
                term = self.term_q_rows(k * scale, layer, state, rows)
                out = term if out is None else out.add_(term)
            else:
                term = self.term_qk('q', k * scale, layer, state, cols=rows).transpose(-1, -2)
                out = term if out is None else out + term
        return out

    def _factors_fit(self, q: torch.Tensor, state: Dict[str, Any]) -> bool:
        """Whether row blocks may go through :meth:`_product_bias`: its per-layer q-side factor
        (B, H, n (2B+1) w) fits the bias budget (at 448 px, batch 2: 7 MiB; at 1024 px, batch 1: 44 MiB,
        where the per-pair gathers are used instead, and the factors are never built)."""
        from ..attention import max_bias_bytes
        grid = state['grid']
        C = irpe_num_buckets('cross', self.ratio)
        return q.shape[:2].numel() * grid.h * grid.w * C * grid.w * 4 <= max_bias_bytes()

    def _product_terms(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Dict[str, Any],
                       sep: Dict[str, torch.Tensor]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, for every block of query rows: ``'k'``: the products ``s q @ r_k`` (B, H, T, buckets)
        and, per query, those spread over the key columns (B, H, n (2B+1), w); ``'q'``: ``s k @ r_q`` and,
        per key row, bucket row and query column, the values over the key columns (B, H, h (2B+1) w, w).
        Without autograd, kept in ``state`` for the next block of the same layer (one layer at a time)."""
        memo = state.get('_product_terms')
        if memo is not None and memo[0] == layer and memo[1] is q and memo[2] is k and memo[3] == scale:
            return memo[4]
        lay, grid = self.layers[layer], state['grid']
        P, h, w = grid.num_prefix, grid.h, grid.w
        n = h * w
        B, H = q.shape[:2]
        terms = {}
        if lay.rpe_k is not None:
            qr = self._products(lay.rpe_k, q * scale, state)  # (B, H, T, buckets)
            x = torch.gather(qr[:, :, P:], -1, sep['col_k'].expand(B, H, n, -1))  # (B, H, n, C * w)
            terms['k'] = qr, x.view(B, H, -1, w)
        if lay.rpe_q is not None:
            kr = self._products(lay.rpe_q, k * scale, state)
            C = sep['col_q'].shape[-1] // w
            z = torch.gather(kr[:, :, P:].view(B, H, h, w, -1), -1, sep['col_q'].expand(B, H, h, w, -1))
            terms['q'] = kr, z.view(B, H, h, w, C, w).permute(0, 1, 2, 4, 5, 3).reshape(B, H, h * C * w, w)
        if not torch.is_grad_enabled():
            state['_product_terms'] = (layer, q, k, scale, terms)
        return terms

    def _product_bias(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Dict[str, Any],
                      sep: Dict[str, torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
        """The contextual bias of the product method (query rows ``rows``), through its row x column structure
        (:func:`_separable_index`) instead of one gather per (query, key) pair: per query, the (2B+1)^2
        products are spread over the key columns (a gather of (2B+1) x w per query), then whole key rows
        of w values are copied (``index_select``); the q-side term is built the same way per key,
        directly in the logits' layout. Pairs with a prefix token take the prefix bucket. Equal to
        :meth:`term_qk` (k) + :meth:`term_qk` (q) transposed; 1.5x faster at 448 px (ViT-S, 785 tokens).
        By row blocks (no autograd) the per-layer factors are built once (:meth:`_product_terms`)."""
        grid = state['grid']
        P, h, w = grid.num_prefix, grid.h, grid.w
        n, T = h * w, P + h * w
        r0, r1, _ = rows.indices(T)
        p0, p1 = max(r0, P) - P, max(r1, P) - P  # the block's patch queries
        B, H = q.shape[:2]
        terms = self._product_terms(q, k, scale, layer, state, sep)
        patches, prefix = [], []  # the patch-to-patch terms; f(rows, cols): the pairs with a prefix token
        if 'k' in terms:
            qr, x = terms['k']
            idx = sep['row_k'] if (p0, p1) == (0, n) else sep['row_k'].view(n, h)[p0:p1].reshape(-1)
            patches.append(x.index_select(2, idx).view(B, H, p1 - p0, n))
            prefix.append(lambda rows, cols: qr[..., rows, self.num_buckets, None])  # the query's products
        if 'q' in terms:
            kr, z = terms['q']
            idx = sep['row_q'] if (p0, p1) == (0, n) else sep['row_q'].view(n, h)[p0:p1].reshape(-1)
            patches.append(z.index_select(2, idx).view(B, H, p1 - p0, n))
            prefix.append(lambda rows, cols: kr[..., None, cols, self.num_buckets])  # the key's products
        if not P:
            return patches[0] if len(patches) == 1 else patches[0].add_(patches[1])

        def border(rows: slice, cols: slice) -> torch.Tensor:
            t = prefix[0](rows, cols) if len(prefix) == 1 else prefix[0](rows, cols) + prefix[1](rows, cols)
            return t.expand(B, H, len(range(T)[rows]), len(range(T)[cols]))
        left, top = border(slice(r0, r1), slice(0, P)), border(slice(r0, min(r1, P)), slice(P, None))
        if torch.is_grad_enabled():
            patch = patches[0] if len(patches) == 1 else patches[0].add_(patches[1])
            return torch.cat([left, torch.cat([top, patch], -2)], -1)
        out = patches[0].new_empty(B, H, r1 - r0, T)
        top_rows = top.shape[-2]
        out[..., :P], out[..., :top_rows, P:] = left, top
        if len(patches) == 2:
            torch.add(*patches, out=out[..., top_rows:, P:])
        else:
            out[..., top_rows:, P:] = patches[0]
        return out

    def _products(self, table: IRPETable, x: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        """``x @ r``: (B, H, T, buckets) products with every bucket of ``table`` (one table: product)."""
        t, = self._tables(table, state)
        return x @ t

    def term_q_rows(self, x: torch.Tensor, layer: int, state: Dict[str, Any], rows: slice) -> torch.Tensor:
        """The q-side contextual term as it enters the logits, rows ``rows``:
        ``out[b, h, i, j] = x_j . r_q[:, ids[j, i]]`` (``x = s k``), i.e. ``term_qk('q', ...)`` transposed,
        gathered in that layout (inference only, see :func:`_gather_transposed`)."""
        out = None
        for t, ids in zip(self._tables(self.layers[layer].rpe_q, state), state['ids']):
            term = _gather_transposed(x @ t, ids[:, rows].t())
            out = term if out is None else out.add_(term)
        return out

    def score_mod(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any) -> Optional[Callable]:
        """In-kernel twin of :meth:`bias`: ``score + qr[b, h, i, ids[i, j]] + kr[b, h, j, ids[j, i]]``."""
        lay = self.layers[layer]
        if lay.rpe_k is None and lay.rpe_q is None:
            return None
        terms: List[Tuple[torch.Tensor, torch.Tensor, bool, bool]] = []  # (scores, ids, is_q, per_batch)
        for which, x in (('k', q), ('q', k)):
            table = getattr(lay, f'rpe_{which}')
            if table is None:
                continue
            for t, ids in zip(self._tables(table, state), state['ids']):
                ids = _index(ids)
                if self.mode == 'bias':
                    terms.append((t.expand(q.shape[1], t.shape[-1]), ids, which == 'q', False))
                else:
                    terms.append(((x * scale) @ t, ids, which == 'q', True))

        def score_mod(score, b, h, q_idx, kv_idx):
            for scores, ids, is_q, per_batch in terms:
                i, j = (kv_idx, q_idx) if is_q else (q_idx, kv_idx)
                bucket = ids[i, j]
                score = score + (scores[b, h, i, bucket] if per_batch else scores[h, bucket])
            return score
        return score_mod

    def value(self, out: torch.Tensor, v: torch.Tensor, probs: Optional[torch.Tensor], layer: int,
              state: Any) -> torch.Tensor:
        if self.layers[layer].rpe_v is None:
            return out
        if probs is None:
            raise RuntimeError('iRPE on values needs the attention probabilities; the attention must run the '
                               'math backend (needs_probs=True selects it automatically)')
        return out + self.term_v(probs, layer, state)

    def value_rows(self, out: torch.Tensor, v: torch.Tensor, probs: torch.Tensor, layer: int, state: Any,
                   rows: slice) -> torch.Tensor:
        return self.value(out, v, probs, layer, _rows_of(state, rows))

    def extra_repr(self) -> str:
        return (f'mode={self.mode}, method={self.method}, ratio={self.ratio}, rpe_on={self.rpe_on}, '
                f'shared_head={self.shared_head}, buckets={self.num_buckets}+{int(self.has_prefix_bucket)}, '
                f'coord_mode={self.coord_mode}')
