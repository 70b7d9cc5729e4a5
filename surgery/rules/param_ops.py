"""Functional ops that read parameters: batch/instance/group norm, conv, linear, prelu, embedding.

A module that computes with torch functions instead of calling a layer (timm's ``BatchNormAct2d``
and ``GroupNorm1``, ``Conv2dSame``, a user's own conv written with ``F.conv2d``) is traced into, and
each of these ops binds the tensors it reads to channels:

- When the tensor's owner has a rule of the same kind (a ``BatchNorm2d`` subclass with a forward of
  its own), the owner's rule runs as if the owner had been called as a leaf: the owner is then
  shrunk by that rule, so its class, forward and size attributes (``num_features``, ``in_channels``,
  ``num_groups`` ...) follow the plan.
- Otherwise each parameter is a raw slot, sliced along its channel dims: a weight's output dim is
  produced channels, its input dim reads channels (zeroed in the verification reference).

A weight computed in forward (weight standardisation) or a grouped functional conv whose owner has
no rule is opaque: its input channels are kept, which is always safe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..groups import TVal
from . import ModuleRule, on_kept_affine, passthrough, register_function_rule
from .context import RuleContext
from .conv import ConvRule, ConvTransposeRule
from .cost import weight_macs
from .functions import bind_args
from .linear import LinearRule
from .norm import BatchNormRule, GroupNormRule, InstanceNormRule
from .pointwise import PReLURule


def _delegate(ctx: RuleContext, p: Any, rule_type: type[ModuleRule], names: tuple[str, ...], x: Any,
              out: Any) -> Any | None:
    """Run the owner's own rule when ``p`` is one of its tensors named ``names``; else None."""
    found = ctx.owner(p)
    if found is None:
        return None
    path, module, rule = found
    if isinstance(rule, rule_type) and p.param.rpartition(".")[2] in names:
        return rule.propagate(ctx, path, module, [x], out)
    return None


def _params(*tensors: Any) -> tuple[list[TVal], bool]:
    """The tensors that are parameters/buffers, and whether any other tensor was given."""
    given = [t for t in tensors if isinstance(t, TVal)]
    return [t for t in given if t.param is not None], any(t.param is None for t in given)


def _per_channel(ctx: RuleContext, x: Any, out: Any, tensors: tuple[Any, ...], op: str) -> Any:
    """``out[:, c] = f(x[:, c], t[c] ...)``: every per-channel tensor is sliced with channel c."""
    if not isinstance(x, TVal) or not isinstance(out, TVal) or x.ndim < 2:
        return ctx.opaque([x, *tensors], out)
    params, computed = _params(*tensors)
    if computed:
        return ctx.opaque([x], out, f"{op} with a per-channel tensor computed in forward")
    atoms = ctx.channels_in(x, 1, x.shape[1])
    for p in params:
        bound = ctx.bind_param(p, 0, atoms)
        if bound is None:
            return ctx.opaque([x], out, f"{op} with the weight '{p.param}' of another layer")
        atoms = bound
    return TVal(out.shape, (1,), atoms)


