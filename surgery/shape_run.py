"""Running a traced graph for the shapes of its values, without the costly arithmetic.

The trace needs every value's shape, not its numbers. A layer or function whose rule says its
output shape follows from its inputs' shapes alone (``shape_only_macs`` of a module or function
rule: convolutions, linear layers) is run on the meta device when the call is costly
(``COSTLY_MACS``): the meta device computes shapes and no arithmetic, and the graph goes on with
zeros of that shape. Ops after it run on those zeros where their output shapes cannot depend on
values (a torch op with no overload tagged as reading values: ``add``, ``cat``, ``view`` …);
any other op that reads a zeroed value (``nonzero``, a boolean mask, ``.item()``, a function
torch does not know) is run on the meta device too, which refuses to read values. A layer
whose rule says its output is shaped as its one input (``keeps_shape``: an activation, an eval
BatchNorm) is not called on zeros: they go on as its output. Where the meta device refuses, or
anything fails, :class:`NeedsValues` tells the caller to run the graph for real.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.overrides import get_overridable_functions
from torch.utils._pytree import tree_flatten, tree_map_only

from .rules import function_rule, leaf_rule

#: Python operators fx records for tensor arithmetic (and ``getattr``, for ``x.shape``): their
#: output shapes follow the operands' shapes
_OPERATORS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.mod, operator.pow, operator.matmul, operator.neg, operator.pos, operator.abs,
    operator.invert, operator.and_, operator.or_, operator.xor, operator.lshift,
    operator.rshift, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
    operator.ge, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
    operator.ior, operator.ixor, getattr,
})
_VALUE_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)
#: a layer call this costly (multiply-adds) is worth taking to the meta device (~50 us here)
COSTLY_MACS = 1_000_000


class NeedsValues(Exception):
    """The graph reads values that the shape run replaced by zeros: run it for real."""


@functools.cache
def torch_functions() -> frozenset[Any]:
    """The torch functions that dispatch ``__torch_function__`` (``torch.*``, ``F.*``, tensor
    methods): fx records each as one op."""
    return frozenset(f for fs in get_overridable_functions().values() for f in fs)


@functools.cache
def _shape_only(name: str) -> bool:
    """Whether torch op ``name`` (e.g. ``"add_"``) has output shapes that follow its inputs'
    shapes alone: an aten op of that name none of whose overloads is tagged as reading values."""
    packet = None
    for candidate in (name, name.rstrip("_")):
        try:
            packet = getattr(torch.ops.aten, candidate)
            break
        except (AttributeError, RuntimeError):
            continue
    if packet is None:
        return False
    return not any(tag in _VALUE_TAGS for o in packet.overloads()
                   for tag in getattr(packet, o).tags)


def _holds_tensor(v: Any) -> bool:
    return any(isinstance(x, torch.Tensor) for x in tree_flatten(v)[0])


def _to_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty_like(v, device="meta")
    if type(v) is tuple and not any(isinstance(x, tuple | list | dict) for x in v):
        return tuple(torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x
                     for x in v)
    return tree_map_only(torch.Tensor, lambda t: torch.empty_like(t, device="meta"), v)


def _zeros(v: Any, device: torch.device) -> Any:
    """Zeros shaped (and strided) like the meta tensors in ``v``, on ``device``."""
    if isinstance(v, torch.Tensor):
        if v.is_contiguous():
            return torch.zeros(v.shape, dtype=v.dtype, device=device)
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device).zero_()
    return tree_map_only(torch.Tensor, lambda t: _zeros(t, device), v)


def _device(args: Any) -> torch.device:
    return next((x.device for x in tree_flatten(args)[0] if isinstance(x, torch.Tensor)),
                torch.device("cpu"))


def _on_meta(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """``fn`` on meta copies of the tensor arguments; its tensor results as zeros on the
    arguments' device. A value read (or any failure) raises :class:`NeedsValues`."""
    device = _device((args, kwargs))
    try:
        out = fn(*_to_meta(args), **(_to_meta(kwargs) if kwargs else {}))
    except Exception as e:
        raise NeedsValues(f"{getattr(fn, '__name__', fn)} reads values: {e}") from e
    return _zeros(out, device)


