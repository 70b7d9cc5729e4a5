"""trace(model, example_inputs): the channel-dependency graph of a model.

torch.fx traces the forward (layers with a rule are leaves), an fx Interpreter runs it once on the
example inputs to learn every shape (costly layers on the meta device: :mod:`surgery.shape_run`),
and the per-op rules propagate channel atoms along the graph.
When the forward differs between train and eval mode (auxiliary heads, drop paths) both graphs are
analysed, so the pruned model still trains. Tracing is analysis only: the model is not modified and
its train/eval flags are restored.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import linecache
import operator
import os
import re
import sys
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx import traceback as fx_traceback

from .collector import pauses_collector
from .errors import ExampleInputError, TraceError, UnsupportedLayerError
from .groups import Group, Slot, TVal, UnionFind, build_groups, unique_ints
from .modes import attributes_kept, buffers_kept, switched_mode
from .paths import Submodules
from .rules import ModuleRule, function_rule, leaf_rule, module_rule
from .shape_run import NeedsValues, ShapeRun, hooked
from .sizes import AttrInt, Dyn, DynFloat, attribute_ints, derive
from .train_mode import Call, call_of, same_in_train_mode, signature

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def as_tuple(example_inputs: Inputs) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def matches(path: str, patterns: Iterable[str]) -> bool:
    """``path`` is named by a pattern: the same name, a parent's name, or ``re:`` + a regex."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], path):
                return True
        elif path == p or path.startswith(p + "."):
            return True
    return False


def fingerprint(model: nn.Module) -> str:
    """A hash of the architecture: module names and classes, parameter and buffer shapes."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        h.update(f"{name}|{type(m).__qualname__};".encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}|{tuple(t.shape)};".encode())
    return h.hexdigest()[:16]


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


@functools.lru_cache(maxsize=4096)
def _internal(filename: str) -> bool:
    """Frames of torch and of the recorder: a node's source line is the first frame outside,
    unless that frame is surgery's own (a layer called by torch, e.g. nn.Sequential: no line)."""
    return "/torch/" in filename or filename.endswith(("recorder.py", "recorder.pyc")) and \
        _ours(filename)


@functools.lru_cache(maxsize=4096)
def _ours(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PACKAGE)


def user_frame(frame: Any) -> tuple[str, int] | None:
    """(file, line) of the first frame outside torch and the recorder, if it is the user's."""
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None or _ours(frame.f_code.co_filename):
        return None
    return frame.f_code.co_filename, frame.f_lineno


def portable_source(filename: str) -> str:
    """``filename`` relative to the ``sys.path`` entry it lies under (the longest:
    ``timm/models/vision_transformer.py``), as it is where none: the same source file on another
    machine or in another environment gets the same name, so a saved plan's call sites are
    found again there."""
    return _relative_to(filename, _import_roots(tuple(sys.path)))


@functools.lru_cache(maxsize=8)
def _import_roots(entries: tuple[str, ...]) -> tuple[str, ...]:
    """The ``sys.path`` entries as absolute directories ending in a separator, longest first."""
    roots = {os.path.join(os.path.abspath(e or os.curdir), "") for e in entries
             if isinstance(e, str)}
    return tuple(sorted(roots, key=len, reverse=True))


@functools.lru_cache(maxsize=4096)
def _relative_to(filename: str, roots: tuple[str, ...]) -> str:
    root = next((r for r in roots if filename.startswith(r)), "")
    return filename[len(root):].replace(os.sep, "/") if root else filename


def source_line(node: torch.fx.Node) -> str:
    """``file:line: code`` of the user's source that made ``node``."""
    loc = node.meta.get("surgery_loc")
    if not loc:
        return ""
    path = loc[0].split("site-packages/", 1)[-1]
    return f"{path}:{loc[1]}: {linecache.getline(loc[0], loc[1]).strip()}"


#: the names fx gives the tensors a forward makes while it is traced (``torch.ones(n)``)
_FX_CONSTANT = re.compile(r"^_tensor_constant\d+$")

#: argument types fx records as they are (``torch.fx.node.base_types``' Python ones)
_PLAIN_ARGS = frozenset({int, float, bool, str, complex, type(None), torch.dtype, torch.device})


class LocatingTracer(torch.fx.Tracer):
    """fx tracer whose every node remembers the user's source line (:func:`source_line`).

    The location is the innermost frame outside torch (cheaper than fx's full stack traces).
    """

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict[str, Any],
                    name: str | None = None, type_expr: Any | None = None) -> torch.fx.Node:
        if self.check_mutable_operations or self.record_stack_traces or \
                fx_traceback.has_preserved_node_meta():
            node = super().create_node(kind, target, args, kwargs, name, type_expr)
        else:  # fx's own, less a copy of the module stack in every node's meta (unread here):
            # a tenth of a trace that goes into many small layers
            node = self.graph.create_node(kind, target, args, kwargs, name, type_expr)
            self.node_name_to_scope[node.name] = (self.scope.module_path, self.scope.module_type)
        loc = user_frame(sys._getframe(1))
        if loc is not None:
            node.meta["surgery_loc"] = loc
        node.meta["surgery_scope"] = self.scope.module_path  # the layer whose forward made it
        return node

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """fx's proxy for a parameter or buffer read in a traced forward, found by a table:
        fx searches the root's parameters from the start on every read, which grows with the
        square of the layers traced into (timm's norm layers: half of a RegNet's trace)."""
        if self.param_shapes_constant or not isinstance(attr_val, torch.Tensor):
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        params, buffers, _ = self._names()
        name = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(attr_val))
        if name is None:  # not registered when the table was made: fx's own search
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        """fx's argument for a parameter, buffer or layer of the root, found by a table (fx
        searches them from the start for each such argument). Proxies, plain constants and
        tuples or lists of them take a short way to fx's own result."""
        kind = type(a)
        if kind is torch.fx.Proxy:
            return a.node
        if kind in _PLAIN_ARGS:
            return a
        if kind is tuple or kind is list:
            return kind(self.create_arg(x) for x in a)
        if isinstance(a, torch.Tensor | nn.Module) and hasattr(self, "root"):
            params, buffers, modules = self._names()
            name = (params if isinstance(a, nn.Parameter) else
                    buffers if isinstance(a, torch.Tensor) else modules).get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def _names(self) -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
        """The root's parameters, buffers and layers by id, each under the first name fx
        would find for it."""
        cached = getattr(self, "_names_of", None)
        if cached is None or cached[0] is not self.root:
            root = self.root
            cached = (root, {id(p): n for n, p in root.named_parameters()},
                      {id(b): n for n, b in root.named_buffers()},
                      {id(m): n for n, m in root.named_modules()})
            self._names_of = cached
        return cached[1], cached[2], cached[3]