def _feature_norm(rule_type: type[ModuleRule], op: str) -> Any:
    """F.batch_norm / F.instance_norm: per-channel tensors, or the owner's own norm rule."""
    names = ("running_mean", "running_var", "weight", "bias")

    def rule(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        b = bind_args(args, kwargs, ("input", *names), dict.fromkeys(names))
        tensors = tuple(b[n] for n in names)
        if b["running_mean"] is None and b["running_var"] is None:
            done = _param_statistics(ctx, b["input"], (b["weight"], b["bias"]), out, op)
            if done is not None:
                return done
        for t in tensors:
            done = _delegate(ctx, t, rule_type, names, b["input"], out)
            if done is not None:
                return done
        return _per_channel(ctx, b["input"], out, tensors, op)

    return rule


def _param_statistics(ctx: RuleContext, x: Any, affine: tuple[Any, ...], out: Any, op: str
                      ) -> TVal | None:
    """A parameter normalised along dim 1 over its other dims by its own statistics (weight
    standardisation: ``F.batch_norm(self.weight.reshape(1, out, -1), None, None,
    training=True)``): still the parameter along that dim, its other dims mixed; an affine
    weight (a per-filter gain) is sliced with it. None where ``x`` is not such a parameter."""
    if not isinstance(x, TVal) or x.tracked or x.param is None or x.ndim < 2:
        return None
    real = dict(x.param_dims or ()).get(1)
    if real is None or not isinstance(out, TVal):
        return None
    atoms = ctx.bind_param(x, 1, ctx.uf.new(x.shape[1]))
    if atoms is None:
        return None
    for t in affine:
        if t is not None and not (isinstance(t, TVal) and t.param is not None
                                  and ctx.bind_param(t, 0, atoms) is not None):
            ctx.pin(atoms, f"{op} of a parameter with an affine weight computed in forward "
                           f"{ctx.where()}")
            break
    return TVal(out.shape, param=x.param, param_dims=((1, real),))


def _group_norm(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = bind_args(args, kwargs, ("input", "num_groups", "weight", "bias"),
              {"weight": None, "bias": None})
    x = b["input"]
    for t in (b["weight"], b["bias"]):
        found = ctx.owner(t)
        if (found is not None and isinstance(found[2], GroupNormRule)
                and found[1].num_groups == b["num_groups"]):
            # a GroupNormRule is looked up by its module's class: the owner is a GroupNorm
            return found[2].propagate(ctx, found[0], cast(nn.GroupNorm, found[1]), [x], out)
    if b["num_groups"] == 1:  # one group: no group structure, normalises over every channel
        if not isinstance(x, TVal) or not x.tracked:
            return out
        params, computed = _params(b["weight"], b["bias"])
        if computed or x.tdims != (1,):
            return ctx.opaque([x], out, "group_norm with a computed weight")
        atoms = ctx.record_cross_channel(x.atoms, 1)
        for p in params:
            bound = ctx.bind_param(p, 0, atoms)
            if bound is None:
                return ctx.opaque([x], out, f"group_norm with the weight '{p.param}' of another "
                                            "layer")
            atoms = bound
        return TVal(out.shape, (1,), atoms)
    return ctx.opaque([x], out, f"group_norm with {b['num_groups']} groups written in the call "
                                f"{ctx.where()} (use nn.GroupNorm so the count can change)")


def _owner_rule(ctx: RuleContext, p: TVal) -> ModuleRule | None:
    """The rule of the module owning parameter ``p`` (one it has, ``p.param`` being set)."""
    found = ctx.owner(p)
    assert found is not None  # a parameter always has an owner while the model is traced
    return found[2]


def _raw_weight(ctx: RuleContext, x: Any, w: Any, bias: Any, out: Any, cdim: int, in_dim: int,
                out_dim: int, op: str) -> Any:
    """A weight that is a raw Parameter of a module without a rule: its input dim reads ``x``'s
    channels on ``cdim``, its output dim (and the bias) makes the output's."""
    if not isinstance(w, TVal) or w.param is None or _owner_rule(ctx, w) is not None:
        return ctx.opaque([x, w, bias], out, f"{op} with a weight computed in forward or owned "
                                             "by another layer")
    if ctx.bind_param(w, in_dim, ctx.channels_in(x, cdim, w.shape[in_dim]), reads=True) is None:
        return ctx.opaque([x], out)
    a_out = ctx.bind_param(w, out_dim, ctx.uf.new(w.shape[out_dim]))
    assert a_out is not None  # not expected: the owner has no rule, so this is a raw slot
    if isinstance(bias, TVal) and bias.param is not None:
        a_out = ctx.bind_param(bias, 0, a_out)
        assert a_out is not None  # not expected: a bias read by a ruled layer of its own
    elif isinstance(bias, TVal):
        ctx.pin(a_out, f"{op} with a bias computed in forward {ctx.where()}")
    return TVal(out.shape, (cdim,), a_out)


def _layer_call(ctx: RuleContext, b: dict[str, Any], rule_type: type[ModuleRule], out: Any,
                op: str) -> tuple[Any, Any, Any, Any]:
    """(input, weight, bias) of a functional conv/linear call, and its result already where the
    weight's owner rule takes the call, or where nothing can be followed (else None)."""
    x, w, bias = b["input"], b["weight"], b["bias"]
    done = _derived_weight(ctx, w, rule_type, x, out) if isinstance(w, TVal) and \
        w.param_dims is not None else _delegate(ctx, w, rule_type, ("weight",), x, out)
    if done is not None:
        _call_bias(ctx, w, bias, done, op)
    elif not (isinstance(x, TVal) and isinstance(out, TVal)):
        done = ctx.opaque([x, w, bias], out)
    return x, w, bias, done


def _derived_weight(ctx: RuleContext, w: Any, rule_type: type[ModuleRule], x: Any, out: Any
                    ) -> Any | None:
    """A weight computed in forward from the layer's own (weight standardisation, a mask, a
    gain): its filters are still the layer's outputs, so the layer's rule takes the call. Where
    a filter's entries were not computed one by one (a statistic over each filter), removing an
    input changes the rest of its filter: allowed, not exact."""
    found = ctx.owner(w) if isinstance(w, TVal) and w.param_dims is not None else None
    if found is None or not isinstance(found[2], rule_type) or \
            rule_type not in (ConvRule, LinearRule) or not isinstance(x, TVal) or \
            not isinstance(out, TVal):
        return None
    path, module, rule = found
    assert isinstance(w, TVal) and w.param is not None and w.param_dims is not None
    assert rule is not None  # an instance of rule_type
    weight = getattr(module, "weight", None)
    dims = dict(w.param_dims)
    if w.param.rpartition(".")[2] != "weight" or not isinstance(weight, torch.Tensor) or \
            w.shape != tuple(weight.shape) or dims.get(0) != 0:
        return None
    done = rule.propagate(ctx, path, module, [x], out)
    if any(dims.get(d) != d for d in range(1, w.ndim) if w.shape[d] > 1):
        ctx.record_cross_channel(ctx.out_atoms(path, "in", weight.shape[1] * getattr(
            module, "groups", 1)))
    return done


def _call_bias(ctx: RuleContext, w: TVal, bias: Any, out: Any, op: str) -> None:
    """A bias the call passes with a layer's own weight (``F.linear(x, self.qkv.weight,
    torch.cat((self.q_bias, self.k_bias, self.v_bias)))``) is added to the layer's output
    channels: it is sliced with them, or they stay where it cannot be."""
    if bias is None or not isinstance(out, TVal) or len(out.tdims) != 1:
        return
    owner = ctx.owner(w)
    assert owner is not None and w.param is not None  # the weight's owner took the call
    if isinstance(bias, TVal) and bias.param == (f"{owner[0]}.bias" if owner[0] else "bias"):
        return  # the layer's own bias: its rule slices it
    if isinstance(bias, TVal) and bias.tdims == (0,) and bias.shape == out.atoms.shape:
        ctx.uf.union_arrays(bias.atoms, out.atoms)
        return
    if isinstance(bias, TVal) and bias.param is not None and not bias.tracked and \
            ctx.bind_param(bias, 0, out.atoms) is not None:
        return
    if isinstance(bias, torch.Tensor | TVal):
        ctx.pin(out.atoms, f"{op} with a bias computed in forward {ctx.where()}")


def _conv(transposed: bool) -> Any:
    rule_type = ConvTransposeRule if transposed else ConvRule
    op = "conv_transpose" if transposed else "conv"

    def rule(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        names: tuple[str, ...] = ("input", "weight", "bias", "stride", "padding")
        names += ("output_padding", "groups") if transposed else ("dilation", "groups")
        b = bind_args(args, kwargs, names, {"bias": None, "groups": 1})
        x, w, bias, done = _layer_call(ctx, b, rule_type, out, op)
        if done is not None:
            return done
        if b["groups"] != 1:
            return ctx.opaque([x], out, f"grouped functional {op} (groups={b['groups']}) of a "
                                        "module without a rule")
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        cdim = x.ndim - (len(w.shape) - 2) - 1 if isinstance(w, TVal) else 1
        return _raw_weight(ctx, x, w, bias, out, cdim, in_dim, out_dim, op)

    return rule


def _linear(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = bind_args(args, kwargs, ("input", "weight", "bias"), {"bias": None})
    x, w, bias, done = _layer_call(ctx, b, LinearRule, out, "linear")
    if done is not None:
        return done
    return _raw_weight(ctx, x, w, bias, out, x.ndim - 1, 1, 0, "linear")


def _prelu(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = bind_args(args, kwargs, ("input", "weight"), {})
    x, w = b["input"], b["weight"]
    if isinstance(w, TVal) and w.shape in ((), (1,)):
        return passthrough(ctx, x, out)
    done = _delegate(ctx, w, PReLURule, ("weight",), x, out)
    return done if done is not None else _per_channel(ctx, x, out, (w,), "prelu")


def _embedding(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = bind_args(args, kwargs, ("input", "weight"), {})
    w = b["weight"]
    if not isinstance(out, TVal) or not isinstance(w, TVal) or w.param is None or w.ndim != 2:
        return ctx.opaque([b["input"], w], out)
    atoms = ctx.bind_param(w, 1, ctx.uf.new(w.shape[1]))
    if atoms is None:
        return ctx.opaque([b["input"]], out)
    return TVal(out.shape, (out.ndim - 1,), atoms)


def _functional_macs(in_dim: int, grouped: bool = False) -> Any:
    """:func:`weight_macs` of a functional conv/linear call; ``in_dim``: the weight dim of the
    input channels (of one group where ``grouped``)."""

    def macs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        b = bind_args(args, kwargs, names, {"groups": 1})
        w, groups = b.get("weight"), b["groups"] if grouped else 1
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or not isinstance(groups, int):
            return None
        return weight_macs(b.get("input"), w, w.shape[in_dim] * groups)

    return macs


register_function_rule([F.batch_norm], _feature_norm(BatchNormRule, "batch_norm"),
                       name="batch_norm")
register_function_rule([F.instance_norm], _feature_norm(InstanceNormRule, "instance_norm"),
                       name="instance_norm")
def _group_norm_on_kept(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                       dim: int, keep: torch.Tensor) -> Any:
    """``F.group_norm`` with one group over the kept channels alone."""
    b = bind_args(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"), {})
    if b.get("num_groups") != 1 or dim != 1:
        raise ValueError("only a group_norm over one group runs on the kept channels")
    return on_kept_affine(fn, b.pop("input"), dim, keep, **b)


register_function_rule([F.group_norm], _group_norm, name="group_norm",
                       on_kept=_group_norm_on_kept)
register_function_rule([F.conv1d, F.conv2d, F.conv3d], _conv(False), name="conv",
                       macs=_functional_macs(1, grouped=True))
register_function_rule([F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d],
                       _conv(True), name="conv_transpose", macs=_functional_macs(0))
register_function_rule([F.linear], _linear, name="linear", macs=_functional_macs(1))
register_function_rule([F.prelu], _prelu, name="prelu")
register_function_rule([F.embedding], _embedding, name="embedding")
