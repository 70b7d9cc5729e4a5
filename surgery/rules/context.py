"""The interface rules program against while channels propagate through a traced model.

Vocabulary. Every channel position a layer produces is an *atom* (an int); a tensor's channels are
a ``TVal``: its shape, the dims that carry channels (``tdims``) and the atoms along them. A rule
receives its inputs as ``TVal`` (or plain Python values), returns its output as a ``TVal``, and in
between tells the context which atoms must be removed together (``uf.union_arrays``), which are
tied to a layer's axis (``slot``), and which must stay (``pin`` / ``opaque``). The tracer then
turns the union-find classes into coupled groups; the surgeon shrinks each slot's layer with the
rule's ``shrink``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from torch import nn

from ..groups import TVal, UnionFind

if TYPE_CHECKING:
    from ..sizes import AttrInt
    from . import ModuleRule


class RuleContext(Protocol):
    """What a rule may ask of the tracer. Implemented by the tracer; rules never build one."""

    #: union-find over atoms: ``uf.new(n)`` makes fresh atoms, ``uf.union_arrays(a, b)`` ties
    #: position i of ``a`` to position i of ``b`` (removed together or kept together)
    uf: UnionFind

    def slot(self, path: str, axis: str, atoms: np.ndarray, kind: str = "module",
             cross_channel: bool = False) -> np.ndarray:
        """Tie ``atoms`` to axis ``axis`` of layer ``path`` (the surgeon will shrink it there).

        Returns the atoms the slot holds (the first binding wins; later ones are unioned in).
        ``cross_channel``: the layer mixes these channels (LayerNorm over C), so removing them
        is allowed but not exact.
        """
        ...

    def out_atoms(self, path: str, axis: str, n: int) -> np.ndarray:
        """The atoms a layer produces on ``axis`` (fresh the first time, the same on re-use)."""
        ...

    def channels_in(self, x: Any, dim: int, n: int) -> np.ndarray:
        """The ``n`` atoms arriving on ``dim`` of input ``x``; pinned fresh ones if ``x`` carries
        none there (the network input, a constant, an op that was not followed)."""
        ...

    def opaque(self, inputs: Iterable[Any], out: Any, why: str = "") -> Any:
        """Pin every channel of ``inputs`` (with ``why`` and the source line) and return ``out``
        carrying none: the always-safe answer for an op the rule cannot follow."""
        ...

    def pin(self, atoms: np.ndarray, reason: str) -> None:
        """Keep ``atoms``; ``reason`` is shown by ``graph.explain`` and in warnings."""
        ...

    def pinned_atoms(self, n: int, reason: str) -> np.ndarray:
        """``n`` fresh atoms that are kept."""
        ...

    def bind_param(self, p: TVal, dim: int, atoms: np.ndarray, cross_channel: bool = False,
                   reads: bool = False) -> np.ndarray | None:
        """Tie dim ``dim`` of parameter ``p`` (a ``TVal`` with ``p.param`` set) to ``atoms``:
        the owner's axis if the owner's rule names it in ``param_axes``, else a raw slice of
        the tensor (``reads``: the dim reads channels, zeroed in the verification reference).
        None when the tensor belongs to a layer whose rule does not expose it."""
        ...

    def owner(self, p: Any) -> tuple[str, nn.Module, ModuleRule | None] | None:
        """(path, module, rule) of the module owning parameter ``p``, if ``p`` is one."""
        ...

    def record_cross_channel(self, atoms: np.ndarray, dim: int | None = None) -> np.ndarray:
        """Mark ``atoms`` as mixed by a cross-channel op (removal allowed, not exact).

        ``dim``: the dim of the op's first input that holds ``atoms`` (one channel dim), where
        the current op's rule can run it on the kept channels alone (``on_kept``): verification
        then runs the op so in the reference and still compares values. Without it (a scale
        computed from a channel count), a plan removing these atoms is checked by shapes only.
        """
        ...

    def record_contracted(self, atoms: np.ndarray, dim: int | None = None) -> None:
        """Mark ``atoms`` as summed over by a product of two tensors (``q @ k``): removing them
        is exact only where a layer that mixes channels reads them too (a head's output goes
        through the projection, which the reference zeroes); else marked not exact. ``dim``:
        as for :meth:`record_cross_channel` (the op's rule sums over the kept ones alone)."""
        ...

    def is_computed(self, v: Any, x: TVal | None = None) -> bool:
        """Whether a size argument was computed from a tensor's shape in forward rather than
        written as a literal; given ``x``, whether it follows ``x``'s pruned width."""
        ...

    def size_role(self, s: Any, x: TVal | None) -> Any:
        """What size ``s`` (of a reshape of ``x``) does when channels are removed: ``"free"``
        (it follows by itself: ``-1``, ``x.size(1) // 2``), ``"fixed"`` (a literal, or a count
        that must stay), an ``AttrInt`` (it follows when the plan rewrites that attribute), or
        ``("couple", atoms)`` (the count of other channels, to be matched one for one)."""
        ...

    def by_width(self, path: str) -> bool:
        """Whether grouped conv ``path`` is pruned by width (position j of every group together)
        rather than by whole groups: the tracer's choice, made after a first pass."""
        ...

    def record_grouped(self, path: str, a_in: np.ndarray, a_out: np.ndarray,
                       groups: int) -> None:
        """A grouped conv's channels, for the tracer to see whether a channel shuffle or the like
        ties positions across its groups (then it traces again pruning it by width)."""
        ...

    def output_used(self, index: int) -> bool:
        """Whether output ``index`` of the layer or op being propagated is used downstream."""
        ...

    def hold(self, s: Any) -> None:
        """Sizes ``s`` must keep their value: pin the channels they count, freeze attributes."""
        ...

    def freeze(self, attrs: Iterable[AttrInt]) -> None:
        """These attributes (``AttrInt``) keep their value."""
        ...

    def attr_size(self, attr: AttrInt, atoms: np.ndarray) -> None:
        """Attribute ``attr`` (an ``AttrInt``) counts the positions ``atoms``: the plan rewrites
        it to the number kept."""
        ...

    def where(self) -> str:
        """The current node and the user's source line, for messages."""
        ...
