"""What an int in the traced forward means once channels are removed.

A reshape or split size is one of: read from a tensor (``x.size(1)``: ``Dyn``), read from a module
attribute (``self.num_heads``: ``AttrInt``), computed from those (``C // self.num_heads``: a
derived ``Dyn``), or written in the code (a plain int). The rules ask this module which sizes
follow the pruned width by themselves, which can follow it when surgery rewrites an attribute, and
which are fixed.

While a model is traced, every int attribute of its modules is temporarily an ``AttrInt`` (the
original objects are put back afterwards), so a size taken from an attribute is told apart from a
literal even though both are plain ints to torch.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn


class Dyn(int):
    """An int computed in forward from tensor sizes: it follows the pruned width.

    ``src``: the ``(fx node, dim)`` sizes it was computed from; ``attrs``: the attributes
    (``AttrInt``) it was computed with; ``derived``: it is not one size as read but arithmetic.
    Arithmetic with a ``Dyn`` or an ``AttrInt`` gives a derived ``Dyn`` that remembers both.
    """

    src: tuple[tuple[Any, int], ...]
    attrs: tuple[AttrInt, ...]
    derived: bool
    #: ``B * self.num_heads``: one attribute times an int that no attribute made (the batch
    #: size); it follows when surgery rewrites that attribute (heads folded into the batch dim)
    per: AttrInt | None = None

    def __new__(cls, value: int, src: tuple[tuple[Any, int], ...] = (),
                attrs: tuple[AttrInt, ...] = (), derived: bool = False) -> Dyn:
        self = super().__new__(cls, value)
        self.src, self.attrs, self.derived = src, attrs, derived
        return self

    def __reduce__(self) -> Any:
        return (int, (int(self),))

    def __deepcopy__(self, memo: dict) -> Dyn:
        return self


class AttrInt(int):
    """An int attribute of a module (``owner`` its path, ``name`` the attribute, ``index`` its
    position when the attribute is a tuple of ints such as ``self.shape``), as traced."""

    owner: str
    name: str
    index: int | None

    def __new__(cls, value: int, owner: str, name: str, index: int | None = None) -> AttrInt:
        self = super().__new__(cls, value)
        self.owner, self.name, self.index = owner, name, index
        return self

    @property
    def attribute(self) -> str:
        """``num_heads``, or ``bias_shape[2]`` for an entry of a tuple attribute."""
        return self.name if self.index is None else f"{self.name}[{self.index}]"

    @property
    def qualname(self) -> str:
        return f"{self.owner}.{self.attribute}" if self.owner else self.attribute

    def __reduce__(self) -> Any:
        return (AttrInt, (int(self), self.owner, self.name, self.index))

    def __copy__(self) -> AttrInt:
        return self

    def __deepcopy__(self, memo: dict) -> AttrInt:
        return self


class DynFloat(float):
    """A float computed in forward from sizes or attributes (``(C // self.num_heads) ** -0.5``):
    when the channels it counts go, its value changes, so whatever it scales is not exact."""

    src: tuple[tuple[Any, int], ...]
    attrs: tuple[AttrInt, ...]

    def __new__(cls, value: float, src: tuple[tuple[Any, int], ...] = (),
                attrs: tuple[AttrInt, ...] = ()) -> DynFloat:
        self = super().__new__(cls, value)
        self.src, self.attrs = src, attrs
        return self

    def __reduce__(self) -> Any:
        return (float, (float(self),))


def _provenance(v: Any) -> tuple[tuple, tuple]:
    if isinstance(v, Dyn):
        return v.src, v.attrs
    if isinstance(v, AttrInt):
        return (), (v,)
    if isinstance(v, DynFloat):
        return v.src, v.attrs
    return (), ()


def derive(value: Any, *operands: Any) -> Any:
    """``value`` computed from ``operands``: a derived ``Dyn`` (a ``DynFloat`` for a float) if
    any operand is a traced size."""
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            isinstance(value, DynFloat):
        return value
    src: tuple = ()
    attrs: tuple = ()
    for o in operands:
        s, a = _provenance(o)
        src, attrs = src + s, attrs + a
    if not src and not attrs:
        return value
    if isinstance(value, float):
        return DynFloat(value, src, attrs)
    return Dyn(value, src, attrs, True)


def _arith(op: Callable[..., Any], swap: bool = False) -> Callable[..., Any]:
    def method(self: int, other: Any = None, *rest: Any) -> Any:
        if other is None:
            return derive(op(int(self)), self)
        if not isinstance(other, int | float) or isinstance(other, bool):
            return NotImplemented
        a, b = (int(other) if isinstance(other, int) else other), int(self)
        out = op(a, b) if swap else op(b, a)
        result = derive(out, self, other)
        if op is operator.mul and isinstance(result, Dyn):
            attr = [o for o in (self, other) if isinstance(o, AttrInt)]
            if len(attr) == 1 and not _provenance(other if attr[0] is self else self)[1]:
                result.per = attr[0]
        return result
    return method


def _install(cls: type[int]) -> None:
    for name, op in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                     ("floordiv", operator.floordiv), ("mod", operator.mod),
                     ("pow", operator.pow), ("truediv", operator.truediv)):
        setattr(cls, f"__{name}__", _arith(op))
        setattr(cls, f"__r{name}__", _arith(op, swap=True))
    # setattr like the loop: mypy rejects assigning a method (and misreads ``cls.__neg__ =``)
    setattr(cls, "__neg__", _arith(operator.neg))  # noqa: B010


_install(Dyn)
_install(AttrInt)


@contextlib.contextmanager
def attribute_ints(model: nn.Module) -> Iterator[None]:
    """Make every int attribute of ``model``'s modules an ``AttrInt`` while tracing; the original
    objects are put back on exit, whatever happened."""
    saved: list[tuple[nn.Module, str, Any, Any]] = []
    try:
        for path, m in model.named_modules():
            for key, v in list(vars(m).items()):
                if key.startswith("_"):
                    continue
                if type(v) is int:
                    wrapped: Any = AttrInt(v, path, key)
                elif type(v) is tuple and v and all(type(i) is int for i in v):
                    wrapped = tuple(AttrInt(i, path, key, k) for k, i in enumerate(v))
                else:
                    continue
                saved.append((m, key, v, wrapped))
                m.__dict__[key] = wrapped
        yield
    finally:
        for m, key, v, wrapped in saved:
            if m.__dict__.get(key) is wrapped:
                m.__dict__[key] = v