class _Tracer(LocatingTracer):
    """fx tracer: layers with a rule are leaves (and the ``opaque`` ones)."""

    def __init__(self, opaque: Sequence[str], names: dict[int, str] | None = None) -> None:
        super().__init__()
        self.opaque = opaque
        self.names = names  # the model's names of the layers, where the root is a wrapper
        self.calls: dict[int, set[Call]] = {}  # id of each module traced into: its calls

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        self.calls.setdefault(id(m), set()).add(call_of(args, kwargs))
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.names is not None:
            qualname = self.names.get(id(m), qualname)
        if matches(qualname, self.opaque) and leaf_rule(m) is None:
            return True
        return leaf_rule(m) is not None or super().is_leaf_module(m, qualname)


def _skeleton(v: Any) -> Any:
    """Shapes only: tensors become untracked TVals, containers keep their structure."""
    if isinstance(v, torch.Tensor):
        return TVal(tuple(v.shape))
    if isinstance(v, torch.Size):
        return tuple(int(s) for s in v)
    if isinstance(v, tuple | list):
        return type(v)(_skeleton(x) for x in v) if not hasattr(v, "_fields") else \
            tuple(_skeleton(x) for x in v)
    if isinstance(v, dict):
        return {k: _skeleton(x) for k, x in v.items()}
    return v


def _dyn(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | tuple | list) or isinstance(v, Dyn):
        return v
    if isinstance(v, int):
        return Dyn(v)
    return type(v)(_dyn(x) for x in v)


def _leaves(v: Any, keep: Callable[[Any], bool]) -> list[Any]:
    """The values in nested tuples, lists and dicts for which ``keep`` holds."""
    if isinstance(v, tuple | list):
        return [i for x in v for i in _leaves(x, keep)]
    if isinstance(v, dict):
        return _leaves(list(v.values()), keep)
    return [v] if keep(v) else []


def _ints(v: Any) -> list[Any]:
    return _leaves(v, lambda i: isinstance(i, int) and not isinstance(i, bool))


def _floats(v: Any) -> list[DynFloat]:
    return _leaves(v, lambda f: isinstance(f, DynFloat))


def _sized(node: torch.fx.Node, args: Any, kwargs: Any, out: Any) -> Any:
    """A non-tensor result: sizes read from a tensor become ``Dyn`` that remember which tensor
    dim they measured; ints computed from sizes or attributes remember those."""
    x = args[0] if args else None
    if isinstance(x, TVal) and isinstance(node.args[0], torch.fx.Node):
        src = node.args[0]
        shape = (node.target is getattr and args[1] == "shape") or node.target == "size"
        if shape and isinstance(out, int):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            return Dyn(out, ((src, dim % x.ndim),))
        if shape and isinstance(out, tuple | list):
            return tuple(Dyn(v, ((src, i),)) for i, v in enumerate(out))
        if node.target == "numel" and isinstance(out, int):
            return Dyn(out, tuple((src, i) for i in range(x.ndim)), (), True)
    if isinstance(out, int) and not isinstance(out, bool):
        operands = _ints([args, kwargs])
        derived = derive(out, *operands)
        return derived if isinstance(derived, Dyn) else Dyn(out)
    if isinstance(out, float):
        return derive(out, *_ints([args, kwargs]), *_floats([args, kwargs]))
    return _dyn(out)


class Recorder(ShapeRun):
    """Runs the traced graph once and keeps the shape skeleton of every node's value (with
    ``cheap``, costly layers' values are zeros: see :mod:`surgery.shape_run`)."""

    def __init__(self, gm: nn.Module, graph: torch.fx.Graph | None = None, *,
                 cheap: bool = False) -> None:
        super().__init__(gm, graph=graph, cheap=cheap)
        self.meta: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except NeedsValues:
            raise
        except Exception as e:
            if self.cheap:  # perhaps only the zeros fail: the real run decides
                raise NeedsValues(f"{n.name}: {e}") from e
            where = source_line(n)
            raise ExampleInputError(
                f"the model fails on the example inputs at node '{n.name}' ({n.op} {n.target})"
                f"{' at ' + where if where else ''}: {e}. Check the shape, dtype and device of "
                "example_inputs (they must be what the model's forward expects).") from e
        self.meta[n] = _skeleton(result)
        return result


def _by_position(module: nn.Module, args: tuple, kwargs: dict[str, Any]
                 ) -> tuple[list[Any], dict[str, Any]]:
    """A layer's arguments in the order of its forward's parameters, those passed by keyword
    included (``self.conv(input=x)``, ``self.attn(q, k, value=v)``): rules read inputs by
    position. Skipped parameters before a given one take their defaults; keywords that only a
    ``**kwargs`` takes are returned apart."""
    if not kwargs:
        return list(args), {}
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):  # no signature, or the call does not fit it: as passed
        return [*args, *kwargs.values()], {}
    given = set(bound.arguments)
    bound.apply_defaults()
    ordered: list[Any] = []
    extra: dict[str, Any] = {}
    last = 0
    for name, p in sig.parameters.items():
        value = bound.arguments.get(name)
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = dict(value or {})
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            ordered.extend(value or ())
        else:
            ordered.append(value)
        if name in given and p.kind is not inspect.Parameter.VAR_KEYWORD:
            last = len(ordered)
    return ordered[:last], extra


