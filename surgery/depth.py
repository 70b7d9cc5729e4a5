"""Depth pruning: bypass a residual body (``x + f(x)`` becomes ``x``) or a gate (``x * g(x)``
becomes ``x``) so the layers behind it stop running.

Found by what an op does, not by class: every submodule's own forward is traced by torch.fx with
its children kept as calls, and an ``add`` of two tensors or a ``mul`` by a bounded gate
(an activation whose outputs lie in [0, 1], e.g. sigmoid) is a bypass when one operand is computed
by layers with parameters that nothing else reads. The bypassed module is replaced by a
``GraphModule`` that runs what is left of its forward (the shortcut, a downsample, the final
activation) with the same children, names, arguments and plain attributes, so the parent's
forward and the state-dict keys of what remains do not change.

A bypass changes the function, so it cannot be verified against the original; the reference for
verification is the original with the same bypasses (:func:`bypass_in_place` on a copy), and the
width pruning on top of it must equal that exactly. :func:`sensitivity` scores each bypass by how
much it changes the model's outputs on example data.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from .errors import PlanError
from .graph import Inputs, LocatingTracer, as_tuple, source_line
from .modes import switched_mode
from .tensors import output_tensors

_ADDS = {operator.add, operator.iadd, torch.add}
_MULS = {operator.mul, operator.imul, torch.mul}


@dataclass(frozen=True)
class Bypass:
    """One op of a module's forward replaced by one of its operands.

    ``block``: the module whose forward holds the op; ``node``: the op's name in the torch.fx
    graph of that forward (stable for the same code); ``keep``: the operand kept (0 or 1);
    ``kind``: ``"residual"`` (an add) or ``"gate"`` (a multiplication by a gate);
    ``removes``: the layers that stop running and the tensors no longer read (a layer scale);
    ``line``: the source line of the op.
    """

    block: str
    node: str
    keep: int
    kind: str
    removes: tuple[str, ...]
    line: str = ""

    @property
    def key(self) -> str:
        return f"{self.block}:{self.node}"

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "node": self.node, "keep": self.keep, "kind": self.kind,
                "removes": list(self.removes), "line": self.line}

    @classmethod
    def from_dict(cls, d: Any) -> Bypass:
        return cls(str(d["block"]), str(d["node"]), int(d["keep"]), str(d["kind"]),
                   tuple(str(r) for r in d["removes"]), str(d.get("line", "")))


class _ChildrenAsCalls(LocatingTracer):
    """Trace one module's own forward: every child stays a call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _own_graph(module: nn.Module) -> torch.fx.Graph | None:
    """The module's forward as an fx graph, or None when fx cannot trace it or it differs
    between train and eval mode (the replacement must behave as the original in both)."""
    graphs = []
    for training in (False, True):
        try:
            with switched_mode(module, train=training):
                graphs.append(_ChildrenAsCalls().trace(module))
        except Exception:  # not traceable on its own: no bypass inside this module
            return None
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        return None
    return graphs[0]


@functools.cache
def _bounded_gate(fn: Any, kwargs: tuple[tuple[str, Any], ...] = ()) -> bool:
    """Does ``fn`` (called with ``kwargs``) map every real number into [0, 1], monotonically
    (sigmoid, hard sigmoid)?"""
    x = torch.linspace(-12, 12, 97)
    try:
        with torch.no_grad():
            y = fn(x, **dict(kwargs))
    except Exception:
        return False
    return (isinstance(y, torch.Tensor) and y.shape == x.shape and bool((y >= 0).all())
            and bool((y <= 1).all()) and bool((y.diff() >= 0).all()) and float(y[-1] - y[0]) > 0.5)


def _is_gate(module: nn.Module, node: Any) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_module":
        child = module.get_submodule(str(node.target))
        if any(True for _ in child.parameters()):
            return False
        return _bounded_gate(_Frozen(child))
    if len(node.args) != 1 or any(isinstance(v, torch.fx.Node) for v in node.kwargs.values()):
        return False
    try:
        kwargs = tuple(sorted(node.kwargs.items()))
        hash(kwargs)
    except TypeError:  # a setting that is not plain data
        return False
    if node.op == "call_function":
        return _bounded_gate(node.target, kwargs)
    if node.op == "call_method":
        return _bounded_gate(operator.methodcaller(str(node.target)), kwargs)
    return False


