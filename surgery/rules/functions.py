"""Function and tensor-method rules: how channels pass through parameter-free ops.

Each rule receives the tracer context, the call's arguments (tensors as ``TVal``) and the output's
shape skeleton, and returns the output with its channel atoms. Any op without a rule is opaque:
its tensor inputs are pinned (their channels stay), which is always safe.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from ..groups import TVal
from . import passthrough, register_function_rule
from .context import RuleContext


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any], names: Sequence[str],
          defaults: dict[str, Any]) -> dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


# --- unary, channel-preserving --------------------------------------------------------------------

def _unary(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    return passthrough(ctx, args[0], out)


_UNARY_FUNCS = [
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.sigmoid, torch.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu,
    F.celu, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, F.interpolate, F.upsample, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.pad, torch.clamp, torch.clip, torch.abs, torch.neg, torch.exp,
    torch.sqrt, torch.square, operator.neg, torchvision.ops.stochastic_depth,
    torchvision.ops.drop_block2d, torchvision.ops.drop_block3d,
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type", "abs",
    "neg", "exp", "sqrt", "square", "expand", "expand_as", "hardtanh_",
]
register_function_rule(_UNARY_FUNCS + _UNARY_METHODS, _unary, name="unary")


# --- elementwise with broadcasting ----------------------------------------------------------------

def broadcast(ctx: RuleContext, operands: Sequence[Any], out: Any) -> Any:
    """Align operands from the right; tracked channel dims must match (their units are coupled)."""
    vals = [v for v in operands if isinstance(v, TVal)]
    tracked = [v for v in vals if v.tracked]
    if not tracked or not isinstance(out, TVal):
        return ctx.opaque(tracked, out) if tracked else out
    r = out.ndim
    ref = tracked[0]
    tdims = tuple(d + r - ref.ndim for d in ref.tdims)
    atoms = ref.atoms
    for v in vals:
        if v is ref:
            continue
        off = r - v.ndim
        if v.tracked:
            if tuple(d + off for d in v.tdims) == tdims and v.atoms.shape == atoms.shape:
                ctx.uf.union_arrays(atoms, v.atoms)
                continue
            return ctx.opaque(tracked, out, "combines tensors whose channels sit on other dims")
        sizes = [v.shape[d - off] if d - off >= 0 else 1 for d in tdims]
        if all(s == 1 for s in sizes):
            continue
        if v.param is not None and len(tdims) == 1:
            bound = ctx.bind_param(v, tdims[0] - off, atoms)
            if bound is None:
                return ctx.opaque(tracked, out, f"uses the weight '{v.param}' of another layer")
            atoms = bound
            continue
        return ctx.opaque(tracked, out, "combines channels with a constant of full channel size")
    return TVal(out.shape, tdims, atoms)


def _binary(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    operands = list(args[:2]) + [v for k, v in kwargs.items() if k == "other"]
    return broadcast(ctx, operands, out)


_BINARY = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum, torch.pow, operator.pow,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow",
]
register_function_rule(_BINARY, _binary, name="broadcast")


# --- concatenation and splitting ------------------------------------------------------------------

def _cat(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = _bind(args, kwargs, ("tensors", "dim"), {"dim": 0})
    vals = list(b["tensors"])
    dim = b["dim"] % out.ndim
    tracked = [v for v in vals if isinstance(v, TVal) and v.tracked]
    if not tracked:
        return out
    if all(v.tdims == (dim,) for v in tracked):
        parts = [v.atoms if v.tracked else ctx.pinned_atoms(v.shape[dim], "a constant in a cat")
                 for v in vals]
        return TVal(out.shape, (dim,), np.concatenate(parts))
    if len(tracked) == len(vals) and dim not in tracked[0].tdims:
        return broadcast(ctx, vals, out)  # cat along another dim: channels shared position-wise
    return ctx.opaque(tracked, out, "cat along a dim that mixes channel layouts")


def _pieces(ctx: RuleContext, x: Any, dim: int, out: Any, equal_at_runtime: bool, why: str) -> Any:
    if not isinstance(x, TVal) or not x.tracked:
        return out
    dim %= x.ndim
    if dim not in x.tdims:
        return tuple(TVal(o.shape, x.tdims, x.atoms) for o in out)
    sizes = {o.shape[dim] for o in out}
    if x.tdims != (dim,) or not equal_at_runtime or len(sizes) != 1:
        return ctx.opaque([x], out, why)
    pieces = np.split(x.atoms, len(out))
    for p in pieces[1:]:  # equal pieces stay equal: position j of every piece is one unit
        ctx.uf.union_arrays(pieces[0], p)
    return tuple(TVal(o.shape, (dim,), p) for o, p in zip(out, pieces, strict=True))


def _chunk(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = _bind(args, kwargs, ("input", "chunks", "dim"), {"dim": 0})
    return _pieces(ctx, b["input"], b["dim"], out, True, "chunk into uneven pieces")


def _split(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = _bind(args, kwargs, ("tensor", "split_size_or_sections", "dim"), {"dim": 0})
    size = b.get("split_size_or_sections", b.get("split_size"))
    # a size computed in forward (e.g. x.size(1) // 2) follows the pruned width; a literal does not
    computed = ctx.is_computed(size)
    return _pieces(ctx, b["tensor"], b["dim"], out, computed,
                   f"split with hard-coded sizes {size!r} {ctx.where()}")


def _stack(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """A new dim at ``dim``: channels stay where they were (shifted), shared position-wise."""
    b = _bind(args, kwargs, ("tensors", "dim"), {"dim": 0})
    vals = list(b["tensors"])
    tracked = [v for v in vals if isinstance(v, TVal) and v.tracked]
    if not tracked or not isinstance(out, TVal):
        return out
    dim = b["dim"] % out.ndim
    ref = tracked[0]
    if len(tracked) != len(vals) or any(v.tdims != ref.tdims or v.atoms.shape != ref.atoms.shape
                                        for v in tracked):
        return ctx.opaque(tracked, out, "stacks tensors whose channels differ")
    for v in tracked[1:]:
        ctx.uf.union_arrays(ref.atoms, v.atoms)
    return TVal(out.shape, tuple(t + (t >= dim) for t in ref.tdims), ref.atoms)


def _unbind(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = _bind(args, kwargs, ("input", "dim"), {"dim": 0})
    x = b["input"]
    if not isinstance(x, TVal) or not x.tracked:
        return out
    dim = b["dim"] % x.ndim
    if dim in x.tdims:
        return ctx.opaque([x], out, "unbinds the channel dim")
    return tuple(TVal(o.shape, tuple(t - (t > dim) for t in x.tdims), x.atoms) for o in out)


register_function_rule([torch.cat, torch.concat, torch.concatenate], _cat, name="cat")
register_function_rule([torch.stack], _stack, name="stack")
register_function_rule([torch.unbind, "unbind"], _unbind, name="unbind")
register_function_rule([torch.chunk, "chunk"], _chunk, name="chunk")
register_function_rule([torch.split, "split"], _split, name="split")


def _getitem(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    obj, idx = args
    if isinstance(obj, tuple | list):
        return obj[idx]
    if not isinstance(obj, TVal) or not obj.tracked:
        return out
    idx = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    mapping: dict[int, int] = {}  # input dim -> output dim
    d_in = d_out = 0
    for i in idx:
        if i is Ellipsis:
            skip = obj.ndim - n_real
            for _ in range(skip):
                mapping[d_in] = d_out
                d_in, d_out = d_in + 1, d_out + 1
        elif i is None:
            d_out += 1
        elif isinstance(i, slice) and i == slice(None):
            mapping[d_in] = d_out
            d_in, d_out = d_in + 1, d_out + 1
        elif isinstance(i, slice):
            if d_in in obj.tdims:
                return ctx.opaque([obj], out, "slices the channel dim")
            mapping[d_in] = d_out
            d_in, d_out = d_in + 1, d_out + 1
        elif isinstance(i, int) and d_in not in obj.tdims:
            d_in += 1
        else:
            return ctx.opaque([obj], out, "indexes the channel dim")
    for rest in range(d_in, obj.ndim):
        mapping[rest] = d_out + rest - d_in
    return TVal(out.shape, tuple(mapping[d] for d in obj.tdims), obj.atoms)


register_function_rule([operator.getitem], _getitem, name="getitem")


# --- layout: reshape, flatten, permute ------------------------------------------------------------

def _blocks(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Split a reshape into blocks of input dims and output dims with equal products."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        ins: list[int] = []
        outs: list[int] = []
        pa = pb = 1
        if i < len(a):
            ins.append(i)
            pa, i = a[i], i + 1
        if j < len(b):
            outs.append(j)
            pb, j = b[j], j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ins.append(i)
                pa, i = pa * a[i], i + 1
            elif pb < pa and j < len(b):
                outs.append(j)
                pb, j = pb * b[j], j + 1
            else:
                return None
        blocks.append((ins, outs))
    return blocks


def reshape(ctx: RuleContext, x: Any, out: Any, literal: Sequence[bool] | None, op: str) -> Any:
    """Channels through a reshape. ``literal[k]``: out dim k was written as a constant in forward.

    Channels may spread over several output dims (a channel shuffle views C as (g, C/g)). An output
    dim of constant size that carries channels stays that size after pruning only if the pruning
    removes whole slices along the other dims, so its positions are coupled; if every channel
    dim is a constant the size is hard-coded and the channels are pinned.
    """
    if not isinstance(x, TVal) or not x.tracked:
        return out
    blocks = _blocks(x.shape, out.shape)
    hit = [k for k, (ins, _) in enumerate(blocks or []) if set(ins) & set(x.tdims)]
    if not blocks or not hit:
        return ctx.opaque([x], out, f"{op} that cannot be followed")
    ins = [d for ins_, _ in blocks[hit[0]:hit[-1] + 1] for d in ins_]
    outs = [d for _, outs_ in blocks[hit[0]:hit[-1] + 1] for d in outs_]
    expand = [x.shape[d] if d in x.tdims else 1 for d in ins]
    # atoms' axes follow tdims in ascending order, as do the tracked dims within ``ins``
    grid = np.broadcast_to(x.atoms.reshape(expand),
                           [x.shape[d] for d in ins]).reshape([out.shape[d] for d in outs])
    vary = [k for k in range(grid.ndim)
            if grid.shape[k] > 1 and not (grid == grid.take([0], axis=k)).all()]
    sel = tuple(slice(None) if k in vary else slice(0, 1) for k in range(grid.ndim))
    atoms = np.ascontiguousarray(grid[sel].reshape([grid.shape[k] for k in vary]))
    if literal is not None:
        fixed = [pos for pos, k in enumerate(vary) if literal[outs[k]]]
        if fixed and len(fixed) == len(vary):
            sizes = tuple(out.shape[outs[k]] for k in vary)
            return ctx.opaque([x], out, f"hard-coded size {sizes} in {op} {ctx.where()}; write "
                                        "the size from x.size()/-1 to let surgery prune it")
        for pos in fixed:
            first = np.take(atoms, 0, axis=pos)
            for j in range(1, atoms.shape[pos]):
                ctx.uf.union_arrays(first, np.take(atoms, j, axis=pos))
    return TVal(out.shape, tuple(outs[k] for k in vary), atoms)


def _sizes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], tuple | list) else args


def _view(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    sizes = _sizes(args[1:]) if args[1:] else _sizes((kwargs.get("shape", kwargs.get("size")),))
    literal = [isinstance(s, int) and not ctx.is_computed(s) and s != -1 for s in sizes]
    return reshape(ctx, args[0], out, literal if len(literal) == out.ndim else None, "view/reshape")


def _flatten(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    return reshape(ctx, args[0], out, None, "flatten")


def _permute(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    x = args[0]
    dims = _sizes(args[1:]) if args[1:] else tuple(kwargs["dims"])
    return permute(x, [d % x.ndim for d in dims], out)


def permute(x: Any, dims: Sequence[int], out: Any) -> Any:
    if not isinstance(x, TVal) or not x.tracked:
        return out
    new_t = [i for i, d in enumerate(dims) if d in x.tdims]
    order = [x.tdims.index(dims[i]) for i in new_t]
    return TVal(out.shape, tuple(new_t), np.ascontiguousarray(x.atoms.transpose(order)))


def _transpose(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = _bind(args, kwargs, ("input", "dim0", "dim1"), {})
    x = b["input"]
    dims = list(range(x.ndim))
    d0, d1 = b["dim0"] % x.ndim, b["dim1"] % x.ndim
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return permute(x, dims, out)


register_function_rule(["view", "reshape", torch.reshape], _view, name="view")
register_function_rule([torch.flatten, "flatten", "squeeze", "unsqueeze", torch.squeeze,
                        torch.unsqueeze], _flatten, name="flatten")
register_function_rule([torch.permute, "permute"], _permute, name="permute")
register_function_rule([torch.transpose, "transpose"], _transpose, name="transpose")


# --- reductions and channel-wise normalisations ---------------------------------------------------

def _reduce(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = _bind(args, kwargs, ("input", "dim", "keepdim"), {"dim": None, "keepdim": False})
    x, dim = b["input"], b["dim"]
    if not isinstance(x, TVal) or not x.tracked:
        return out
    if dim is None or not isinstance(out, TVal):
        return ctx.opaque([x], out, "reduces over every dim")
    dims = {d % x.ndim for d in (dim if isinstance(dim, tuple | list) else (dim,))}
    if dims & set(x.tdims):
        return ctx.opaque([x], out, "reduces over channels")
    shift = 0 if b["keepdim"] else 1
    return TVal(out.shape, tuple(t - shift * sum(d < t for d in dims) for t in x.tdims), x.atoms)


register_function_rule([torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax",
                        "amin"], _reduce, name="reduce")


def _softmax(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = _bind(args, kwargs, ("input", "dim"), {"dim": None})
    x = b["input"]
    if isinstance(x, TVal) and x.tracked and (b["dim"] is None or b["dim"] % x.ndim in x.tdims):
        return ctx.opaque([x], out, "softmax over channels")
    return passthrough(ctx, x, out)


register_function_rule([F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax",
                        "log_softmax"], _softmax, name="softmax")


def _layer_norm(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
              {"weight": None, "bias": None})
    x, n = b["input"], len(b["normalized_shape"])
    if not isinstance(x, TVal) or not x.tracked:
        return out
    if max(x.tdims) < x.ndim - n:
        return passthrough(ctx, x, out)
    params = [p for p in (b["weight"], b["bias"]) if isinstance(p, TVal)]
    if n != 1 or x.tdims != (x.ndim - 1,) or any(p.param is None for p in params):
        return ctx.opaque([x], out, "layer_norm over channels with other dims")
    atoms = ctx.record_cross_channel(x.atoms)
    for p in params:
        bound = ctx.bind_param(p, 0, atoms, cross_channel=True)
        if bound is None:
            return ctx.opaque([x], out, f"layer_norm with the weight '{p.param}' of another layer")
        atoms = bound
    return TVal(out.shape, x.tdims, atoms)


register_function_rule([F.layer_norm], _layer_norm, name="layer_norm")
