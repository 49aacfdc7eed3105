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

Test-time knobs (:class:`Knob`): settings an evaluator may sweep without retraining (RoPE
position interpolation, LookHere's global slope, the coordinate mode, ...). An encoding lists the
ones it has in its ``test_knobs`` class attribute; any other module class may do the same
(attention declares the temperature). Declaring a knob registers it (:func:`register_knob`), so
the evaluator finds it, generates its command-line flag and applies it to every module that
declares it (docs/knobs.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, FrozenSet, Optional, Set, Tuple

import torch
import torch.nn as nn

from ..grid import COORD_FAMILIES, Grid, check_coord_mode

__all__ = ['EncodingContext', 'PosEncoding', 'LayerPos', 'HOOKS', 'Knob', 'KnobContext', 'register_knob',
           'registered_knobs', 'module_knobs', 'coord_mode_knob', 'COORD_MODE']

HOOKS = frozenset({'tokens', 'rotate', 'bias', 'value'})


# ------------------------------------------------------------------------------------------------ knobs
Size = tuple[int, int]


@dataclass
class KnobContext:
    """Where a knob is applied: the test ``size`` and the ``train_size`` (``(h, w)`` in px; ``train_size``
    None when unknown), the whole ``model``, and a ``memo`` shared by every application to that model
    (e.g. a measurement made once per model)."""
    size: Size
    train_size: Size | None
    model: nn.Module
    memo: dict = field(default_factory=dict)

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


def _never(value: Any) -> bool:
    return False


@dataclass(frozen=True, eq=False)
class Knob:
    """A test-time knob: one axis of an evaluator sweep, declared by the module class that has it.

    A setting is applied in one of three ways: ``build`` (a construction keyword: the model is rebuilt
    with it and the same weights loaded), ``set`` (change the attributes listed in ``attrs`` of every
    module that declares the knob, at a given (test size, train size); undone by restoring them), or
    ``context`` (a context manager around the forward pass). ``default`` is "the model's own setting":
    it is never applied.
    """
    name: str                                  # key in rows and in sweeps, e.g. 'rope_scaling'
    help: str                                  # command-line help
    parse: Callable[[str], Any]                # one command-line word -> value (ValueError naming the fix)
    default: Any = None
    flag: str = ''                             # command-line option (default: --<name with dashes>)
    words: tuple = (('default', None),)        # command-line words with a fixed value
    bare: Any = None                           # value of the flag given alone (None: it needs a value)
    check: Callable[[Any], Any] | None = None  # a value given in Python -> the value (ValueError if bad)
    label: Callable[[Any], str] | None = None  # value -> text in a row label (default name=value)
    rank: int = 50                             # order in labels, rows and --help (lower first)
    build: str | None = None
    attrs: tuple[str, ...] = ()
    set: Callable[[nn.Module, Any, KnobContext], None] | None = None
    context: Callable[[Any], ContextManager] | None = None
    own: Callable[[nn.Module], Any] | None = None      # a module's own value (its native setting)
    accepts: Callable[[nn.Module, Any], str | None] | None = None  # None, or why not for that module
    applies: Callable[[nn.Module], bool] | None = None  # whether a module of a declaring class has it
    find: Callable[[nn.Module], list] | None = None    # a model's modules that have it (default: declarers)
    needs_train_size: Callable[[Any], bool] = _never   # the value needs the training size
    patch: Callable[[Any], tuple[int, int]] | None = None  # the patch size (h, w) a value runs the model at
    #                                                        (the evaluator checks every test size against it)

    def __post_init__(self):
        if sum(x is not None for x in (self.build, self.set, self.context)) != 1:
            raise TypeError(f'knob {self.name!r}: give exactly one of build=, set= or context=')
        if self.set is not None and not self.attrs:
            raise TypeError(f'knob {self.name!r}: set= needs attrs= (the attributes it changes, restored after)')

    @property
    def option(self) -> str:
        return self.flag or '--' + self.name.replace('_', '-')

    def from_word(self, word: str) -> Any:
        """A command-line word as a value."""
        fixed = dict(self.words)
        return fixed[word] if word in fixed else self.parse(word)

    def validate(self, value: Any) -> Any:
        if value == self.default:
            return value
        return self.check(value) if self.check is not None else value

    def text(self, value: Any) -> str:
        """The value in a row label ('' for the default)."""
        if value == self.default:
            return ''
        return self.label(value) if self.label is not None else f'{self.name}={value}'

    def targets(self, model: nn.Module) -> list:
        """The modules of ``model`` that have this knob."""
        if self.find is not None:
            return list(self.find(model))
        return [m for m in model.modules() if self in module_knobs(m)]

    def apply(self, module: nn.Module, value: Any, ctx: KnobContext) -> dict:
        """Set ``value`` on ``module`` (a ``set`` knob); returns what :meth:`undo` restores."""
        saved = {a: getattr(module, a) for a in self.attrs}
        self.set(module, value, ctx)
        return saved

    @staticmethod
    def undo(module: nn.Module, saved: dict) -> None:
        for a, v in saved.items():
            setattr(module, a, v)


_KNOBS: list = []


def register_knob(*knobs: Knob) -> None:
    """Make knobs known to the evaluator (done by declaring them in a ``test_knobs`` class attribute of a
    :class:`PosEncoding`). Knobs sharing a name are one sweep axis: they must share its flag and default."""
    for k in knobs:
        if any(k is o for o in _KNOBS):
            continue
        same = [o for o in _KNOBS if o.name == k.name]
        if same and (same[0].option, same[0].default) != (k.option, k.default):
            raise TypeError(f'knob {k.name!r} declared twice with different flags or defaults '
                            f'({same[0].option}, {same[0].default!r} vs {k.option}, {k.default!r})')
        _KNOBS.append(k)


def registered_knobs() -> list:
    """Every registered knob (several may share a name), in ``rank`` then registration order."""
    return sorted(_KNOBS, key=lambda k: k.rank)


def module_knobs(module: nn.Module) -> tuple:
    """The knobs ``module`` declares and has."""
    return tuple(k for k in getattr(type(module), 'test_knobs', ()) if k.applies is None or k.applies(module))


def coord_mode_knob(attr: str, applies: Callable[[nn.Module], bool] | None = None) -> Knob:
    """The coordinate mode (:mod:`visionpe.grid`) of a module that reads coordinates in ``attr``, set at
    construction by the keyword of the same name. Only modes of the module's own family
    (:data:`visionpe.grid.COORD_FAMILIES`) are test-time alternatives."""
    def accepts(module: nn.Module, mode: str) -> str | None:
        own = getattr(module, attr)
        family = COORD_FAMILIES.get(own, (own,))
        if mode in family:
            return None
        return f"trained with {own!r} coordinates (test-time alternatives: {', '.join(family)})"
    return Knob('coord_mode', 'coordinate modes (index, normalized, ref, normalized_ref, centered, polar, default)',
                check_coord_mode, flag='--coord-modes', check=check_coord_mode, label=lambda m: f'coord={m}',
                rank=0, build=attr, own=lambda m: getattr(m, attr), accepts=accepts, applies=applies)


#: the coordinate mode of an encoding that keeps it in ``coord_mode`` (a construction keyword)
COORD_MODE = coord_mode_knob('coord_mode')


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
    #: Capability: ``rotate`` returns q and k with the head width they came with (False: PoPE widens
    #: them to 2d); attention modules that reshape q and k must then take the width from the tensors.
    keeps_head_dim: ClassVar[bool] = True
    #: test-time knobs of this encoding (:class:`Knob`), registered with the evaluator at class creation
    test_knobs: ClassVar[tuple[Knob, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_knob(*cls.__dict__.get('test_knobs', ()))

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
        ``'shared'`` (one bias for the whole batch) or ``'per_sample'`` (it depends on q or k; without
        autograd, each call returns a new tensor that the attention may overwrite)."""
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

    @property
    def qk_only(self) -> bool:
        """Capability: acts only by transforming q and k (hook ``rotate``, no probabilities), so any
        attention that calls ``rotate`` can host it (e.g. Swin's windows, RST's strips)."""
        return set(self.hooks) == {'rotate'} and not self.needs_probs

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