def _walk(v: Any) -> Iterable[TVal]:
    if isinstance(v, TVal):
        yield v
    elif isinstance(v, tuple | list):
        for x in v:
            yield from _walk(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _walk(x)


@dataclass(frozen=True)
class TracedSite:
    """A cross-channel op that can run on kept channels (see :mod:`surgery.kept_sites`): where,
    the dim of its first input that holds the channels, their units (roots) by position, and
    how many calls of its function its source line makes."""

    where: tuple[Any, ...]
    dim: int
    roots: np.ndarray
    calls: int


@dataclass
class ChannelGraph:
    """Coupled channel groups of a model. ``print(graph)`` lists them; ``explain`` says why."""

    model_class: str
    fingerprint: str
    slots: dict[str, Slot]
    roots: np.ndarray
    groups: list[Group]
    pinned: dict[int, list[str]]
    cross: set[int] = field(default_factory=set)
    train_graph: bool = False
    #: "fx" (symbolic) or "run" (executing: Python branches specialised to the example inputs)
    tracer: str = "fx"
    notes: list[str] = field(default_factory=list)
    #: module attributes the forward uses as sizes (``"blocks.0.attn.num_heads"``) -> the atoms
    #: of the positions each counts: the plan rewrites them to the number kept
    attrs: dict[str, np.ndarray] = field(default_factory=dict)
    #: the units of ``cross`` whose ops cannot run on the kept channels alone, and the first
    #: such op: a plan removing one is verified by shapes only (the others by value:
    #: :mod:`surgery.kept_sites`)
    hard_cross: dict[int, str] = field(default_factory=dict)
    #: where the eval forward's other cross-channel ops run
    sites: list[TracedSite] = field(default_factory=list)

    def slot_roots(self, key: str) -> np.ndarray:
        return self.roots[self.slots[key].atoms]

    def explain(self, layer: str) -> str:
        """Why the channels of ``layer`` (a module or parameter name) can or cannot be pruned."""
        keys = [k for k, s in self.slots.items() if s.path == layer]
        if not keys:
            known = sorted({s.path for s in self.slots.values()})
            raise KeyError(f"no layer named {layer!r} has prunable axes; known: "
                           f"{', '.join(known[:12])}{' …' if len(known) > 12 else ''}")
        lines = []
        for key in keys:
            roots = unique_ints(self.slot_roots(key))
            fixed = [r for r in roots.tolist() if r in self.pinned]
            lines.append(f"{key}: {self.slots[key].size} channels in {len(roots)} units, "
                         f"{len(fixed)} pinned")
            reasons: list[str] = []
            for r in fixed:
                reasons += [w for w in self.pinned[r] if w not in reasons]
            lines += [f"  pinned: {w}" for w in reasons[:5]]
            groups = [g for g in self.groups if key in g.slots]
            lines += [f"  in {g!r}" for g in groups[:3]]
        return "\n".join(lines)

    def pin_summary(self, top: int = 3) -> list[tuple[str, int]]:
        """The reasons that keep the most channels, with how many channel units each keeps."""
        counts: dict[str, int] = {}
        for g in self.groups:
            for r in g.pinned.tolist():
                reasons = self.pinned.get(r) or ["?"]
                counts[reasons[0]] = counts.get(reasons[0], 0) + 1
        return sorted(counts.items(), key=lambda kv: -kv[1])[:top]

    def __str__(self) -> str:
        rows = [f"ChannelGraph of {self.model_class}: {len(self.groups)} groups, "
                f"{sum(g.prunable for g in self.groups)} prunable"]
        rows += [f"  {g!r}" for g in self.groups]
        return "\n".join(rows)


class _Context:
    """What rules see while channels propagate through one model (maybe over two graphs)."""

    def __init__(self, opaque: Sequence[str], by_width: frozenset[str] = frozenset()) -> None:
        self.uf = UnionFind()
        self.width_convs = by_width
        self.grouped: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        self.slots: dict[str, Slot] = {}
        self.pins: list[tuple[np.ndarray, str]] = []
        self.cross: list[np.ndarray] = []
        #: cross-channel atoms verification cannot run on the kept channels alone, and why
        self.hard: list[tuple[np.ndarray, str]] = []
        #: where the others run (the eval forward's sites): (where, dim, atoms, calls)
        self.sites: list[tuple[tuple[Any, ...], int, np.ndarray, int]] = []
        self.runs = 0  # graphs analysed: the first is the eval forward's
        self._lines: dict[torch.fx.Node, tuple[int, int]] = {}
        #: atoms summed over by a product, why, and whether the reference can sum over the kept
        #: ones alone (a site, or a train-only op)
        self.contracted: list[tuple[np.ndarray, str, bool]] = []
        self.opaque_names = opaque
        self.node: torch.fx.Node | None = None
        self.model: nn.Module | None = None
        self._submodules: Submodules | None = None
        self.env: dict[torch.fx.Node, Any] = {}
        #: attribute (qualified name) -> atoms of the positions its value counts
        self.attrs: dict[str, np.ndarray] = {}
        self.attr_where: dict[str, str] = {}
        #: attributes whose value must stay (a size computed from them is held fixed)
        self.frozen: dict[str, str] = {}

    # -- messages
    def where(self) -> str:
        if self.node is None:
            return ""
        line = source_line(self.node)
        return f"(node '{self.node.name}'{', ' + line if line else ''})"

    # -- atoms
    def pin(self, atoms: np.ndarray, reason: str) -> None:
        self.pins.append((atoms, reason))

    def pinned_atoms(self, n: int, reason: str) -> np.ndarray:
        atoms = self.uf.new(n)
        self.pin(atoms, reason)
        return atoms

    def opaque(self, inputs: Iterable[Any], out: Any, why: str = "") -> Any:
        """Pin the channels of every tensor input; the output carries none."""
        target = getattr(self.node.target, "__name__", self.node.target) if self.node else "?"
        where = self.where()
        reason = f"`{target}`: {why}" if why else f"no rule for `{target}`"
        if where and where not in reason:
            reason = f"{reason} {where}"
        for v in _walk(list(inputs)):
            if v.tracked:
                self.pin(v.atoms, reason)
        return out

    def channels_in(self, x: Any, dim: int, n: int) -> np.ndarray:
        """The atoms along ``dim`` of a layer's input (pinned ones if it carries none there)."""
        if isinstance(x, TVal) and x.tdims == (dim,) and x.atoms.shape == (n,):
            return x.atoms
        if isinstance(x, TVal) and x.tracked:
            self.opaque([x], None, f"channels arrive on dims {x.tdims}, not dim {dim}, at")
        return self.pinned_atoms(n, "fixed input channels (the network input, a constant, or "
                                    f"the output of an op that was not followed) {self.where()}")

    def is_computed(self, v: Any, x: TVal | None = None) -> bool:
        if isinstance(v, tuple | list):
            return any(self.is_computed(s, x) for s in v)
        if x is None:
            return isinstance(v, Dyn)
        return isinstance(v, Dyn) and self.size_role(v, x) == "free"

    # -- sizes
    def measured(self, node: Any, dim: int) -> np.ndarray | None:
        """The atoms along ``dim`` of the tensor ``node`` made (None: that dim has none)."""
        v = self.env.get(node)
        if not isinstance(v, TVal) or dim not in v.tdims:
            return None
        k = v.tdims.index(dim)
        idx = tuple(slice(None) if j == k else 0 for j in range(len(v.tdims)))
        return v.atoms[idx]

    def freeze(self, attrs: Iterable[AttrInt]) -> None:
        for a in attrs:
            self.frozen.setdefault(a.qualname, f"{a.qualname} = {int(a)} {self.where()}")

    def size_role(self, s: Any, x: TVal | None) -> Any:
        """What size ``s`` of a reshape of ``x`` does when channels are removed: ``"free"``
        (follows by itself), ``"fixed"`` (stays), an ``AttrInt`` (follows if surgery rewrites
        that attribute), ``("couple", atoms)``: it is the count of other channels ``atoms``,
        which the reshaped positions must then match one for one, or ``("per", atoms, attr)``:
        that count divided by attribute ``attr`` (``C // self.num_heads``)."""
        if isinstance(s, AttrInt):
            return s if s.qualname not in self.frozen else "fixed"
        if not isinstance(s, Dyn):
            return "free" if s == -1 else "fixed"
        chans = [m for m in (self.measured(n, d) for n, d in s.src) if m is not None]
        if not chans and s.per is not None and s.per.qualname not in self.frozen:
            return s.per  # B * self.num_heads: follows the attribute, the batch stays
        if not chans:
            self.freeze(s.attrs)
            return "fixed" if s.src or s.attrs else "free"
        own = set(self.uf.find(a) for a in x.atoms.ravel().tolist()) if x is not None else set()
        if all({self.uf.find(a) for a in m.tolist()} <= own for m in chans):
            self.freeze(s.attrs)
            return "free"
        if not s.derived and len(chans) == 1:
            return ("couple", chans[0])
        if len(chans) == 1 and len(s.attrs) == 1 and int(s.attrs[0]) > 0 \
                and int(s) * int(s.attrs[0]) == len(chans[0]):
            return ("per", chans[0], s.attrs[0])  # C // self.num_heads: a head's width
        for m in chans:  # its count must not change: keep what it measured
            self.pin(m, f"its channel count sizes a reshape of other channels {self.where()}")
        self.freeze(s.attrs)
        return "fixed"

    def by_width(self, path: str) -> bool:
        return path in self.width_convs

    def record_grouped(self, path: str, a_in: np.ndarray, a_out: np.ndarray,
                       groups: int) -> None:
        self.grouped.setdefault(path, (a_in, a_out, groups))

    def crossed_groups(self) -> frozenset[str]:
        """Grouped convs pruned by whole groups whose groups share a unit (a shuffle ties them):
        all their channels would go as one, so pruning them by width is better."""
        out = set()
        for path, (a_in, a_out, groups) in self.grouped.items():
            if path in self.width_convs:
                continue
            for atoms in (a_in, a_out):
                roots = np.array([self.uf.find(a) for a in atoms.tolist()]).reshape(groups, -1)
                if len(unique_ints(roots[:, 0])) < groups:
                    out.add(path)
        return frozenset(out)

    def output_used(self, index: int) -> bool:
        """Whether output ``index`` of the current (tuple-returning) call is used."""
        if self.node is None:
            return True
        for u in self.node.users:
            if u.op != "call_function" or u.target is not operator.getitem:
                return True  # the tuple itself goes somewhere
            if u.args[1] == index and u.users:
                return True
        return False

    def hold(self, s: Any) -> None:
        """Size ``s`` must keep its value (it sizes something that does not follow the width):
        keep the channels it counts and the attributes it was computed with."""
        for v in _ints(s):
            if isinstance(v, Dyn):
                for n, d in v.src:
                    m = self.measured(n, d)
                    if m is not None:
                        self.pin(m, f"its channel count sizes a fixed dim {self.where()}")
                self.freeze(v.attrs)
            elif isinstance(v, AttrInt):
                self.freeze([v])

    def attr_size(self, attr: AttrInt, atoms: np.ndarray) -> None:
        """Attribute ``attr`` counts the positions ``atoms``: the plan rewrites it to the number
        kept. Every use of one attribute keeps the same count (their positions are coupled)."""
        key = attr.qualname
        first = self.attrs.get(key)
        if first is None:
            self.attrs[key] = atoms
            self.attr_where[key] = self.where()
        elif first.shape == atoms.shape:
            self.uf.union_arrays(first, atoms)
        else:
            self.pin(atoms, f"attribute {key} sizes different things {self.where()}")
            self.pin(first, f"attribute {key} sizes different things {self.where()}")

    # -- slots
    def slot(self, path: str, axis: str, atoms: np.ndarray, kind: str = "module",
             cross_channel: bool = False) -> np.ndarray:
        key = f"{path}:{axis}"
        if cross_channel:
            self.cross.append(atoms)
            self.hard.append((atoms, f"layer '{path}' mixes its {axis} channels {self.where()}"))
        existing = self.slots.get(key)
        if existing is None:
            self.slots[key] = Slot(path, axis, atoms, kind)
            return atoms
        self.uf.union_arrays(existing.atoms, atoms)
        return existing.atoms

    def out_atoms(self, path: str, axis: str, n: int) -> np.ndarray:
        existing = self.slots.get(f"{path}:{axis}")
        return existing.atoms if existing is not None else self.slot(path, axis, self.uf.new(n))

    def record_cross_channel(self, atoms: np.ndarray, dim: int | None = None) -> np.ndarray:
        self.cross.append(atoms)
        if dim is not None and self.runs > 1:
            return atoms  # a train-only op does not run in the reference; the others did
        where = self._site() if dim is not None and atoms.ndim == 1 else None
        if where is None or dim is None:
            self.hard.append((atoms, f"{self._op()} mixes channels {self.where()}"))
        else:
            self.sites.append((where[:-1], dim, atoms, where[-1]))
        return atoms

    def _site(self) -> tuple[Any, ...] | None:
        """Where the current op runs, if its rule can run it on kept channels (``on_kept``):
        ``("module", path, calls)`` or ``("call", file, line, name, scope, n, calls)`` (the n-th
        of the ``calls`` calls of ``name`` that source line makes in the forward of layer
        ``scope``)."""
        node = self.node
        if node is None:
            return None
        if node.op == "call_module":
            rule = leaf_rule(self.submodule(str(node.target)))
            if rule is None or type(rule).on_kept is ModuleRule.on_kept:
                return None
            return ("module", str(node.target), self._calls(node)[1])
        fn = function_rule(node.target)
        loc = node.meta.get("surgery_loc")
        if fn is None or fn.on_kept is None or loc is None:
            return None
        return ("call", portable_source(loc[0]), loc[1], _call_name(node),
                node.meta.get("surgery_scope", ""), *self._calls(node))

    def _calls(self, node: torch.fx.Node) -> tuple[int, int]:
        """A call's index among the calls of the same function from its source line in the
        forward of the same layer (a layer's: among its calls), and how many those are."""
        if node not in self._lines:
            seen: dict[tuple[Any, ...], list[torch.fx.Node]] = {}
            for n in node.graph.nodes:
                loc = n.meta.get("surgery_loc")
                if n.op == "call_module":
                    seen.setdefault(("module", n.target), []).append(n)
                elif loc is not None and n.op in ("call_function", "call_method"):
                    seen.setdefault((*loc, _call_name(n), n.meta.get("surgery_scope", "")),
                                    []).append(n)
            self._lines = {n: (i, len(nodes)) for nodes in seen.values()
                           for i, n in enumerate(nodes)}
        return self._lines[node]

    def record_contracted(self, atoms: np.ndarray, dim: int | None = None) -> None:
        where = self._site() if dim is not None and atoms.ndim == 1 and self.runs <= 1 else None
        if where is not None and dim is not None:
            self.sites.append((where[:-1], dim, atoms, where[-1]))
        soft = dim is not None and (where is not None or self.runs > 1)
        self.contracted.append((atoms, f"{self._op()} sums over channels {self.where()}", soft))

    def _op(self) -> str:
        """The current op, as a message names it."""
        if self.node is None:
            return "an op"
        if self.node.op == "call_module":
            return f"layer '{self.node.target}'"
        return f"`{getattr(self.node.target, '__name__', self.node.target)}`"

    def submodule(self, path: str) -> nn.Module:
        """The traced model's layer at ``path`` (a table per model: the tree is not changed
        while it is traced)."""
        assert self.model is not None
        if self._submodules is None or self._submodules.model is not self.model:
            self._submodules = Submodules(self.model)
        return self._submodules(path)

    def owner(self, p: Any) -> tuple[str, nn.Module, ModuleRule | None] | None:
        """(path, module, rule) of the module owning parameter/buffer ``p``, if ``p`` is one."""
        if not isinstance(p, TVal) or p.param is None or self.model is None:
            return None
        owner_path = p.param.rpartition(".")[0]
        owner = self.submodule(owner_path)
        return owner_path, owner, module_rule(owner)

    def bind_param(self, p: TVal, dim: int, atoms: np.ndarray, cross_channel: bool = False,
                   reads: bool = False) -> np.ndarray | None:
        """A parameter used directly in forward (layer scale, ``F.conv2d(x, self.w)``) becomes a
        slot along ``dim``: its owner's axis when the owner's rule names it, else a raw tensor
        slice (``reads``: the dim reads channels, so the reference zeroes removed entries)."""
        assert p.param is not None and self.model is not None
        for d, attr in p.param_sizes:  # viewed to an attribute's shape: rewrite that entry
            if d == dim:
                self.attr_size(attr, atoms)
        if p.param_dims is not None:  # a view of the parameter: its own dim
            real = dict(p.param_dims).get(dim)
            if real is None:
                return None
            dim = real
        owner_path, _, name = p.param.rpartition(".")
        rule = module_rule(self.submodule(owner_path))
        axis = rule.param_axis(name, dim) if rule is not None else None
        if axis is not None:
            return self.slot(owner_path, axis, atoms, cross_channel=cross_channel)
        if rule is not None and rule.axes and (rule.own_tensors is None
                                               or name in rule.own_tensors):
            return None  # a ruled layer's own weight used elsewhere: leave it alone
        return self.slot(p.param, f"r{dim}" if reads else str(dim), atoms, kind="param",
                         cross_channel=cross_channel)

    # -- one graph
    def run(self, model: nn.Module, graph: torch.fx.Graph, meta: dict[torch.fx.Node, Any]) -> None:
        self.model = model
        self.runs += 1
        self._lines = {}
        env: dict[torch.fx.Node, Any] = {}
        self.env = env
        for node in graph.nodes:
            self.node = node
            out = meta.get(node)

            def load(a: Any) -> Any:
                return env[a] if isinstance(a, torch.fx.Node) else a

            args = torch.fx.node.map_aggregate(node.args, load)
            kwargs = torch.fx.node.map_aggregate(node.kwargs, load)
            if node.op == "placeholder":
                env[node] = out
            elif node.op == "get_attr":
                # a tensor fx made while tracing (``torch.ones(n)`` in forward) is a constant,
                # not an attribute of the user's model that a plan could slice
                env[node] = TVal(out.shape, param=None if _FX_CONSTANT.match(str(node.target))
                                 else node.target) if isinstance(out, TVal) else out
            elif node.op == "call_module":
                env[node] = self._module(model, node, args, kwargs, out)
            elif node.op in ("call_function", "call_method"):
                env[node] = self._function(node, args, kwargs, out)
            elif node.op == "output":
                for v in _walk(args):
                    if v.tracked:
                        self.pin(v.atoms, "model output")
        self.node = None

    def _module(self, model: nn.Module, node: torch.fx.Node, args: tuple, kwargs: dict[str, Any],
                out: Any) -> Any:
        path = str(node.target)
        module = self.submodule(path)
        inputs, extra = _by_position(module, args, kwargs)
        for v in _walk(extra):  # a tensor no parameter of forward names: it must stay whole
            if v.tracked:
                self.pin(v.atoms, f"passed to layer '{path}' ({type(module).__name__}) through "
                                  f"**kwargs")
        rule = leaf_rule(module)
        if rule is None:
            has_params = any(True for _ in module.parameters())
            if has_params and not matches(path, self.opaque_names):
                raise UnsupportedLayerError(
                    f"layer '{path}' ({type(module).__name__}) has parameters but no surgery "
                    f"rule knows how its channels pass: register one with "
                    f"surgery.register_module_rule(...) for {type(module).__name__}, or pass "
                    f"ignore=['{path}'] to keep it (and the channels around it) as it is.")
            return self.opaque(inputs, _dyn(out),
                               f"opaque layer '{path}' ({type(module).__name__})")
        return rule.propagate(self, path, module, inputs, out)

    def _function(self, node: torch.fx.Node, args: Any, kwargs: Any, out: Any) -> Any:
        if any(True for _ in _walk(out)):
            for f in _floats([args, kwargs]):  # a scale computed from a channel count: it
                for n, d in f.src:  # changes when they go, so the result is not exact
                    m = self.measured(n, d)
                    if m is not None:
                        self.record_cross_channel(m)
                self.freeze(f.attrs)
        if isinstance(out, float):  # a scale computed in forward: remember what from
            return _sized(node, args, kwargs, out)
        rule = function_rule(node.target)
        result = rule.propagate(self, args, kwargs, out) if rule is not None else NotImplemented
        # a rule may decline: treated as an op without one (no rule gives NotImplemented)
        if rule is not None and result is not NotImplemented:
            if type(result) is int and not any(True for _ in _walk([args, kwargs])):
                return _sized(node, args, kwargs, out)  # a size computed (``c * h``): from what
            if rule.name in _POSITIONWISE:
                result = _param_lineage(rule.name, args, kwargs, result)
            return result
        if not any(True for _ in _walk(out)):
            return _sized(node, args, kwargs, out)  # sizes, dims, dtypes
        params = [v for v in _walk([args, kwargs]) if v.param is not None]
        tracked = any(v.tracked for v in _walk([args, kwargs]))
        for p in params:
            assert p.param is not None  # as filtered
            owner = p.param.rpartition(".")[0]
            if tracked and not matches(owner, self.opaque_names):
                cls = type(self.model.get_submodule(owner)).__name__ if self.model else "?"
                error = UnsupportedLayerError(
                    f"layer '{owner}' ({cls}) computes with its parameter '{p.param}' through "
                    f"`{getattr(node.target, '__name__', node.target)}` {self.where()}, which no "
                    f"surgery rule knows: register a module rule for {cls} "
                    f"(surgery.register_module_rule), or pass ignore=['{owner}'] to keep it.")
                if _user_function(node.target):
                    raise _WrappedCall(error, node.target.__name__)
                raise error
        return self.opaque([args, kwargs], out)


def _call_name(node: torch.fx.Node) -> str:
    """The name a call node's function goes by (``"layer_norm"``, method ``"mean"``), as a torch
    function mode sees it."""
    return str(node.target) if node.op == "call_method" else \
        getattr(node.target, "__name__", str(node.target))


class _WrappedCall(Exception):
    """fx kept a Python function (``torch.fx.wrap``) as one call: the executing tracer can
    look inside it."""

    def __init__(self, error: UnsupportedLayerError, name: str) -> None:
        super().__init__(str(error))
        self.error, self.name = error, name


def _user_function(target: Any) -> TypeGuard[Callable[..., Any]]:
    module = (getattr(target, "__module__", "") or "").split(".")[0]
    return callable(target) and not isinstance(target, str) and \
        module not in ("torch", "builtins", "_operator", "operator", "math")


#: rules of ops that keep each position's value where it was, or compute it from that position
#: alone (reshapes, transposes, elementwise with scalars): a parameter passed through them is
#: still that parameter, sliced the same way
_POSITIONWISE = {"unary", "view", "flatten", "unflatten", "getitem", "permute", "transpose",
                 "broadcast", "reshape_as"}


def _literal_ints(v: Any) -> set[int]:
    """Ints written in a call's arguments (not computed from a tensor's shape)."""
    if isinstance(v, bool) or isinstance(v, Dyn) and not v.attrs:
        return set()
    if isinstance(v, int):
        return {v}
    if isinstance(v, tuple | list):
        return set().union(*(_literal_ints(x) for x in v)) if v else set()
    if isinstance(v, dict):
        return _literal_ints(list(v.values()))
    return set()


def _squeezed_map(a: Sequence[int], b: Sequence[int]) -> dict[int, int]:
    """Dims of shape ``a`` that a reshape to ``b`` keeps whole (size > 1): a dim -> b dim."""
    ia = [d for d, n in enumerate(a) if n != 1]
    ib = [d for d, n in enumerate(b) if n != 1]
    from .rules.functions import reshape_blocks  # (the rules import this module)

    blocks = reshape_blocks([a[d] for d in ia], [b[d] for d in ib])
    return {ia[i[0]]: ib[o[0]] for i, o in blocks or [] if len(i) == 1 and len(o) == 1}


def _index_map(src: TVal, idx: Any, out: TVal) -> dict[int, int]:
    """Dims of ``src`` that ``src[idx]`` keeps whole: src dim -> out dim."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    advanced = [i for i in idx if isinstance(i, TVal)]
    if len(advanced) > 1:
        return {}
    mapping: dict[int, int] = {}
    d_in = d_out = 0
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    for i in idx:
        if i is Ellipsis:
            for _ in range(src.ndim - n_real):
                mapping[d_in] = d_out
                d_in, d_out = d_in + 1, d_out + 1
        elif i is None:
            d_out += 1
        elif isinstance(i, TVal):  # gathered along d_in: the index's dims take its place
            d_in, d_out = d_in + 1, d_out + i.ndim
        elif isinstance(i, slice):
            if i == slice(None):
                mapping[d_in] = d_out
            d_in, d_out = d_in + 1, d_out + 1
        else:
            d_in += 1
    for rest in range(d_in, src.ndim):
        mapping[rest] = d_out + rest - d_in
    return {i: o for i, o in mapping.items() if o < out.ndim and out.shape[o] == src.shape[i]}


def _dim_map(rule: str, args: Any, src: TVal, out: TVal) -> dict[int, int]:
    """For a position-wise op: which dims of its tensor input reach which dims of its output."""
    if rule in ("unary", "broadcast"):  # aligned from the right (expand, a scalar operand)
        off = out.ndim - src.ndim
        return {d: d + off for d in range(src.ndim)
                if d + off >= 0 and src.shape[d] == out.shape[d + off]}
    if rule in ("view", "flatten", "unflatten", "reshape_as"):
        mapping = _squeezed_map(src.shape, out.shape)
        if rule == "view":  # a size written as a literal does not follow: gamma.view(1, 16)
            written = _literal_ints([a for a in _ints(args[1:]) if not isinstance(a, AttrInt)])
            mapping = {i: o for i, o in mapping.items() if out.shape[o] not in written}
        return mapping
    if rule == "permute":
        dims = args[1:] if len(args) > 2 or not isinstance(args[1], tuple | list) else args[1]
        return {int(d) % src.ndim: i for i, d in enumerate(dims)}
    if rule == "transpose":
        d0, d1 = args[1] % src.ndim, args[2] % src.ndim
        return {d: d1 if d == d0 else d0 if d == d1 else d for d in range(src.ndim)}
    if rule == "getitem":
        return _index_map(src, args[1], out)
    return {}


def _param_lineage(rule: str, args: Any, kwargs: Any, result: Any) -> Any:
    """``gamma.view(1, -1, 1, 1)``, ``table[index].permute(2, 0, 1)``: the result is still the
    parameter along the dims the op keeps whole (its positions are computed one by one)."""
    if not isinstance(result, TVal) or result.tracked or result.param is not None:
        return result
    if rule in ("getitem", "reshape_as"):  # the indexed tensor (an index may be a buffer
        # itself); the tensor reshaped (the other only gives the sizes)
        sources = list(_walk(args[:1]))
        if any(v.tracked for v in _walk(args[1:])):
            return result
    else:
        sources = list(_walk([args, kwargs]))
    if len(sources) != 1 or sources[0].tracked or sources[0].param is None:
        return result
    src = sources[0]
    own = dict(src.param_dims) if src.param_dims is not None else \
        {d: d for d in range(src.ndim)}
    mapping = _dim_map(rule, args, src, result)
    pairs = tuple(sorted((o, own[i]) for i, o in mapping.items()
                         if i in own and src.shape[i] != 1))
    if not pairs:
        return result
    # sizes that come from an attribute follow it: gamma.view(self.shape) rewrites self.shape
    sizes = {o: a for d, a in src.param_sizes for i, o in mapping.items() if i == d}
    if rule == "view":
        given = _view_sizes(args)
        if len(given) == result.ndim:
            sizes.update({o: s for o, s in enumerate(given) if isinstance(s, AttrInt)})
    return TVal(result.shape, param=src.param, param_dims=pairs,
                param_sizes=tuple(sorted((o, a) for o, a in sizes.items()
                                         if o in dict(pairs))))


def _view_sizes(args: Any) -> list[Any]:
    rest = args[1:]
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], tuple | list) else list(rest)


def _defaults(model: nn.Module, n_inputs: int | None) -> dict[str, Any] | None:
    """Forward parameters beyond the given inputs that have defaults (``return_features=False``,
    ``y=None``): fx traces with those values instead of guessing at a Proxy."""
    if n_inputs is None:
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    plain = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    bound = {p.name: p.default for p in plain[n_inputs:] if p.default is not p.empty}
    return bound or None


#: how the modules of a graph from :func:`fx_trace` were called (see :func:`call_of`)
_CALLS: weakref.WeakKeyDictionary[torch.fx.Graph, dict[int, set[Call]]] = \
    weakref.WeakKeyDictionary()


def fx_trace(model: nn.Module, opaque: Sequence[str], n_inputs: int | None = None
             ) -> torch.fx.Graph:
    """torch.fx graph of ``model``'s forward, layers in ``opaque`` and ruled leaves kept as
    calls; a failure names the user's source line."""
    tracer = _Tracer(opaque)
    try:
        graph = tracer.trace(model, concrete_args=_defaults(model, n_inputs))
        _CALLS[graph] = tracer.calls
        return graph
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if "/torch/" not in f.filename and "/surgery/" not in f.filename]
        last = frames[-1] if frames else None
        where = f" at {last.filename}:{last.lineno}: {last.line}" if last else ""
        inside = next(reversed(tracer.module_stack), "") if tracer.module_stack else ""
        hint = (f"pass ignore=['{inside}'] to keep that module as an opaque block"
                if inside else "make the forward's control flow independent of tensor values")
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}.forward{where} "
                         f"(inside module '{inside or '<root>'}'): {e}. Fix: {hint}.") from e


