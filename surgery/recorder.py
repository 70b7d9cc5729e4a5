"""The executing tracer: run the model once and record what it does, as an fx graph.

torch.fx's symbolic tracing cannot follow Python that looks at tensor values or shapes (``if
x.shape[-1] % 2``, iterating over a tensor, a detector's per-image loop). This tracer runs the real
forward on the example inputs instead, under a ``TorchFunctionMode`` that sees every torch function
and tensor method, and with module hooks that turn calls of layers with a rule into single
``call_module`` nodes. The result is the same kind of graph the symbolic tracer makes (placeholder,
get_attr for parameters found by identity, call_function / call_method / call_module, output), with
every node's value skeleton, so the channel rules read it unchanged.

Python branches are specialised to the example inputs. Sizes read from a tensor (``x.shape``,
``x.size(1)``, ``x.numel()``) are returned as ``Dyn`` ints, which stay ``Dyn`` through arithmetic,
so a size computed from them follows the pruned width while a literal written in the code (or read
from an attribute) is still detected as hard-coded.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ExampleInputError

#: tensor dunder methods -> (fx function, whether the operands are swapped)
_DUNDER: dict[str, tuple[Callable[..., Any], bool]] = {
    "__getitem__": (operator.getitem, False), "__add__": (operator.add, False),
    "__radd__": (operator.add, True), "__iadd__": (operator.iadd, False),
    "__sub__": (operator.sub, False), "__rsub__": (operator.sub, True),
    "__isub__": (operator.isub, False), "__mul__": (operator.mul, False),
    "__rmul__": (operator.mul, True), "__imul__": (operator.imul, False),
    "__truediv__": (operator.truediv, False), "__rtruediv__": (operator.truediv, True),
    "__itruediv__": (operator.itruediv, False), "__neg__": (operator.neg, False),
    "__pow__": (operator.pow, False), "__rpow__": (operator.pow, True),
    "__matmul__": (operator.matmul, False), "__rmatmul__": (operator.matmul, True),
}
_SIZES = {"size", "numel"}
#: methods that turn a tensor's values into Python (a branch on them is specialised)
_VALUE_READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__"}


class DynSize(tuple):
    """``x.shape`` as recorded: a tuple of ``Dyn`` sizes (with ``numel`` like ``torch.Size``)."""

    def numel(self) -> int:
        n = 1
        for s in self:
            n *= s
        return n


def _is_tensor_method(func: Any) -> str | None:
    qual = getattr(func, "__qualname__", "") or ""
    if qual.startswith(("TensorBase.", "Tensor.")):
        return qual.split(".", 1)[1]
    return None


class _Mode(TorchFunctionMode):
    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.rec.pending:
            out = self.rec.record_call(func, args, kwargs, out)
        return out


class Recorder:
    """Builds the graph while the forward runs; ``run`` returns (graph, value skeletons)."""

    def __init__(self, model: nn.Module, leaf: Callable[[nn.Module, str], bool],
                 skeleton: Callable[[Any], Any], dyn: Callable[..., int],
                 where: Callable[[Any], tuple[str, int] | None]) -> None:
        self.model = model
        self.graph = torch.fx.Graph()
        self.meta: dict[torch.fx.Node, Any] = {}
        self.nodes: dict[int, torch.fx.Node] = {}  # id(tensor) -> node that produced it
        self.data: set[int] = set()  # ids of tensors computed from the inputs or parameters
        self.alive: list[Any] = []  # keep recorded tensors alive so their ids stay unique
        self.params = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        self.paths = {id(m): n for n, m in model.named_modules()}
        self.leaf = leaf
        self.skeleton = skeleton
        self.dyn = dyn
        self.where = where
        #: one entry per module call being run inside a recorded leaf (None: an inner call);
        #: non-empty means the torch calls seen now belong to that leaf and are not recorded
        self.pending: list[tuple[str, Any] | None] = []
        self.stack: list[str] = []  # paths of the model's modules being run, innermost last
        #: (file, line) where the forward read tensor values into Python (``if y.sum() > 0``)
        self.value_reads: list[tuple[str, int]] = []

    # -- values
    def _node_for(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            node = self.nodes.get(id(v))
            if node is not None:
                return node
            name = self.params.get(id(v))
            if name is not None:
                node = self._add("get_attr", name, (), {}, v)
                self.nodes[id(v)] = node
                return node
            return self.skeleton(v)  # a tensor from outside the recorded calls: a constant
        if isinstance(v, tuple | list):
            mapped = [self._node_for(x) for x in v]
            return tuple(mapped) if isinstance(v, tuple) else mapped
        if isinstance(v, dict):
            return {k: self._node_for(x) for k, x in v.items()}
        return v

    def _bind_outputs(self, node: torch.fx.Node, out: Any) -> None:
        """Tensors inside a tuple/list/dict result get getitem nodes of their own."""
        if isinstance(out, torch.Tensor):
            self.nodes[id(out)] = node
            self.alive.append(out)
        elif isinstance(out, tuple | list | dict):
            items = out.items() if isinstance(out, dict) else enumerate(out)
            for k, v in items:
                if isinstance(v, torch.Tensor | tuple | list | dict):
                    child = self._add("call_function", operator.getitem, (node, k), {}, v)
                    self._bind_outputs(child, v)

    def _where(self) -> tuple[str, int] | None:
        return self.where(sys._getframe(2))

    def _add(self, op: str, target: Any, args: tuple, kwargs: dict, value: Any) -> torch.fx.Node:
        node = self.graph.create_node(op, target, args, kwargs)
        loc = self._where()
        if loc is not None:
            node.meta["surgery_loc"] = loc
        node.meta["surgery_scope"] = self.stack[-1] if self.stack else ""
        self.meta[node] = self.skeleton(value)
        return node

    def _dynamic(self, out: Any, of: Any, dim: Any = None) -> Any:
        """Sizes of tensor ``of``: ``Dyn`` that remember the node and dim they measured."""
        node = self._node_for(of)
        node = node if isinstance(node, torch.fx.Node) else None
        if isinstance(out, torch.Size):
            return DynSize(self.dyn(s, ((node, i),) if node else ()) for i, s in enumerate(out))
        if isinstance(out, int) and not isinstance(out, bool):
            if dim is None:  # numel: every dim
                return self.dyn(out, tuple((node, i) for i in range(of.ndim)) if node else (),
                                (), True)
            return self.dyn(out, ((node, dim % of.ndim),) if node else ())
        return out

    # -- calls
    def record_call(self, func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        method = _is_tensor_method(func)
        if method in _VALUE_READS and isinstance(args[0], torch.Tensor) \
                and id(args[0]) in self.data:
            loc = self._where()
            if loc is not None and loc not in self.value_reads:
                self.value_reads.append(loc)
            return out
        attr = None
        if method is None and getattr(func, "__name__", "") == "__get__":
            attr = getattr(getattr(func, "__self__", None), "__name__", None)
        if attr is not None:  # a tensor property: x.shape, x.ndim, x.dtype, x.T ...
            if attr == "shape":
                out = self._dynamic(out, args[0])
            if not isinstance(out, torch.Tensor):
                return out  # sizes need no node: Dyn carries what the rules need
            node = self._add("call_function", getattr,
                             (self._node_for(args[0]), attr), {}, out)
        elif method in _DUNDER:
            fn, swapped = _DUNDER[method]
            a = tuple(self._node_for(x) for x in args)
            node = self._add("call_function", fn, a[::-1] if swapped else a, {}, out)
        elif method is not None:
            if method in _SIZES:
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                return self._dynamic(out, args[0], dim if method == "size" else None)
            node = self._add("call_method", method, tuple(self._node_for(x) for x in args),
                             self._node_for(kwargs), out)
        else:
            node = self._add("call_function", func, tuple(self._node_for(x) for x in args),
                             self._node_for(kwargs), out)
        self._bind_outputs(node, out)
        if self._reads_data(args) or self._reads_data(kwargs):
            self._mark_data(out)
        return out

    def _reads_data(self, v: Any) -> bool:
        if isinstance(v, torch.Tensor):
            return id(v) in self.data or id(v) in self.params
        if isinstance(v, tuple | list):
            return any(self._reads_data(x) for x in v)
        if isinstance(v, dict):
            return any(self._reads_data(x) for x in v.values())
        return False

    def _mark_data(self, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            self.data.add(id(v))
        elif isinstance(v, tuple | list):
            for x in v:
                self._mark_data(x)
        elif isinstance(v, dict):
            for x in v.values():
                self._mark_data(x)

    def _pre(self, module: nn.Module, args: tuple) -> None:
        path = self.paths.get(id(module))
        if path is not None:
            self.stack.append(path)
        if self.pending:  # inside a leaf: its inner calls are the leaf's business
            self.pending.append(None)
        elif path is not None and self.leaf(module, path):
            self.pending.append((path, self._node_for(args)))

    def _post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
        if id(module) in self.paths and self.stack:
            self.stack.pop()
        if not self.pending:
            return
        entry = self.pending.pop()
        if entry is not None:  # keyword inputs (``self.mha(q, k, v, attn_mask=m)``) too
            node = self._add("call_module", entry[0], tuple(entry[1]), self._node_for(kwargs),
                             out)
            self._bind_outputs(node, out)
            self._mark_data(out)

    def run(self, inputs: Sequence[Any]) -> tuple[torch.fx.Graph, dict[torch.fx.Node, Any]]:
        placeholders = []
        for i, x in enumerate(inputs):
            node = self._add("placeholder", f"input_{i}", (), {}, x)
            self._bind_outputs(node, x)
            self._mark_data(x)
            placeholders.append(node)
        pre = nn.modules.module.register_module_forward_pre_hook(self._pre)
        post = nn.modules.module.register_module_forward_hook(self._post, with_kwargs=True)
        try:
            with torch.no_grad(), _Mode(self):
                out = self.model(*inputs)
        except Exception as e:
            inside = (f" in module '{self.stack[-1]}' "
                      f"({type(self.model.get_submodule(self.stack[-1])).__name__})"
                      if self.stack and self.stack[-1] else "")
            raise ExampleInputError(
                f"{type(self.model).__name__} fails on the example inputs{inside}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check the "
                "shape, dtype and device of example_inputs (they must be what the model's "
                "forward expects).") from e
        finally:
            pre.remove()
            post.remove()
        self.graph.output(self._node_for(out))
        return self.graph, self.meta


def record(model: nn.Module, inputs: Sequence[Any], *, leaf: Callable[[nn.Module, str], bool],
           skeleton: Callable[[Any], Any], dyn: Callable[..., int],
           where: Callable[[Any], tuple[str, int] | None]
           ) -> tuple[torch.fx.Graph, dict[torch.fx.Node, Any], list[tuple[str, int]]]:
    """Run ``model(*inputs)`` once: its recorded graph, every node's skeleton, and where the
    forward read tensor values into Python."""
    rec = Recorder(model, leaf, skeleton, dyn, where)
    graph, meta = rec.run(inputs)
    return graph, meta, rec.value_reads
