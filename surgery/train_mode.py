"""Does the training-mode forward trace to other ops than the eval one?

A model's layers with train-only branches (an auxiliary head) must be analysed in both modes,
but a second symbolic trace of the whole model costs as much as the first, and is wasted where
the modes trace alike. Only code that reads ``training`` to branch can make them differ
(:func:`mentions_training`, from the classes' source). Where such modules are found, one of
each kind (class, settings, children and how the model calls it: what a symbolic trace can
depend on) is traced alone in both modes, all of them in one trace of a small wrapper
(:func:`same_in_train_mode`); only if those differ, or cannot be traced alone, is the whole
model traced again.
"""

from __future__ import annotations

import ast
import collections
import functools
import inspect
import linecache
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx
from torch import nn

from .shape_run import torch_functions

#: setting types a module's forward can branch on that compare by value
_PLAIN = (int, float, bool, str, type(None))


def signature(graph: torch.fx.Graph, outputs: Any = None) -> list[tuple[str, str]]:
    """The ops that compute the outputs (or ``outputs``: some of the output node's values),
    and the outputs' structure. Side effects that feed nothing (a BatchNorm subclass's
    train-mode ``num_batches_tracked.add_(1)``) do not make a train graph worth analysing."""
    out = next((n for n in graph.nodes if n.op == "output"), None)
    if outputs is None:
        outputs = out.args if out is not None else ()
    needed: set[torch.fx.Node] = set()
    torch.fx.node.map_arg(outputs, needed.add)
    for n in reversed(graph.nodes):
        if n not in needed and any(u in needed for u in n.users):
            needed.add(n)
    # a parameter read once per trace is one node, wherever the trace first read it: listed
    # where first used, so two calls of a layer in one trace (eval and train) list alike
    ops: list[tuple[str, str]] = []
    listed: set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n not in needed or n.op == "get_attr":
            continue
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in listed:
                listed.add(a)
                ops.append((a.op, _target(a)))
        ops.append((n.op, _target(n)))
    shape = torch.fx.node.map_arg(outputs, lambda n: (n.op, _target(n)))
    return [*ops, ("out", repr(shape))]


def _target(n: torch.fx.Node) -> str:
    """A node's target, fx's numbered names of tensor constants without their numbers (a
    second trace of the same model numbers them on from the first's)."""
    return _CONSTANT.sub(r"\1", str(n.target)) if n.op == "get_attr" else str(n.target)


_CONSTANT = re.compile(r"^(_tensor_constant)\d+$")


def mode_dependent(model: nn.Module, graph: torch.fx.Graph) -> list[tuple[str, nn.Module]]:
    """The modules traced into (not leaves of ``graph``) whose code can branch on the mode,
    by name. The model itself counts only for what its forward can reach: its other methods
    (a head's reset) run outside forward, and nothing inside the model calls them."""
    leaves = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    # ignore: mypy does not see a class as Hashable (python/mypy#20409)
    return [(name, m) for name, m in model.named_modules() if name not in leaves
            and mentions_training(type(m), "forward" if not name else None)]  # type: ignore[arg-type]


#: how a module was called: its positional and keyword arguments, each the traced input (PROXY)
#: or a plain value; None where another kind of value was passed
Call = tuple[tuple[Any, ...], tuple[tuple[str, Any], ...]] | None


class _Proxied:
    def __repr__(self) -> str:
        return "<traced value>"


PROXY = _Proxied()