def _record(model: nn.Module, inputs: tuple, opaque: Sequence[str], notes: list[str]
            ) -> tuple[torch.fx.Graph, dict[torch.fx.Node, Any]]:
    from .recorder import record

    leaves = _Tracer(opaque)
    graph, meta, reads = record(model, inputs, leaf=leaves.is_leaf_module, skeleton=_skeleton,
                                dyn=Dyn, where=user_frame)
    for file, line in reads:
        path = file.split("site-packages/", 1)[-1]
        note = (f"the forward reads tensor values at {path}:{line}: "
                f"{linecache.getline(file, line).strip()} (branches there follow the example "
                "input; verification checks the pruned model on it)")
        if note not in notes:
            notes.append(note)
    return graph, meta


TRACERS = ("auto", "fx", "run")


def _analyse(ctx: _Context, model: nn.Module, graph: torch.fx.Graph, inputs: tuple) -> None:
    """Learn every value's shape (costly layers on the meta device where the graph allows, else
    a real run), then propagate the channel rules."""
    rec = None
    if not hooked(model):
        with contextlib.suppress(NeedsValues):
            rec = _recorded(model, graph, inputs, cheap=True)
    if rec is None:
        rec = _recorded(model, graph, inputs, cheap=False)
    ctx.run(model, graph, rec.meta)


