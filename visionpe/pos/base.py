"""The one small interface every position encoding implements (docs/architecture.md, "The encoding interface").

An encoding may act at four points and says which in ``hooks``:

``tokens``  change the token sequence: :meth:`PosEncoding.embed` after the prefix tokens are
            concatenated (APE), :meth:`PosEncoding.attn_input` on the normalised input of each
            attention branch (LaPE), :meth:`PosEncoding.after_block` between blocks (PEG);
``rotate``  transform q and k before attention (RoPE, ComRoPE, PoPE);
``bias``    an additive logit term, static per grid or query dependent (LookHere, iRPE), with an
            optional in-kernel ``score_mod`` twin for FlexAttention, and optionally built one
            block of query rows at a time (:meth:`PosEncoding.bias_rows`) so that SDPA at high
            resolution never holds the whole ``(heads, T, T)`` tensor;
``value``   a term added to the attention output (iRPE on V, LePE).

Per forward the model calls :meth:`PosEncoding.prepare` once with the :class:`~visionpe.grid.Grid`;
what it returns (``state``) is handed back to every hook. Anything that depends only on the grid
is cached inside the encoding (:class:`~visionpe.grid.GridCache`), so a resolution change costs
one rebuild and no per-step work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, FrozenSet, Optional, Set, Tuple

import torch
import torch.nn as nn

from ..grid import Grid

__all__ = ['EncodingContext', 'PosEncoding', 'LayerPos', 'HOOKS']

HOOKS = frozenset({'tokens', 'rotate', 'bias', 'value'})


@dataclass(frozen=True)
class EncodingContext:
    """What a model tells an encoding when it builds it."""
    dim: int
    depth: int
    num_heads: int
    grid_size: Tuple[int, int]
    num_prefix_tokens: int = 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


class PosEncoding(nn.Module):
    """Base class: every hook is the identity; subclasses override the ones listed in ``hooks``."""
    hooks: ClassVar[FrozenSet[str]] = frozenset()
    #: True when the value hook needs the attention probabilities (forces the math backend).
    needs_probs: bool = False
    #: How the encoding takes coordinate augmentation (``grid.aug``, see :class:`visionpe.grid.CoordAug`):
    #: None (it reads no continuous coordinates), ``'batch'`` (one draw per batch) or ``'sample'`` (also
    #: one draw per image).
    coord_aug_support: ClassVar[Optional[str]] = None

    def __init__(self, ctx: EncodingContext):
        super().__init__()
        unknown = set(self.hooks) - HOOKS
        if unknown:
            raise TypeError(f'{type(self).__name__} declares unknown hooks {sorted(unknown)}')
        self.ctx = ctx
        # zero-size anchor: tells parameter-free encodings which device they live on
        self.register_buffer('_anchor', torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    # --- per forward ---------------------------------------------------------------------------
    def prepare(self, grid: Grid) -> Any:
        """State shared by every hook of one forward pass (e.g. rotary tables for all layers)."""
        return None

    # --- tokens ------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, grid: Grid, state: Any) -> torch.Tensor:
        return x

    def attn_input(self, x: torch.Tensor, layer: int, state: Any) -> torch.Tensor:
        return x

    def after_block(self, x: torch.Tensor, layer: int, grid: Grid, state: Any) -> torch.Tensor:
        return x

    # --- attention ---------------------------------------------------------------------------
    def rotate(self, q: torch.Tensor, k: torch.Tensor, layer: int, state: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def bias(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any) -> Optional[torch.Tensor]:
        return None

    def score_mod(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any) -> Optional[Callable]:
        """FlexAttention score_mod equal to :meth:`bias`; None means "use the bias tensor"."""
        return None

    def row_bias(self, layer: int) -> Optional[str]:
        """Whether :meth:`bias_rows` can build ``layer``'s bias by query rows: ``None`` (no),
        ``'shared'`` (one bias for the whole batch) or ``'per_sample'`` (it depends on q or k)."""
        return None

    def bias_rows(self, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, state: Any,
                  rows: slice) -> Optional[torch.Tensor]:
        """Query rows ``rows`` of :meth:`bias`, ``(B or 1, H, len(rows), M)``; q and k are whole."""
        raise NotImplementedError(f'{type(self).__name__} does not build its bias by rows')

    def value(self, out: torch.Tensor, v: torch.Tensor, probs: Optional[torch.Tensor], layer: int,
              state: Any) -> torch.Tensor:
        return out

    def value_rows(self, out: torch.Tensor, v: torch.Tensor, probs: torch.Tensor, layer: int, state: Any,
                   rows: slice) -> torch.Tensor:
        """:meth:`value` for the query rows ``rows`` (``out`` and ``probs`` hold only those rows); needed
        by encodings that have ``needs_probs`` and a :meth:`row_bias`."""
        raise NotImplementedError(f'{type(self).__name__} does not add its value term by rows')

    # --- model-level housekeeping -------------------------------------------------------------
    def set_grid_size(self, new_size: Tuple[int, int], old_size: Tuple[int, int]) -> None:
        """Called by ``model.set_input_size``: resample grid-sized tables (none by default)."""

    def no_weight_decay(self) -> Set[str]:
        """Names (relative to this module) of parameters that take no weight decay."""
        return set()


class LayerPos:
    """An encoding bound to one layer and one forward's state: what attention modules call."""
    __slots__ = ('enc', 'layer_idx', 'state')

    def __init__(self, enc: PosEncoding, layer_idx: int, state: Any):
        self.enc, self.layer_idx, self.state = enc, layer_idx, state

    @property
    def needs_probs(self) -> bool:
        return self.enc.needs_probs

    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc.attn_input(x, self.layer_idx, self.state)

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.enc.rotate(q, k, self.layer_idx, self.state)

    def bias(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
        return self.enc.bias(q, k, scale, self.layer_idx, self.state)

    def score_mod(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> Optional[Callable]:
        return self.enc.score_mod(q, k, scale, self.layer_idx, self.state)

    @property
    def row_bias(self) -> Optional[str]:
        return self.enc.row_bias(self.layer_idx)

    def bias_rows(self, q: torch.Tensor, k: torch.Tensor, scale: float, rows: slice) -> Optional[torch.Tensor]:
        return self.enc.bias_rows(q, k, scale, self.layer_idx, self.state, rows)

    def value(self, out: torch.Tensor, v: torch.Tensor, probs: Optional[torch.Tensor]) -> torch.Tensor:
        return self.enc.value(out, v, probs, self.layer_idx, self.state)

    def value_rows(self, out: torch.Tensor, v: torch.Tensor, probs: torch.Tensor, rows: slice) -> torch.Tensor:
        return self.enc.value_rows(out, v, probs, self.layer_idx, self.state, rows)