def call_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    """How a traced module is called (to call a module of its kind alike, alone)."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.fx.Proxy):
            return PROXY
        if isinstance(v, _PLAIN) or (type(v) is tuple and all(isinstance(x, _PLAIN) for x in v)):
            return v
        raise TypeError(type(v).__name__)

    try:
        return tuple(one(v) for v in args), tuple(sorted((k, one(v)) for k, v in kwargs.items()))
    except TypeError:
        return None


def same_in_train_mode(model: nn.Module, graph: torch.fx.Graph, calls: dict[int, set[Call]],
                       tracer: Callable[[dict[int, str]], torch.fx.Tracer]) -> bool:
    """Whether ``model`` in train mode is sure to trace to ``graph``'s ops (its eval trace):
    no module branches on the mode, or one of each kind of those that do, called as in the
    model (``calls``: id of each module traced into -> how it was called), traces alike in
    both modes. ``tracer(names)`` makes the tracer to use, given the model's names of its
    layers (so a wrapper's layers are leaves or opaque as in the model). False where
    undecided."""
    dependent = mode_dependent(model, graph)
    if not dependent:
        return True
    names = {name for name, _ in dependent}
    if "" in names:  # the model's own forward branches on the mode: trace it again
        return False
    kinds: dict[Any, tuple[nn.Module, Call]] = {}
    for name, m in dependent:
        if any(p in names for p in _ancestors(name)):
            continue  # traced with its outermost dependent ancestor
        how = calls.get(id(m))
        if not how or None in how:  # not called as a module, or with other values: undecided
            return False
        for call in how:
            kinds.setdefault((_kind(m), call), (m, call))
    wrapper = _EachOnce(list(kinds.values()))
    layer_names = {id(m): name for name, m in model.named_modules()}
    try:  # one trace, each layer called in eval mode, then in train mode
        graph = tracer(layer_names).trace(wrapper)
    except Exception:  # a layer that does not trace alone: undecided
        return False
    finally:
        wrapper.train(True)
    out = next(n for n in graph.nodes if n.op == "output")
    eval_half, train_half = out.args[0]
    return signature(graph, eval_half) == signature(graph, train_half)


def _ancestors(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


class _EachOnce(nn.Module):
    """Calls each of its layers as recorded, on its one input wherever that layer was given a
    traced value (a symbolic trace needs no real shapes): all in eval mode, then all in train
    mode; returns (eval outputs, train outputs)."""

    def __init__(self, calls: list[tuple[nn.Module, Call]]) -> None:
        super().__init__()
        self.each = nn.ModuleList([m for m, _ in calls])
        self.calls = [c for _, c in calls]

    def forward(self, x: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        halves = []
        for mode in (False, True):
            self.each.train(mode)
            out = []
            for layer, call in zip(self.each, self.calls, strict=True):
                assert call is not None  # undecided calls are not traced
                args, kwargs = call
                out.append(layer(*[x if v is PROXY else v for v in args],
                                 **{k: x if v is PROXY else v for k, v in kwargs}))
            halves.append(tuple(out))
        return halves[0], halves[1]


def _kind(m: nn.Module, whole: bool = False) -> tuple[Any, ...]:
    """What a symbolic trace of ``m`` can depend on: its class, its settings (plain values and
    containers of them by value, anything else by identity) that its forward reads (all where
    that is not known from the source, or ``whole``), which parameters and buffers it has, its
    hooks and its children's kinds; not tensor values or shapes, which the trace sees as
    proxies. A setting the forward never reads (a norm's ``num_features``) cannot change the
    trace, and would make one kind of every width."""
    # ignore: mypy does not see a class as Hashable (python/mypy#20409)
    found = None if whole else settings_read(type(m))  # type: ignore[arg-type]
    read, deep = found if found is not None else (None, frozenset())
    settings = []
    for key, v in vars(m).items():
        if key in ("training", "_modules"):
            continue
        if key in ("_parameters", "_buffers"):
            settings.append((key, tuple((k, t is None) for k, t in v.items())))
        elif read is None or key in read or key.startswith("_") or callable(v):
            settings.append((key, _value(v)))  # callable: an instance's own forward, say
    children = tuple((key, None if c is None else _kind(c, whole or read is None or key in deep))
                     for key, c in m._modules.items())
    return type(m), tuple(settings), children


def _value(v: Any) -> Any:
    """``v`` as a hashable key: plain values and containers of them by value, else identity."""
    if isinstance(v, _PLAIN):
        return v
    if type(v) in (tuple, list):
        return type(v).__name__, tuple(_value(x) for x in v)
    if type(v) in (set, frozenset) and all(isinstance(x, _PLAIN) for x in v):
        return "set", tuple(sorted(v, key=repr))
    if type(v) in (dict, collections.OrderedDict):
        return "dict", tuple((_value(k), _value(x)) for k, x in v.items())
    return "id", id(v)


def _class_code(cls: type) -> tuple[ast.ClassDef, dict[str, Any]] | None:
    """The syntax tree of ``cls``'s definition and its module's names; None without source."""
    module = sys.modules.get(cls.__module__)
    try:
        filename = inspect.getsourcefile(cls)
    except (TypeError, OSError):  # a builtin class, or one made where no source is kept
        return None
    if module is None or filename is None:
        return None
    node = _classes_in(filename).get(cls.__qualname__)
    if node is None:  # not found by name (defined twice, or made by exec): as inspect finds it
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            return None
        node = tree.body[0] if tree.body and isinstance(tree.body[0], ast.ClassDef) else None
    return (node, vars(module)) if node is not None else None


@functools.lru_cache(maxsize=256)
def _classes_in(filename: str) -> dict[str, ast.ClassDef]:
    """Every class a source file defines once, by qualified name, from one parse of the file
    (``inspect.getsource`` parses the whole file again for each class: 5-25 ms each on
    timm's files, the larger part of a small timm net's first trace)."""
    try:
        tree = ast.parse("".join(linecache.getlines(filename)))
    except (SyntaxError, ValueError):
        return {}
    found: dict[str, ast.ClassDef] = {}
    twice: set[str] = set()

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name = prefix + child.name
                if name in found:
                    twice.add(name)
                found[name] = child
                visit(child, name + ".")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, f"{prefix}{child.name}.<locals>.")
            elif isinstance(child, ast.stmt | ast.excepthandler | ast.match_case):
                visit(child, prefix)  # a block (if, try, with ...): statements, not expressions

    visit(tree, "")
    return {k: v for k, v in found.items() if k not in twice}


@functools.cache
def mentions_training(cls: type, entry: str | None = None) -> bool:
    """Could the code of ``cls`` (or a base below nn.Module) trace differently in train mode?
    It can where it reads a name ``training``, except as an argument handed straight to a
    function fx records as one op (a torch function such as ``F.dropout``, or one registered
    with ``torch.fx.wrap``): there the mode is that op's argument, not a branch of the graph.
    Words in strings and comments do not count; code without source counts. ``entry``: only
    the methods a call of this one can reach (by name, across the bases) count, and code
    outside methods."""
    parts = _reachable(cls, entry)
    if parts is None:
        return True  # no source to read: assume it may branch on the mode
    return any(not _mode_as_op_argument(*found, scope)
               for part, scope in parts for found in _mode_reads(part))


@functools.cache
def settings_read(cls: type, entry: str = "forward"
                  ) -> tuple[frozenset[str], frozenset[str]] | None:
    """The attributes ``self.<name>`` that the code of ``cls`` reachable from ``entry`` reads,
    and those of them it uses other than by calling them (``self.<name>.<attr>``, handed to a
    function: a child module used so may be read into); None where that cannot be known from
    the source: no source, or ``self`` handed to a call or read other than by attribute
    (``getattr(self, ...)``, ``vars(self)``)."""
    parts = _reachable(cls, entry)
    if parts is None:
        return None
    read: set[str] = set()
    deep: set[str] = set()
    for part, _ in parts:
        parents = _parents(part)
        for n in ast.walk(part):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.args.args and \
                    n.args.args[0].arg != "self" and not n.decorator_list:
                return None  # a method whose instance is not called self
            if not (isinstance(n, ast.Name) and n.id == "self"):
                continue
            parent = parents.get(n)
            if not isinstance(parent, ast.Attribute) or parent.attr.startswith("__"):
                return None  # self handed on, or its __dict__ read
            read.add(parent.attr)
            user = parents.get(parent)
            if not (isinstance(user, ast.Call) and user.func is parent):
                deep.add(parent.attr)
    return frozenset(read), frozenset(deep)


def _reachable(cls: type, entry: str | None) -> list[tuple[ast.AST, dict[str, Any]]] | None:
    """The code of ``cls`` and its bases below nn.Module, each with its module's names: all of
    it, or with ``entry`` the methods a call of that one can reach (by name, across the bases)
    and the code outside methods; None where some of it has no source."""
    code = []
    for base in cls.__mro__:
        if base is nn.Module or base is object:
            continue
        found = _class_code(base)
        if found is None:
            return None
        code.append(found)
    if entry is None:
        return [(body, scope) for body, scope in code]
    parts: list[tuple[ast.AST, dict[str, Any]]] = []
    methods: dict[str, list[tuple[ast.AST, dict[str, Any]]]] = {}
    for body, scope in code:
        for stmt in body.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                methods.setdefault(stmt.name, []).append((stmt, scope))
            else:
                parts.append((stmt, scope))
    todo, reached = [entry], {entry}
    while todo:
        for fn, scope in methods.get(todo.pop(), []):
            parts.append((fn, scope))
            for n in ast.walk(fn):
                name = n.attr if isinstance(n, ast.Attribute) else \
                    n.id if isinstance(n, ast.Name) else None
                if name in methods and name not in reached:
                    reached.add(name)
                    todo.append(name)
    return parts


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    """Every node of ``tree`` but the root -> its parent."""
    return {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}


def _mode_reads(tree: ast.AST) -> Iterator[tuple[ast.AST, ast.AST | None, ast.AST | None]]:
    """Every ``training`` name or attribute in ``tree``, with its parent and grandparent."""
    parents = _parents(tree)
    for n in ast.walk(tree):
        if (isinstance(n, ast.Name) and n.id == "training") or (
                isinstance(n, ast.Attribute) and n.attr == "training"):
            parent = parents.get(n)
            yield n, parent, parents.get(parent) if parent is not None else None


def _mode_as_op_argument(read: ast.AST, parent: ast.AST | None, grand: ast.AST | None,
                         scope: dict[str, Any]) -> bool:
    """Is ``read`` loaded and passed as is to a call of a function fx records as one op?"""
    if not isinstance(getattr(read, "ctx", None), ast.Load):
        return False
    if isinstance(parent, ast.Call) and read in parent.args:
        call = parent
    elif isinstance(parent, ast.keyword) and isinstance(grand, ast.Call):
        call = grand
    else:
        return False
    return _records_one_op(call.func, scope)


def _records_one_op(func: ast.expr, scope: dict[str, Any]) -> bool:
    if isinstance(func, ast.Name) and (id(scope), func.id) in getattr(
            torch.fx._symbolic_trace, "_wrapped_fns_to_patch", {}):
        return True  # torch.fx.wrap("name") in the module that calls it
    target = _resolved(func, scope)
    try:
        return target is not None and target in torch_functions()
    except TypeError:  # unhashable
        return False


def _resolved(expr: ast.expr, scope: dict[str, Any]) -> Any:
    if isinstance(expr, ast.Name):
        return scope.get(expr.id)
    if isinstance(expr, ast.Attribute):
        owner = _resolved(expr.value, scope)
        return getattr(owner, expr.attr, None) if owner is not None else None
    return None