class _Frozen:
    """A parameter-free child as a hashable callable for the gate probe's cache."""

    def __init__(self, m: nn.Module) -> None:
        self.m = m

    def __call__(self, x: torch.Tensor) -> Any:
        return self.m(x)

    def __hash__(self) -> int:
        return hash((type(self.m), repr(self.m)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Frozen) and type(self.m) is type(other.m) and \
            repr(self.m) == repr(other.m)


def _candidates(module: nn.Module, graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, str]]:
    out = []
    for n in graph.nodes:
        two = len(n.args) == 2 and all(isinstance(a, torch.fx.Node) for a in n.args)
        if not two or n.kwargs:
            continue
        if n.op == "call_function" and n.target in _ADDS or \
                n.op == "call_method" and n.target in ("add", "add_"):
            out.append((n, "residual"))
        elif (n.op == "call_function" and n.target in _MULS or
              n.op == "call_method" and n.target in ("mul", "mul_")) and \
                any(_is_gate(module, a) for a in n.args):
            out.append((n, "gate"))
    return out


def _bypassed_graph(graph: torch.fx.Graph, ops: dict[str, int]) -> torch.fx.Graph:
    """A copy of ``graph`` with each named op replaced by its kept operand, and what then feeds
    nothing removed. A statement that fed nothing before (an in-place ``out.relu_()``) goes only
    when everything it reads goes too: one that mutates a tensor still used stays."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    statements: set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n.name in ops:
            env[n] = env[n.args[ops[n.name]]]
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
        if not n.users and n.op != "output":
            statements.add(env[n])
    changed = True
    while changed:
        changed = False
        for n in reversed(list(g.nodes)):
            if n.op in ("placeholder", "output") or n.users:
                continue
            if n in statements and any(
                    a.op == "placeholder" or set(a.users) != {n} for a in n.all_input_nodes):
                continue  # mutates something that stays
            g.erase_node(n)
            changed = True
    return g


def _used(graph: torch.fx.Graph) -> set[str]:
    """The children called and the tensors read (``self.layer_scale``) by a forward."""
    return {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}


def _params(module: nn.Module, names: Iterable[str]) -> int:
    """Parameters held by the children and tensors named."""
    total = 0
    for t in names:
        owner, _, leaf = t.rpartition(".")
        v = getattr(module.get_submodule(owner), leaf, None)
        if isinstance(v, nn.Module):
            total += sum(p.numel() for p in v.parameters())
        elif isinstance(v, nn.Parameter):
            total += v.numel()
    return total


def block_bypasses(module: nn.Module, path: str,
                   graph: torch.fx.Graph | None = None) -> list[Bypass]:
    """The bypasses of one module's own forward (its ``add``s and gates whose other operand
    reads layers with parameters that nothing else in the forward reads)."""
    graph = graph or _own_graph(module)
    if graph is None:
        return []
    used = _used(graph)
    found = []
    for node, kind in _candidates(module, graph):
        options = []
        sides = (0, 1) if kind == "residual" else \
            tuple(i for i, a in enumerate(node.args) if not _is_gate(module, a))
        for keep in sides:
            if kind == "gate" and _is_gate(module, node.args[keep]):
                continue
            gone = used - _used(_bypassed_graph(graph, {node.name: keep}))
            if _params(module, gone) > 0:
                options.append((_params(module, gone), keep, gone))
        if not options:
            continue
        if kind == "residual" and len(options) == 2:
            # both operands run layers (a downsample and the body): keep the lighter shortcut
            _, keep, gone = max(options)
        else:
            _, keep, gone = options[0]
        prefix = f"{path}." if path else ""
        found.append(Bypass(path, node.name, keep, kind,
                            tuple(sorted(prefix + g for g in gone)), source_line(node)))
    return found


def find_bypasses(model: nn.Module, example_inputs: Inputs | None = None, *,
                  ignore: Sequence[str] = ()) -> list[Bypass]:
    """Every residual body and gate of ``model`` that can be bypassed, in module order.

    The model's own forward is not one (its class must keep working). With ``example_inputs``,
    only bypasses that run on them and keep the output shape are kept.

    Example:
        >>> [b.key for b in surgery.find_bypasses(torchvision.models.resnet18())][:2]
        ['layer1.0:add', 'layer1.1:add']
    """
    from .graph import matches

    seen: set[int] = set()
    found: list[Bypass] = []
    for path, m in model.named_modules():
        if not path or id(m) in seen or matches(path, ignore) or not m._modules:
            continue
        seen.add(id(m))
        found += [b for b in block_bypasses(m, path)
                  if not any(matches(r, ignore) for r in b.removes)]
    if example_inputs is not None:
        scores = sensitivity(model, example_inputs, found)
        found = [b for b, s in zip(found, scores, strict=True) if math.isfinite(s)]
    return found


def _replacement(module: nn.Module, graph: torch.fx.Graph, ops: dict[str, int]) -> nn.Module:
    gm = torch.fx.GraphModule(module, _bypassed_graph(graph, ops),
                              class_name=f"{type(module).__name__}Bypassed")
    for name, value in vars(module).items():  # plain attributes the parent may read
        if not name.startswith("_") and name not in vars(gm) and isinstance(
                value, int | float | str | bool | tuple | type(None)):
            setattr(gm, name, value)
    gm.train(module.training)
    return gm


def _bypassed_module(module: nn.Module, ops: dict[str, int], path: str) -> nn.Module:
    """``module`` with the ops named bypassed; refuses ops that are not bypasses here."""
    graph = _own_graph(module)
    if graph is None:
        raise PlanError(f"the plan bypasses ops in '{path}' ({type(module).__name__}), but its "
                        "forward cannot be traced on its own in this model")
    valid = {(b.node, b.keep) for b in block_bypasses(module, path, graph)}
    for node, keep in ops.items():
        if (node, keep) not in valid:
            raise PlanError(f"the plan bypasses op '{node}' (keeping operand {keep}) of "
                            f"'{path}' ({type(module).__name__}), which is not a residual add or "
                            "gate of its forward here; re-create the plan for this model")
    return _replacement(module, graph, ops)


def _grouped(bypasses: Iterable[Bypass]) -> dict[str, dict[str, int]]:
    by_block: dict[str, dict[str, int]] = {}
    for b in bypasses:
        by_block.setdefault(b.block, {})[b.node] = b.keep
    return by_block


def outermost(bypasses: Sequence[Bypass]) -> list[Bypass]:
    """Drop the bypasses inside a layer another bypass removes (an SE in a removed body)."""
    gone = {r for b in bypasses for r in b.removes}
    return [b for b in bypasses
            if not any(b.block == r or b.block.startswith(r + ".") for r in gone)]


def bypassed_modules(model: nn.Module, bypasses: Sequence[Bypass]) -> dict[str, nn.Module]:
    """The replacement of every bypassed module, by path; ``model`` is not modified.
    Raises :class:`PlanError` when a bypass does not fit ``model``."""
    out = {}
    for path, ops in _grouped(outermost(bypasses)).items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise PlanError(f"the plan bypasses ops in '{path}', which this model does not "
                            "have") from None
        out[path] = _bypassed_module(module, ops, path)
    return out


def bypass_in_place(model: nn.Module, bypasses: Sequence[Bypass]) -> nn.Module:
    """Swap the bypassed modules into ``model`` (all built first: on failure it is unchanged)."""
    for path, new in bypassed_modules(model, bypasses).items():
        parent, _, name = path.rpartition(".")
        model.get_submodule(parent).register_module(name, new)
    return model


def _change(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return math.inf
    num = sum(float((x.double() - y.double()).norm() ** 2) for x, y in zip(a, b, strict=True)
              if x.is_floating_point())
    den = sum(float(y.double().norm() ** 2) for y in b if y.is_floating_point())
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def first_calls(model: nn.Module, example_inputs: Inputs, paths: Iterable[str]) -> FirstCalls:
    """(args, kwargs, output) of the first call of each module named, in one eval forward: one
    record that :func:`transitions`, :func:`sensitivity` and :func:`block_change` can share."""
    inputs = as_tuple(example_inputs)
    seen: FirstCalls = {}

    def keep_first(path: str) -> Any:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            seen.setdefault(path, (args, kwargs, out))
        return hook

    handles = [model.get_submodule(p).register_forward_hook(keep_first(p), with_kwargs=True)
               for p in set(paths)]
    try:
        with switched_mode(model), torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


#: module path -> (args, kwargs, output) of its first call in one eval forward
FirstCalls = dict[str, tuple[tuple, dict, Any]]


def _fresh(call: tuple[tuple, dict, Any]) -> tuple[tuple, dict, Any]:
    """A recorded call with its input tensors copied: a block that writes its input in place
    (a pre-activation ``relu_``) must not change the record the next measure reads."""
    args, kwargs, out = call
    copied = torch.utils._pytree.tree_map(
        lambda v: v.clone() if isinstance(v, torch.Tensor) else v, (args, kwargs))
    return copied[0], copied[1], out


def transitions(model: nn.Module, example_inputs: Inputs, blocks: Iterable[str], *,
                calls: FirstCalls | None = None) -> set[str]:
    """The ``blocks`` whose output shape differs from their first input's (a stage's first
    block, its shortcut a strided or widening projection): bypassing one leaves that
    projection alone as the transition, e.g. a stride-2 1x1 conv that reads a quarter of the
    positions. Blocks that do not run are not included. ``calls``: a record of the blocks'
    first calls already made (:func:`first_calls`), instead of another forward."""
    blocks = set(blocks)
    seen = calls if calls is not None else first_calls(model, example_inputs, blocks)
    out = set()
    for path, (args, kwargs, got) in seen.items():
        if path not in blocks:
            continue
        given = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        outs = output_tensors(got)
        if given is not None and outs and tuple(outs[0].shape) != tuple(given.shape):
            out.add(path)
    return out


def sensitivity(model: nn.Module, example_inputs: Inputs,
                bypasses: Sequence[Bypass], *, calls: FirstCalls | None = None) -> list[float]:
    """How much each bypass changes its block's output, relative to that output (eval mode, on
    ``example_inputs``, the first call of each block): small means the body or gate contributes
    little. Local, so a model whose head ignores its features (zero-initialised) still ranks
    its blocks. ``inf`` when the bypass changes the block's output shape, fails to run, or the
    block does not run; the model is not modified. ``calls``: as for :func:`transitions`."""
    blocks = {b.block for b in bypasses}
    seen = calls if calls is not None else first_calls(model, example_inputs, blocks)
    scores = []
    with switched_mode(model), torch.no_grad():
        graphs = {p: _own_graph(model.get_submodule(p)) for p in blocks}
        for b in bypasses:
            graph = graphs[b.block]
            if b.block not in seen or graph is None:
                scores.append(math.inf)
                continue
            args, kwargs, out = _fresh(seen[b.block])
            try:
                new = _replacement(model.get_submodule(b.block), graph, {b.node: b.keep}).eval()
                got = new(*args, **kwargs)
            except Exception:  # the bypassed block does not run on what the original got
                scores.append(math.inf)
                continue
            scores.append(_change(output_tensors(got), output_tensors(out)))
    return scores


def block_change(model: nn.Module, other: nn.Module, example_inputs: Inputs,
                 paths: Sequence[str], *, calls: FirstCalls | None = None) -> list[float]:
    """For each module path: how much ``other``'s module there (e.g. with channels zeroed)
    changes the output of ``model``'s, given the input ``model``'s got, relative to it.
    ``calls``: as for :func:`transitions`."""
    seen = calls if calls is not None else first_calls(model, example_inputs, paths)
    out = []
    with switched_mode(other), torch.no_grad():
        for p in paths:
            if p not in seen:
                out.append(math.inf)
                continue
            args, kwargs, want = _fresh(seen[p])
            try:
                got = other.get_submodule(p)(*args, **kwargs)
            except Exception:
                out.append(math.inf)
                continue
            out.append(_change(output_tensors(got), output_tensors(want)))
    return out