def _recorded(model: nn.Module, graph: torch.fx.Graph, inputs: tuple, cheap: bool) -> Recorder:
    rec = Recorder(model, graph, cheap=cheap)  # no GraphModule: its code is not needed to run
    with torch.no_grad():
        rec.run(*inputs)
    return rec


@pauses_collector
def trace(model: nn.Module, example_inputs: Inputs, *, ignore: Sequence[str] = (),
          tracer: str = "auto") -> ChannelGraph:
    """Trace ``model`` into its coupled channel groups.

    Args:
        model: the network; it is not modified (its train/eval flags are restored).
        example_inputs: a tensor or tuple of tensors the forward accepts.
        ignore: layer names (or ``re:`` regexes) to keep as they are. A layer with a rule keeps its
            output channels; any other module becomes an opaque block whose channels stay.
        tracer: ``"fx"`` (symbolic, follows every branch), ``"run"`` (executes the forward on
            the example inputs and records it: any Python, branches specialised to the inputs)
            or ``"auto"``: fx, and run where fx cannot trace the model. ``graph.tracer`` says
            which was used.

    Example:
        >>> graph = surgery.trace(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        >>> print(graph.explain("fc"))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module but received {type(model).__name__}")
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, not {tracer!r}")
    inputs = as_tuple(example_inputs)
    ignore = tuple(ignore)
    notes: list[str] = []
    # buffers put back: symbolic tracing runs in-place updates on real buffers (a BatchNorm
    # subclass's train-mode `num_batches_tracked.add_(1)`) and a train-mode run updates stats;
    # attributes put back: a symbolic trace of `self.count += 1` assigns a Proxy to the module
    with attributes_kept(model), buffers_kept(model), attribute_ints(model), \
            switched_mode(model, train=None):
        ctx, used, train_graph = _trace_modes(model, inputs, ignore, tracer, notes)
        crossed = ctx.crossed_groups()
        if crossed:  # a channel shuffle ties their groups: trace again, pruning by width
            again = _trace_modes(model, inputs, ignore, used, [], crossed)
            if _free_units(again[0]) > _free_units(ctx):
                ctx, used, train_graph = again
                notes.append(f"grouped convs pruned by width (equal counts per group), "
                             f"since their groups are shuffled together: "
                             f"{', '.join(sorted(crossed)[:4])}"
                             f"{' …' if len(crossed) > 4 else ''}")
        tracer = used
    return _finish(ctx, model, ignore, train_graph, tracer, notes)


def _free_units(ctx: _Context) -> int:
    """Layer positions that a plan could remove (in units of which a group has more than one),
    for comparing two analyses of one model."""
    roots = ctx.uf.roots()
    pinned = unique_ints(np.concatenate([roots[a].ravel() for a, _ in ctx.pins])) \
        if ctx.pins else np.zeros(0, np.int64)
    total = 0
    for s in ctx.slots.values():
        free = roots[s.atoms][~np.isin(roots[s.atoms], pinned)]
        if len(unique_ints(free)) > 1:
            total += len(free)
    return total


def _trace_modes(model: nn.Module, inputs: tuple, ignore: tuple, tracer: str,
                 notes: list[str], by_width: frozenset[str] = frozenset()
                 ) -> tuple[_Context, str, bool]:
    """Analyse the eval forward (and the train forward where it differs) with ``tracer``."""
    model.eval()
    if tracer != "run":
        ctx = _Context(ignore, by_width)
        try:
            eval_graph = fx_trace(model, ignore, len(inputs))
            return ctx, "fx", _fx_traced(ctx, model, eval_graph, inputs, ignore)
        except (TraceError, _WrappedCall) as e:
            if tracer == "fx":
                raise (e.error if isinstance(e, _WrappedCall) else e) from None
            why = f"`{e.name}` is a function torch.fx does not trace into" \
                if isinstance(e, _WrappedCall) else f"torch.fx: {e}"
            notes.append(f"traced by running the forward ({why})")
    ctx = _Context(ignore, by_width)
    return ctx, "run", _run_traced(ctx, model, inputs, ignore, notes)


def _run_traced(ctx: _Context, model: nn.Module, inputs: tuple, ignore: tuple,
                notes: list[str]) -> bool:
    """Analyse the recorded eval forward, and the train forward where it differs."""
    graph, meta = _record(model, inputs, ignore, notes)
    ctx.run(model, graph, meta)
    # the train-mode forward runs on the model itself: trace() puts back its buffers (running
    # stats) and train/eval flags afterwards, so no copy is needed
    model.train()
    doubled = _doubled(inputs)
    try:
        with buffers_kept(model):
            graph_t, meta_t = _record(model, doubled, ignore, notes)
    except ExampleInputError as e:
        notes.append(f"training-mode forward not analysed: it fails on the example inputs "
                     f"({str(e).splitlines()[0][:200]})")
        return False
    if signature(graph_t) == signature(graph):
        return False
    ctx.run(model, graph_t, meta_t)
    return True


def _doubled(inputs: tuple) -> tuple:
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.ndim > 1
                 and x.shape[0] == 1 else x for x in inputs)


def _fx_traced(ctx: _Context, model: nn.Module, eval_graph: torch.fx.Graph, inputs: tuple,
               ignore: tuple) -> bool:
    """Analyse the symbolic eval graph, and the train graph where it differs (aux heads)."""
    _analyse(ctx, model, eval_graph, inputs)
    model.train()
    same = same_in_train_mode(model, eval_graph, _CALLS.get(eval_graph, {}),
                              lambda names: _Tracer(ignore, names))
    graph_t = eval_graph if same else fx_trace(model, ignore, len(inputs))
    if signature(graph_t) == signature(eval_graph):
        return False
    # train-only branches (aux heads): the train-mode forward updates running stats, which
    # trace() puts back afterwards (with the train/eval flags), so it runs on the model itself
    try:
        with buffers_kept(model):
            _analyse(ctx, model, graph_t, _doubled(inputs))
    except ExampleInputError as e:
        raise ExampleInputError(
            f"{type(model).__name__} has layers used only in training mode (e.g. an "
            f"auxiliary head) and its training-mode forward fails on the example inputs "
            f"(batch of 2): {e}. Use larger example inputs.") from e
    return True


def _contracted_inexact(ctx: _Context, slots: list[Slot], roots: np.ndarray
                        ) -> tuple[set[int], dict[int, str]]:
    """Units summed over in a product of two tensors that no channel-mixing layer also reads,
    and of those, the ones the reference cannot sum over the kept alone (with why).

    The reference zeroes the weights that read removed channels. A unit that only meets a
    product (the q/k width of a head) is not zeroed by that, so removing it changes the scores:
    allowed, like a cross-channel norm, but not exact. A whole head also feeds the projection,
    which drops its output, so removing it is exact.
    """
    contracted: set[int] = set()
    hard: dict[int, str] = {}  # and why, where the reference cannot sum over the kept alone
    for atoms, why, soft in ctx.contracted:
        for r in unique_ints(roots[atoms]).tolist():
            contracted.add(r)
            if not soft:
                hard.setdefault(r, why)
    if not contracted:
        return set(), {}
    mixed: set[int] = set()
    for s in slots:
        if s.kind != "module" or s.axis != "in":
            continue
        out = ctx.slots.get(f"{s.path}:out")
        produced = set(unique_ints(roots[out.atoms]).tolist()) if out is not None else set()
        mixed |= set(unique_ints(roots[s.atoms]).tolist()) - produced
    return contracted - mixed, {r: why for r, why in hard.items() if r not in mixed}


def _finish(ctx: _Context, model: nn.Module, ignore: tuple, train_graph: bool, tracer: str,
            notes: list[str]) -> ChannelGraph:
    for slot in ctx.slots.values():
        if slot.axis != "in" and matches(slot.path, ignore):
            ctx.pin(slot.atoms, f"'{slot.path}' is in ignore=")
    for key, why in ctx.frozen.items():
        if key in ctx.attrs:  # a size computed from it must stay: so must its count
            ctx.pin(ctx.attrs[key], f"attribute {key} also sizes a fixed dim ({why})")
    roots = ctx.uf.roots()
    pinned: dict[int, list[str]] = {}
    for atoms, reason in ctx.pins:
        for r in unique_ints(roots[atoms]).tolist():
            reasons = pinned.setdefault(r, [])
            if len(reasons) < 4 and reason not in reasons:
                reasons.append(reason)
    cross = {r for atoms in ctx.cross for r in unique_ints(roots[atoms]).tolist()}
    slots = list(ctx.slots.values())
    inexact, hard = _contracted_inexact(ctx, slots, roots)
    cross |= inexact
    for atoms, why in ctx.hard:
        for r in unique_ints(roots[atoms]).tolist():
            hard.setdefault(r, why)
    sites = list({where: TracedSite(where, dim, roots[atoms], calls)  # a layer called twice:
                  for where, dim, atoms, calls in reversed(ctx.sites)}.values())  # one site
    return ChannelGraph(type(model).__name__, fingerprint(model), {s.key: s for s in slots}, roots,
                        build_groups(slots, roots, pinned), pinned, cross, train_graph, tracer,
                        notes, dict(ctx.attrs), hard, sites)
