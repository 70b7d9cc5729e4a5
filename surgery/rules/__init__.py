"""Per-op knowledge, in one place per op: how channels pass through it, how it is scored, shrunk.

Two registries: module rules keyed by ``nn.Module`` class (looked up along the MRO) and function
rules keyed by the fx call target (``torch.cat``, ``operator.add``) or method name (``"view"``).
The tracer, the criteria, the surgeon and the verifier all read these tables and nothing else.
Adding support for a layer is one ``register_module_rule`` call. Rules program against
:class:`RuleContext` (``surgery/rules/context.py``), a typed protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import torch
from torch import nn

from ..copies import shallow_copy as clone_module
from ..groups import TVal
from .context import RuleContext

if TYPE_CHECKING:
    from .cost import CostRule

__all__ = [
    "FunctionRule",
    "ModuleRule",
    "OnKept",
    "RuleContext",
    "clone_module",
    "function_rule",
    "leaf_rule",
    "module_rule",
    "module_rules",
    "on_kept_affine",
    "register_function_rule",
    "register_module_rule",
    "scattered",
]

#: the module class a rule handles (``ModuleRule[nn.Linear]``); a bare ``ModuleRule`` takes any
M = TypeVar("M", bound=nn.Module)


class ModuleRule(Generic[M]):
    """How one family of leaf modules passes, couples, scores and loses channels.

    Subclasses set ``types`` (the classes it covers, subclasses included) and ``axes`` (the names
    of the module's channel axes, e.g. ``("in", "out")``) and implement:

    - ``propagate(ctx, path, module, inputs, out)``: read the inputs' channels from ``inputs``
      (``TVal``), tie them to the module's axes with ``ctx.slot``, return the output ``TVal``;
    - ``shrink(module, keep)``: a copy keeping only ``keep[axis]`` positions (same class, with its
      size attributes updated; ``clone_module`` and ``set_tensor`` help);
    - ``importance(module, axis)``: the weights of each position along dim 0 (for the criteria);
    - ``zero_removed(module, axis, idx)``: zero what reads removed input positions (the
      verification reference).
    """

    types: tuple[type[nn.Module], ...] = ()
    axes: tuple[str, ...] = ()
    cross_channel: bool = False
    #: a normalisation layer whose weight is a per-channel scale (read by the bn_scale criterion)
    is_norm: bool = False
    #: parameter name -> (axis, dim) or a tuple of them: where the rule's axes sit in each tensor,
    #: so a functional op that reads the tensor directly (an owner traced through rather than
    #: called as a leaf) binds the owner's axis, and the owner is shrunk by this rule
    param_axes: dict[str, Any] = {}
    #: the layer's cost model (a ``surgery.rules.cost.CostRule``: MACs at given widths and a
    #: one-layer runner per runtime), read by latency-aware allocation; None: not modelled
    cost: CostRule | None = None
    #: how many of the layer's leading outputs verification compares inside the model (None:
    #: all); e.g. attention weights averaged over heads change when heads go, and are checked
    #: only where the model uses them (then the rule keeps the heads)
    compared_outputs: int | None = None
    #: the parameters and buffers ``shrink`` slices; another one a subclass adds (timm's
    #: ``ScaledStdConv2d.gain``) is sliced as a raw tensor where the forward reads it. None: every
    #: tensor of the module is the rule's own
    own_tensors: tuple[str, ...] | None = None

    def param_axis(self, name: str, dim: int) -> str | None:
        """The axis that parameter ``name``'s dim ``dim`` belongs to, if the rule says."""
        entry = self.param_axes.get(name)
        if entry is None:
            return None
        pairs = (entry,) if isinstance(entry[0], str) else entry
        return next((axis for axis, d in pairs if d == dim), None)

    def propagate(self, ctx: RuleContext, path: str, module: M, inputs: list[Any],
                  out: Any) -> Any:
        raise NotImplementedError

    def shrink(self, module: M, keep: dict[str, torch.Tensor]) -> nn.Module:
        raise NotImplementedError

    def importance(self, module: M, axis: str) -> torch.Tensor | None:
        """Weights of every position along ``axis``, one position per index of dim 0 (a 2-D
        tensor of rows, or any view whose other dims hold the position's weights: no copy
        needed for a layer's input columns); None: no weights. By default :meth:`weight_rows`."""
        return self.weight_rows(module, axis)

    def weight_rows(self, module: M, axis: str, weight: torch.Tensor | None = None
                    ) -> torch.Tensor | None:
        """A tensor shaped like the layer's main weight (default: the weight itself) as one row
        per position along ``axis``; None where the layer has no such weight. Read by the
        criteria (through ``importance``), by :func:`surgery.from_masks` (which output channels a
        pruning mask zeroed) and by :mod:`surgery.sparse` (which layers have weights to zero)."""
        return None

    def bias_of_removed_inputs(self, module: M, x: torch.Tensor, gone: torch.Tensor
                               ) -> torch.Tensor | None:
        """What constant input channels ``gone`` (their median in the layer's input ``x``) add
        to every output: folded into the bias when they are removed. None: not foldable."""
        return None

    def zero_removed(self, module: M, axis: str, idx: torch.Tensor) -> None:
        """Zero the weights that read the removed input positions (the equivalence reference)."""

    def shape_only_macs(self, module: M, inputs: list[Any]) -> float | None:
        """Where the layer's output shape follows from its inputs' shapes alone: roughly the
        multiply-adds of a call on ``inputs`` (its tensor arguments). The trace takes a costly
        call's output shape from the meta device (no arithmetic) and goes on with zeros
        (:mod:`surgery.shape_run`). None (default): the trace runs the layer."""
        return None

    def keeps_shape(self, module: M, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` alone returns one tensor of ``x``'s shape, dtype, device and
        layout, whatever the values (and fails on none of them): the trace's shape run hands a
        stand-in of zeros on without calling the layer (:mod:`surgery.shape_run`). Default
        False: the trace runs the layer."""
        return False

    def on_kept(self, module: M, x: torch.Tensor, dim: int, keep: torch.Tensor
                ) -> torch.Tensor | None:
        """The layer run on the channels ``keep`` of its input ``x`` (along ``dim``) alone, as
        the pruned layer computes them, the output scattered back into zeros at full width:
        where a cross-channel layer (LayerNorm over C) recorded its site with
        ``ctx.record_cross_channel(atoms, dim)``, the verification reference runs this instead,
        so the pruned model is still compared by value. None (default): it cannot."""
        return None

    def input_dims(self, module: M) -> dict[str, int] | None:
        """Where zeroing the layer's input does what :meth:`zero_removed` does: axis -> the dim
        of the first input that holds its positions (every axis not named reads nothing). The
        verification reference then zeroes those input positions and shares the weights instead
        of copying and zeroing them. None (default): it copies the layer and zeroes weights."""
        return None


def runs_own_forward(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """Whether ``module`` runs the forward of one of ``types`` unchanged (a subclass that
    overrides ``forward`` may read its input differently)."""
    return any(type(module).forward is t.forward for t in types)


#: ``on_kept(fn, args, kwargs, dim, keep)``: the call ``fn(*args, **kwargs)`` made on the channels
#: ``keep`` (along ``dim`` of its first input) alone, as the pruned model makes it; an output that
#: keeps that dim is scattered back into zeros at full width. A cross-channel op (a statistic over
#: the channels) that recorded its site with ``ctx.record_cross_channel(atoms, dim)`` runs so in
#: the verification reference, and the pruned model is still compared by value.
OnKept = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any], int, torch.Tensor], Any]


class FunctionRule:
    """How a function / tensor method passes channels. ``propagate`` returns the output value,
    or ``NotImplemented`` to decline (the call is then treated as an op without a rule: its
    inputs are pinned, and a layer's parameter read by it is refused, naming the layer).
    ``on_kept``: see :data:`OnKept`."""

    def __init__(self, fn: Callable[..., Any], name: str,
                 macs: Callable[[tuple[Any, ...], dict[str, Any]], float | None] | None = None,
                 on_kept: OnKept | None = None) -> None:
        self.fn = fn
        self.name = name
        self.macs = macs
        self.on_kept = on_kept

    def propagate(self, ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any],
                  out: Any) -> Any:
        return self.fn(ctx, args, kwargs, out)

    def shape_only_macs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        """As :meth:`ModuleRule.shape_only_macs`, for a call with these (real) arguments."""
        return self.macs(args, kwargs) if self.macs is not None else None

    def __repr__(self) -> str:
        return f"FunctionRule({self.name})"


_MODULE_RULES: dict[type, ModuleRule] = {}
_FUNCTION_RULES: dict[Any, FunctionRule] = {}


def register_module_rule(rule: ModuleRule, *, replace: bool = False) -> ModuleRule:
    """Register ``rule`` for every class in ``rule.types``; raises on duplicates unless replace."""
    for t in rule.types:
        if t in _MODULE_RULES and not replace:
            raise ValueError(f"a module rule for {t.__qualname__} is already registered "
                             f"({type(_MODULE_RULES[t]).__name__}); pass replace=True to override")
        _MODULE_RULES[t] = rule
    return rule


def register_function_rule(targets: Iterable[Any], fn: Callable[..., Any], *, name: str = "",
                           replace: bool = False,
                           macs: Callable[[tuple[Any, ...], dict[str, Any]], float | None]
                           | None = None, on_kept: OnKept | None = None) -> FunctionRule:
    """Register ``fn(ctx, args, kwargs, out)`` for fx call targets (callables or method names).
    ``macs(args, kwargs)``: where the output shape follows from the input shapes alone, the
    multiply-adds of a call (see :meth:`FunctionRule.shape_only_macs`); ``on_kept``: the call on
    the kept channels alone, for verification (see :data:`OnKept`)."""
    rule = FunctionRule(fn, name or getattr(fn, "__name__", "rule"), macs, on_kept)
    for t in dict.fromkeys(targets):  # aliases (F.relu_ is torch.relu_) collapse
        if t in _FUNCTION_RULES and not replace:
            raise ValueError(f"a function rule for {t!r} is already registered")
        _FUNCTION_RULES[t] = rule
    return rule


def module_rules() -> dict[type, ModuleRule]:
    """Every registered module rule by the class it was registered for (a copy)."""
    return dict(_MODULE_RULES)


def module_rule(module: nn.Module | type) -> ModuleRule | None:
    """The rule for a module (or class), found along its MRO."""
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        rule = _MODULE_RULES.get(base)
        if rule is not None:
            return rule
    return None


def leaf_rule(module: nn.Module) -> ModuleRule | None:
    """The rule to use when ``module`` is called as a leaf, or None to trace into it.

    A subclass that overrides ``forward`` (e.g. torchvision's channels-first ``LayerNorm2d``) is
    traced into instead: its forward may move the channels somewhere the base rule does not expect.
    """
    cls = type(module)
    for base in cls.__mro__:
        rule = _MODULE_RULES.get(base)
        if rule is not None:
            # a registered class is a module class (``rule.types``)
            return rule if cls.forward is cast("type[nn.Module]", base).forward else None
    return None


def function_rule(target: Any) -> FunctionRule | None:
    try:
        return _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None


def take_rows_cols(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``w[rows][:, cols]`` as a new tensor: two ``index_select`` on a small weight (half the
    time of a gather), one gather on a large one (a third less time than the selects)."""
    if w.numel() < 1 << 18:
        return w.index_select(0, rows).index_select(1, cols)
    return w[rows[:, None], cols[None, :]]


def set_tensor(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Replace a parameter or buffer (with a tensor of its own), keeping requires_grad."""
    if value is None:
        return
    old = module._parameters.get(name) if name in module._parameters else None
    if name in module._parameters and old is not None:
        module._parameters[name] = nn.Parameter(value.detach(), requires_grad=old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value.detach()
    else:
        raise AttributeError(f"{type(module).__name__} has no parameter or buffer {name!r}")


def scattered(x: torch.Tensor, dim: int, keep: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` (computed on the positions ``keep`` of ``x`` along ``dim``) at those positions of a
    tensor shaped like ``x``, zeros elsewhere (an ``on_kept`` result at full width)."""
    out = y.new_zeros(x.shape)
    return out.index_copy(dim, keep, y)


def on_kept_affine(fn: Callable[..., Any], x: torch.Tensor, dim: int, keep: torch.Tensor,
                   **args: Any) -> torch.Tensor:
    """``fn(x, **args)`` (a norm with a per-channel ``weight``/``bias``) on the channels ``keep``
    of ``x`` alone, with those entries of the weight and bias, scattered back to full width."""
    for name in ("weight", "bias"):
        if isinstance(args.get(name), torch.Tensor):
            args[name] = args[name].index_select(0, keep)
    return scattered(x, dim, keep, fn(x.index_select(dim, keep), **args))


def passthrough(ctx: RuleContext, x: Any, out: Any) -> Any:
    """Output keeps the input's channel atoms when its channel dims are unchanged; else pin."""
    if not isinstance(x, TVal) or not isinstance(out, TVal):
        return ctx.opaque([x], out)
    if not x.tracked:
        return out
    if out.ndim == x.ndim and all(out.shape[d] == x.shape[d] for d in x.tdims):
        return TVal(out.shape, x.tdims, x.atoms)
    return ctx.opaque([x], out, "changes the channel dims")


from . import attention, conv, functions, linear, norm, param_ops, pointwise, recurrent  # noqa: E402,F401,I001,E501
