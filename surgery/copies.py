"""Copies of modules, one place for what a module's tables are.

- :func:`shallow_copy`: one module with tables of its own (parameters, buffers, children, hooks),
  the values shared: what a rule's ``shrink`` starts from (``surgery.rules.clone_module``).
- :func:`own_tables`: the same without ``copy.copy``'s protocol, refusing a module that holds
  another one outside ``_modules`` (the verification's light reference tree).
- :func:`deep_copy`: ``copy.deepcopy``'s result without its generic protocol on every plain module:
  the surgeon copies the user's whole model for each pruned model, and on small nets that copy
  was a fifth of the surgery's time.
"""

from __future__ import annotations

import collections
import copy
import functools
from typing import Any, TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)

#: values a copy returns as they are (``copy._deepcopy_atomic``'s common cases)
_ATOMIC = frozenset({type(None), bool, int, float, str, bytes, type})
#: the containers a module keeps its tables in (parameters, buffers, children, hooks and their
#: keyword flags, forward-hook call order): copied with their own ``.copy()``, several times
#: faster than ``copy.copy``'s generic protocol
_TABLES = frozenset({dict, collections.OrderedDict, set, list})
#: the tables that hold a module's own tensors and children
_OWN = frozenset({"_parameters", "_buffers", "_modules"})


def _table_copy(v: Any) -> Any:
    return v.copy() if type(v) in _TABLES else copy.copy(v)


def shallow_copy(module: M) -> M:
    """A shallow copy with its own parameter/buffer/hook tables: same class, attributes, mode.

    Keeping the object (rather than calling the constructor again) preserves every constructor
    argument, user attribute, hook, dtype, device and train/eval flag of the original.
    """
    new = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, dict | set | list):
            new.__dict__[key] = _table_copy(value)
    return new


class SharedModule(Exception):
    """A module holds another module outside ``_modules``: a copy of the tree made by
    :func:`own_tables` would leave that reference pointing at the original."""


def own_tables(m: M) -> M:
    """``m`` with its own tables (parameters, buffers, children, hooks), the values shared,
    made without ``copy.copy``'s protocol. Raises :class:`SharedModule` where ``m`` refers to a
    module outside ``_modules`` or keeps state in ``__slots__`` (not in its ``__dict__``)."""
    if type(m).__dict__.get("__slots__") is not None:
        raise SharedModule("__slots__")
    d = m.__dict__.copy()
    for key, v in d.items():
        if type(v) in _ATOMIC:
            continue
        if isinstance(v, nn.Module):
            raise SharedModule(key)
        if isinstance(v, dict | list | tuple | set):
            if not v:
                if not isinstance(v, tuple):
                    d[key] = v.copy()
                continue
            if key not in _OWN and any(isinstance(e, nn.Module) for e in (
                    v.values() if isinstance(v, dict) else v)):
                raise SharedModule(key)
            if not isinstance(v, tuple):
                d[key] = _table_copy(v)
    new = type(m).__new__(type(m))
    object.__setattr__(new, "__dict__", d)
    return new


@functools.cache
def _plain(cls: type) -> bool:
    """Does ``copy.deepcopy`` copy ``cls`` as ``__new__`` plus nn.Module's own state? (No
    custom deepcopy, copy, pickle or state hooks, no slots.)"""
    return (getattr(cls, "__deepcopy__", None) is None
            and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is nn.Module.__getstate__
            and getattr(cls, "__setstate__", None) is nn.Module.__setstate__
            and all("__slots__" not in vars(c) for c in cls.__mro__))


def deep_copy(model: M, memo: dict[int, Any] | None = None) -> M:
    """``copy.deepcopy(model, memo)``: the same new tree, tensors, ties and attributes. Plain
    modules are copied attribute by attribute (atomic values and empty tables directly, the rest
    by ``copy.deepcopy`` with the shared memo); any other module by ``copy.deepcopy`` itself."""
    # a module-level walk, not a recursive closure: a closure that calls itself is a reference
    # cycle holding the memo, so the copied tree (and, once dropped, the model) would wait for
    # the cyclic collector instead of being freed by reference counting
    return _deep_copy(model, {} if memo is None else memo)  # type: ignore[return-value]


def _deep_copy(m: nn.Module, memo: dict[int, Any]) -> nn.Module:
    if id(m) in memo:
        return memo[id(m)]
    cls = type(m)
    # ignore: mypy does not see a class as Hashable (python/mypy#20409)
    if not _plain(cls):  # type: ignore[arg-type]
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    state = m.__getstate__()
    for key, value in state.items():
        kind = type(value)
        if kind in _ATOMIC:
            continue
        if kind in _TABLES and not value:
            state[key] = kind()
        elif key == "_modules" and kind in (dict, collections.OrderedDict):
            state[key] = kind((name, None if child is None else _deep_copy(child, memo))
                              for name, child in value.items())
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    copy._keep_alive(m, memo)  # type: ignore[attr-defined]  # as deepcopy does
    return new