@contextlib.contextmanager
def _state_on_meta(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters and buffers as meta tensors for the duration (then its own
    again): a call computes shapes only. Cheaper than ``torch.func.functional_call``."""
    saved: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (table, dict(table)) for m in module.modules() for table in (m._parameters, m._buffers)
        if table]
    try:
        for table, own in saved:
            for name, t in own.items():
                if t is not None:
                    table[name] = torch.empty_like(t, device="meta")
        yield
    finally:
        for table, own in saved:
            table.update(own)


def hooked(model: nn.Module) -> bool:
    """Whether forward hooks watch ``model``'s layers: they must see real values."""
    registry = nn.modules.module
    if getattr(registry, "_global_forward_hooks", None) or \
            getattr(registry, "_global_forward_pre_hooks", None):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class ShapeRun(torch.fx.Interpreter):
    """An fx Interpreter that, with ``cheap``, runs costly layers on the meta device and goes on
    with zeros (see the module docstring); without it, a plain Interpreter."""

    def __init__(self, module: nn.Module, graph: torch.fx.Graph | None = None, *,
                 cheap: bool = False) -> None:
        super().__init__(module, graph=graph)
        self.cheap = cheap
        self.zeroed: set[torch.fx.Node] = set()  # nodes whose value is zeros, not computed
        self._reads_zeros = False  # the node being run reads a zeroed value
        self._zeros_out = False

    def fetch_attr(self, target: str) -> Any:
        """A layer from the table the Interpreter builds anyway (its own lookup walks the path
        with ``hasattr``/``getattr``: a tenth of the run on a mobile net)."""
        found = self.submodules.get(target)
        if found is not None:
            return found
        owner, _, name = target.rpartition(".")
        module = self.submodules.get(owner)
        if module is not None and (name in module._parameters or name in module._buffers):
            return getattr(module, name)
        return super().fetch_attr(target)

    def run_node(self, n: torch.fx.Node) -> Any:
        if not self.cheap:
            return super().run_node(n)
        self._reads_zeros = self._zeros_out = not self.zeroed.isdisjoint(n.all_input_nodes)
        result = super().run_node(n)
        if self._zeros_out:
            self.zeroed.add(n)
        return result

    def call_module(self, target: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if not self.cheap:
            return super().call_module(target, args, kwargs)
        module = self.fetch_attr(target)
        rule = leaf_rule(module)
        macs = rule.shape_only_macs(module, list(args)) if rule is not None else None
        if macs is not None and macs >= COSTLY_MACS:
            self._zeros_out = True
            with _state_on_meta(module):
                return _on_meta(module, args, kwargs)
        if self._reads_zeros and rule is not None and len(args) == 1 and not kwargs and \
                isinstance(args[0], torch.Tensor) and rule.keeps_shape(module, args[0]):
            return args[0]  # zeros in, a stand-in shaped alike out: the zeros themselves
        if self._reads_zeros and rule is None and \
                not type(module).__module__.startswith("torch.nn"):
            raise NeedsValues(f"opaque module '{target}' reads zeroed values")
        return module(*args, **kwargs)

    def call_function(self, target: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if not self.cheap:
            return super().call_function(target, args, kwargs)
        rule = function_rule(target)
        macs = rule.shape_only_macs(args, kwargs) if rule is not None else None
        if macs is not None and macs >= COSTLY_MACS:  # F.conv2d with a computed weight ...
            self._zeros_out = True
            return _on_meta(target, args, kwargs)
        if self._reads_zeros and not self._shapes_follow(target, args, kwargs):
            return _on_meta(target, args, kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self.cheap and self._reads_zeros and not (
                hasattr(torch.Tensor, target) and _shape_only(target)):
            return _on_meta(lambda obj, *a, **k: getattr(obj, target)(*a, **k), args, kwargs)
        return super().call_method(target, args, kwargs)

    @staticmethod
    def _shapes_follow(target: Any, args: tuple, kwargs: dict[str, Any]) -> bool:
        if target is operator.getitem:  # a tensor index (a mask) may select by value
            return not _holds_tensor(args[1:])
        try:
            if target in _OPERATORS:
                return True
            return target in torch_functions() and _shape_only(getattr(target, "__name__", ""))
        except TypeError:  # an unhashable callable: not a torch op
            return False
