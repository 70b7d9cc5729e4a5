"""Function and tensor-method rules: how channels pass through parameter-free ops.

Each rule receives the tracer context, the call's arguments (tensors as ``TVal``) and the output's
shape skeleton, and returns the output with its channel atoms. Any op without a rule is opaque:
its tensor inputs are pinned (their channels stay), which is always safe.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from ..groups import TVal
from ..sizes import AttrInt, Dyn
from . import OnKept, on_kept_affine, passthrough, register_function_rule, scattered
from .context import RuleContext


def bind_args(args: tuple[Any, ...], kwargs: dict[str, Any], names: Sequence[str],
              defaults: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by parameter name (positional ones named by ``names``)."""
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


def _roll(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """``torch.roll``: positions move along ``dims`` only (a cyclic window shift over height and
    width); along a channel dim (or with no dims: the flattened tensor) they reorder channels."""
    b = bind_args(args, kwargs, ("input", "shifts", "dims"), {"dims": None})
    x, dims = b["input"], b["dims"]
    if not isinstance(x, TVal) or not x.tracked:
        return out
    dims = tuple(range(x.ndim)) if dims is None else \
        tuple(dims) if isinstance(dims, tuple | list) else (dims,)
    if {d % x.ndim for d in dims} & set(x.tdims):
        return ctx.opaque([x], out, "moves positions along a channel dim")
    return passthrough(ctx, x, out)


register_function_rule([torch.roll, "roll"], _roll, name="roll")


def _new_tensor(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any],
                out: Any) -> Any:
    """``x.new_zeros(size)``: only x's dtype and device pass; the sizes given must stay."""
    ctx.hold([a for a in (*args[1:2], kwargs.get("size")) if a is not None])
    return out


register_function_rule(["new_zeros", "new_ones", "new_empty", "new_full"], _new_tensor,
                       name="new_tensor")


# --- elementwise with broadcasting ----------------------------------------------------------------

def broadcast(ctx: RuleContext, operands: Sequence[Any], out: Any) -> Any:
    """Align operands from the right; channels meeting at one position are one unit.

    Tracked operands may carry channels on different dims (attention weights per head times
    values per head and width): the output carries the union, and each operand's channels are
    coupled with every position they meet. A constant of full size on a channel dim pins.
    """
    vals = [v for v in operands if isinstance(v, TVal)]
    tracked = sorted((v for v in vals if v.tracked), key=lambda v: -len(v.tdims))
    if not tracked or not isinstance(out, TVal):
        return ctx.opaque(tracked, out) if tracked else out
    r = out.ndim
    for v in list(tracked):  # one channel spread over the others' (a spatial gate): it stays
        if all(v.shape[d] == 1 and out.shape[d + r - v.ndim] != 1 for d in v.tdims):
            ctx.pin(v.atoms, f"one channel broadcast over many {ctx.where()}")
            tracked.remove(v)
    if not tracked:
        return out
    tdims = tuple(sorted({d + r - v.ndim for v in tracked for d in v.tdims}))
    shape = [out.shape[d] for d in tdims]
    grid: np.ndarray | None = None
    for v in tracked:
        off = r - v.ndim
        own = [d + off for d in v.tdims]
        if any(t - off >= 0 and t not in own and v.shape[t - off] != 1 for t in tdims):
            return ctx.opaque(tracked, out, "combines tensors whose channels sit on other dims")
        if any(v.shape[d - off] != out.shape[d] for d in own):
            return ctx.opaque(tracked, out, "broadcasts a channel dim")
        g = np.broadcast_to(v.atoms.reshape([out.shape[t] if t in own else 1 for t in tdims]),
                            shape)
        if grid is None:
            grid = np.array(g)
        else:
            ctx.uf.union_arrays(grid, np.ascontiguousarray(g))
    assert grid is not None
    for v in vals:
        if v.tracked:
            continue
        off = r - v.ndim
        sizes = [v.shape[d - off] if d - off >= 0 else 1 for d in tdims]
        if all(s == 1 for s in sizes):
            continue
        if len(tdims) > 1 and all(s == 1 or _coupled_along(ctx, grid, k)
                                  for k, s in enumerate(sizes)):
            continue  # it meets only dims that keep their size (a head's width: whole heads go)
        if v.param is not None and sum(s != 1 for s in sizes) == 1:
            d = next(t for t, s in zip(tdims, sizes, strict=True) if s != 1)
            k = tdims.index(d)
            line = grid[tuple(slice(None) if j == k else 0 for j in range(len(tdims)))]
            if len(tdims) > 1:  # one weight per position of dim d: the rest of the grid follows
                for idx in np.ndindex(*[n for j, n in enumerate(shape) if j != k]):
                    full = list(idx)
                    full.insert(k, slice(None))
                    ctx.uf.union_arrays(line, grid[tuple(full)])
            bound = ctx.bind_param(v, d - off, line)
            if bound is None:
                return ctx.opaque(tracked, out, f"uses the weight '{v.param}' of another layer")
            continue
        return ctx.opaque(tracked, out, "combines channels with a constant of full channel size")
    return TVal(out.shape, tdims, grid)


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


# --- matrix products and attention ---------------------------------------------------------------

def _insert_dim(v: Any, d: int) -> Any:
    """``v`` with a new size-1 dim at ``d`` (a parameter keeps its own dims)."""
    if not isinstance(v, TVal):
        return v
    shape = v.shape[:d] + (1,) + v.shape[d:]
    tdims = tuple(t + (t >= d) for t in v.tdims)
    pdims = v.param_dims
    if v.param is not None:
        pairs = pdims if pdims is not None else tuple((i, i) for i in range(v.ndim))
        pdims = tuple((i + (i >= d), own) for i, own in pairs)
    return TVal(shape, tdims, v.atoms, v.param, pdims)


def contract(ctx: RuleContext, a: Any, b: Any, out: Any) -> Any:
    """``a @ b`` as a product broadcast over (..., n, k, m) summed over k: channels on batch dims
    meet position-wise; channels on k are removed from both sides together; a constant on k pins
    them. Removing a pair from the sum changes it unless a later layer drops what it feeds (a
    whole attention head): the tracer marks such units not exact otherwise."""
    if not isinstance(a, TVal) or not isinstance(b, TVal) or a.ndim < 2 or b.ndim < 2 \
            or not isinstance(out, TVal):
        return ctx.opaque([a, b], out, "matrix product of vectors")
    a3, b3 = _insert_dim(a, a.ndim), _insert_dim(b, b.ndim - 2)
    r = out.ndim + 1
    k = r - 2
    prod = out.shape[:-1] + (a.shape[-1],) + out.shape[-1:]
    p = broadcast(ctx, [a3, b3], TVal(prod))
    if not isinstance(p, TVal) or not p.tracked:
        return out
    if k in p.tdims:
        pos = p.tdims.index(k)
        others = [j for j in range(len(p.tdims)) if j != pos]
        line = shared_line(ctx, p, k)
        if line is not None:
            # only the contracted channels, or a width shared by every head (the heads stay):
            # the output carries none, so removing them changes it unless a weight read them;
            # the positions summed over are one line, the same in every head: the sum over the
            # kept ones is what the pruned model computes (``on_kept`` of matmul, attention)
            ctx.record_contracted(line, a.ndim - 1)
            if a.tracked and b.tracked:
                ctx.record_cross_channel(line, a.ndim - 1)
            return out
        ctx.record_contracted(p.atoms)
        _couple_along(ctx, np.moveaxis(p.atoms, pos, -1), len(others))
        atoms = np.take(p.atoms, 0, axis=pos)
        return TVal(out.shape, tuple(t - (t > k) for t in p.tdims if t != k), atoms)
    return TVal(out.shape, tuple(t - (t > k) for t in p.tdims), p.atoms)


def _matmul(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = bind_args(args, kwargs, ("input", "other"), {})
    x, y = b.get("input", b.get("mat1")), b.get("other", b.get("mat2"))
    if not any(isinstance(v, TVal) and v.tracked for v in (x, y)):
        return out
    return contract(ctx, x, y, out)


def _matmul_on_kept(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], dim: int,
                    keep: torch.Tensor) -> Any:
    """``a @ b`` summed over the kept positions of a's last dim (and b's next to last) only."""
    b = bind_args(args, kwargs, ("input", "other"), {})
    x, y = b.pop("input"), b.pop("other") if "other" in b else b.pop("mat2")  # torch.bmm's
    return fn(x.index_select(dim, keep), y.index_select(max(y.ndim - 2, 0), keep), **b)


register_function_rule([operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"], _matmul,
                       name="matmul", on_kept=_matmul_on_kept)


def _sdpa(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """softmax(q kᵀ · scale + mask) v: heads (batch dims) meet in q, k, v and the output; the
    width of q and k is contracted; the width of v is the output's. Without ``scale`` it is
    1/sqrt(q's width): where that width can narrow (every head keeps) the result is not exact."""
    b = bind_args(args, kwargs, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal",
                             "scale"), {"attn_mask": None, "scale": None})
    q, k, v, mask = b["query"], b["key"], b["value"], b["attn_mask"]
    if not any(isinstance(t, TVal) and t.tracked for t in (q, k, v, mask)):
        return out
    if not all(isinstance(t, TVal) for t in (q, k, v)) or q.ndim < 3 or k.ndim != q.ndim:
        return ctx.opaque([q, k, v, mask], out, "attention without batch dims")
    if b["scale"] is None and q.tracked and q.ndim - 1 in q.tdims and \
            not _coupled_along(ctx, q.atoms, q.tdims.index(q.ndim - 1)):
        # 1/sqrt(width) follows a narrower head: not exact; where the width is one line shared
        # by every head, the reference runs attention on the kept positions alone (``on_kept``)
        line = shared_line(ctx, q, q.ndim - 1)
        if line is None:
            ctx.record_cross_channel(q.atoms)
        else:
            ctx.record_cross_channel(line, q.ndim - 1)
    kt = permute(k, list(range(k.ndim - 2)) + [k.ndim - 1, k.ndim - 2],
                 TVal(k.shape[:-2] + (k.shape[-1], k.shape[-2])))
    scores = contract(ctx, q, kt, TVal(q.shape[:-1] + (k.shape[-2],)))
    if isinstance(mask, TVal):
        scores = broadcast(ctx, [scores, mask], scores if isinstance(scores, TVal) else
                           TVal(q.shape[:-1] + (k.shape[-2],)))
    if isinstance(scores, TVal) and scores.tracked and scores.ndim - 1 in scores.tdims:
        return ctx.opaque([scores, v], out, "softmax over channels")
    if not isinstance(scores, TVal):
        scores = TVal(q.shape[:-1] + (k.shape[-2],))
    return contract(ctx, scores, v, out)


def _sdpa_on_kept(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], dim: int,
                  keep: torch.Tensor) -> Any:
    """Attention with the kept positions of the query and key width only (its default scale
    follows that width, as the pruned model's does)."""
    b = bind_args(args, kwargs, _SDPA_ARGS, {})  # every one by name: a mask given by position
    q, k, v = b.pop("query"), b.pop("key"), b.pop("value")  # stays a mask
    return fn(q.index_select(dim, keep), k.index_select(k.ndim - 1, keep), v, **b)


#: ``F.scaled_dot_product_attention``'s parameters, in order
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


register_function_rule([F.scaled_dot_product_attention], _sdpa, name="sdpa",
                       on_kept=_sdpa_on_kept)


def _einsum(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """``einsum("bghid,bghjd->bghij", q, k)``: channels on one letter meet position-wise across
    operands; a letter summed over (not in the output) is removed from every operand together."""
    eq = str(args[0]).replace(" ", "")
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], tuple | list) else list(args[1:])
    vals = [v for v in ops if isinstance(v, TVal)]
    tracked = [v for v in vals if v.tracked]
    if not tracked or not isinstance(out, TVal):
        return out
    if "->" not in eq or "." in eq or len(ops) != len(eq.split("->")[0].split(",")):
        return NotImplemented  # implicit output or ellipsis: as an op without a rule
    ins, outl = eq.split("->")
    letters = ins.split(",")
    size = {lt: v.shape[d] for v, ls in zip(ops, letters, strict=True) if isinstance(v, TVal)
            for d, lt in enumerate(ls)}
    chan = sorted({ls[d] for v, ls in zip(ops, letters, strict=True)
                   if isinstance(v, TVal) for d in v.tdims}, key=lambda lt: (lt not in outl,
                                                                           outl.find(lt), lt))
    grid: np.ndarray | None = None
    read: list[tuple[TVal, int, str]] = []  # a parameter read along one channel letter
    for v, ls in zip(ops, letters, strict=True):
        if not isinstance(v, TVal) or len(ls) != v.ndim:
            return ctx.opaque(tracked, out, f"einsum {eq!r}")
        own = [ls[d] for d in v.tdims]
        met = [lt for lt in chan if lt in ls and lt not in own and v.shape[ls.index(lt)] != 1]
        if met:
            if v.param is not None and not v.tracked and len(met) == 1 and \
                    all(v.shape[ls.index(lt)] == 1 for lt in chan if lt in ls and lt != met[0]):
                read.append((v, ls.index(met[0]), met[0]))  # sliced with the channels it meets
                continue
            if v.param is not None:
                return NotImplemented  # a layer's weight read by einsum: no rule knows it
            return ctx.opaque(tracked, out, f"einsum {eq!r} meets channels with a constant")
        if not v.tracked:
            continue
        order = sorted(range(len(own)), key=lambda k: chan.index(own[k]))
        g = v.atoms.transpose(order).reshape([size[lt] if lt in own else 1 for lt in chan])
        g = np.broadcast_to(g, [size[lt] for lt in chan])
        if grid is None:
            grid = np.array(g)
        else:
            ctx.uf.union_arrays(grid, np.ascontiguousarray(g))
    assert grid is not None
    weighed = False  # a summed letter read by a weight: the reference zeroes what it reads
    for v, d, lt in read:  # a weight read along the channels (``einsum("bchw,oc->bohw", x, w)``,
        # a relative-position table along a head's channels in SAM and MViT): sliced with them,
        # the same positions for every other channel it meets (every head); where they are
        # summed over it reads them, and the reference zeroes what it reads
        k = chan.index(lt)
        if lt not in outl and len(chan) > 1:
            continue  # summed within each head, whose width stays (whole heads go): untouched
        for j in range(len(chan)):
            if j != k:
                _couple_along(ctx, grid, j)
        line = grid[tuple(slice(None) if j == k else 0 for j in range(len(chan)))]
        if ctx.bind_param(v, d, np.ascontiguousarray(line), reads=lt not in outl) is None:
            return NotImplemented  # a ruled layer's own weight: no rule knows this read
        weighed = weighed or lt not in outl
    kept = [lt for lt in chan if lt in outl]
    if len(kept) < len(chan) and not (weighed and len(tracked) == 1):
        ctx.record_contracted(grid)  # a product of two tensors: not exact unless a layer reads it
    if not kept:
        return out  # every channel is summed over: the output carries none
    for k in range(len(kept), len(chan)):  # summed letters: one unit per output position
        _couple_along(ctx, grid, k)
    atoms = grid[(Ellipsis,) + (0,) * (len(chan) - len(kept))] if len(chan) > len(kept) \
        else grid
    return TVal(out.shape, tuple(outl.index(lt) for lt in kept), np.ascontiguousarray(atoms))


register_function_rule([torch.einsum], _einsum, name="einsum")


# --- concatenation and splitting ------------------------------------------------------------------

def _cat(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = bind_args(args, kwargs, ("tensors", "dim"), {"dim": 0})
    vals = list(b["tensors"])
    dim = b["dim"] % out.ndim
    tracked = [v for v in vals if isinstance(v, TVal) and v.tracked]
    if not tracked:
        return _cat_params(ctx, vals, dim, out)
    if all(v.tdims == (dim,) for v in tracked):
        parts = [v.atoms if v.tracked else ctx.pinned_atoms(v.shape[dim], "a constant in a cat")
                 for v in vals]
        return TVal(out.shape, (dim,), np.concatenate(parts))
    if all(dim not in v.tdims for v in tracked):
        # joining along another dim (tokens, batch): channels shared position-wise; a class
        # token (a parameter) is sliced with them
        shapes = [TVal(tuple(1 if d == dim else n for d, n in enumerate(v.shape)), v.tdims,
                       v.atoms, v.param, v.param_dims) if isinstance(v, TVal) else v for v in vals]
        joined = broadcast(ctx, shapes, TVal(tuple(1 if d == dim else n
                                                   for d, n in enumerate(out.shape))))
        return TVal(out.shape, joined.tdims, joined.atoms) if joined.tracked else out
    return ctx.opaque(tracked, out, "cat along a dim that mixes channel layouts")


def _cat_params(ctx: RuleContext, vals: list[Any], dim: int, out: Any) -> Any:
    """Parameters joined along their dim 0 (``torch.cat((self.q_bias, self.k_bias,
    self.v_bias))``): each is sliced with the positions of the result it makes, so the result
    carries channels wherever it goes (a consumer that cannot follow them keeps them)."""
    if dim != 0 or not isinstance(out, TVal) or not vals or not all(
            isinstance(v, TVal) and v.param is not None and v.param_dims is None and v.ndim
            for v in vals):
        return out
    parts = []
    for v in vals:
        atoms = ctx.bind_param(v, 0, ctx.uf.new(v.shape[0]))
        if atoms is None:  # a ruled layer's own tensor: not sliced here, so the result is fixed
            return out
        parts.append(atoms)
    return TVal(out.shape, (0,), np.concatenate(parts))


def _pieces(ctx: RuleContext, x: Any, dim: int, out: Any, equal_at_runtime: bool, why: str) -> Any:
    if not isinstance(x, TVal) or not x.tracked:
        return out
    dim %= x.ndim
    if dim not in x.tdims:
        return tuple(TVal(o.shape, x.tdims, x.atoms) for o in out)
    sizes = {o.shape[dim] for o in out}
    if len(x.tdims) > 1:  # pieces of a per-head dim: its positions go together, sizes stay
        pos = x.tdims.index(dim)
        _couple_along(ctx, x.atoms, pos)
        bounds = np.cumsum([o.shape[dim] for o in out])[:-1]
        return tuple(TVal(o.shape, x.tdims, p) for o, p in
                     zip(out, np.split(x.atoms, bounds, axis=pos), strict=True))
    if x.tdims != (dim,) or not equal_at_runtime or len(sizes) != 1:
        return ctx.opaque([x], out, why)
    pieces = np.split(x.atoms, len(out))
    for p in pieces[1:]:  # equal pieces stay equal: position j of every piece is one unit
        ctx.uf.union_arrays(pieces[0], p)
    return tuple(TVal(o.shape, (dim,), p) for o, p in zip(out, pieces, strict=True))


def _chunk(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = bind_args(args, kwargs, ("input", "chunks", "dim"), {"dim": 0})
    return _pieces(ctx, b["input"], b["dim"], out, True, "chunk into uneven pieces")


def _split(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = bind_args(args, kwargs, ("tensor", "split_size_or_sections", "dim"), {"dim": 0})
    size = b.get("split_size_or_sections", b.get("split_size"))
    sections = list(size) if isinstance(size, tuple | list) else [size] * len(out)
    x = b["tensor"]
    if (isinstance(x, TVal) and x.tdims == (b["dim"] % x.ndim,) and len(sections) > 1
            and any(isinstance(s, AttrInt) for s in sections)
            and not any(isinstance(s, Dyn) and s.src for s in sections)):
        ctx.hold([s for s in sections if not isinstance(s, AttrInt)])  # e.g. self.dim - self.p
        if any(ctx.size_role(s, x) != "fixed" for s in sections):
            return _split_by_attributes(ctx, x, sections, out)
    # a size computed in forward (e.g. x.size(1) // 2) follows the pruned width; a literal does not
    computed = ctx.is_computed(size, x if isinstance(x, TVal) and x.tracked else None)
    kind = ("computed from widths or attributes that must stay:" if ctx.is_computed(size)
            or any(isinstance(s, AttrInt) for s in sections) else "hard-coded")
    return _pieces(ctx, b["tensor"], b["dim"], out, computed,
                   f"split with sizes {kind} {size!r} {ctx.where()}")


def _split_by_attributes(ctx: RuleContext, x: TVal, sections: list[Any], out: Any) -> Any:
    """``split((self.c, self.c), 1)``: each section keeps the count its attribute says; sections
    sized by one attribute keep equal counts (position j of each goes together). A section whose
    size must stay (a literal, an attribute used where it cannot change) keeps its channels."""
    pieces = np.split(x.atoms, np.cumsum([int(s) for s in sections])[:-1])
    first: dict[str, np.ndarray] = {}
    for s, p in zip(sections, pieces, strict=True):
        if ctx.size_role(s, x) == "fixed":
            what = f"attribute {s.qualname}, which must stay" if isinstance(s, AttrInt) else \
                "a size computed from attributes that must stay" if isinstance(s, Dyn) else \
                "a hard-coded size"
            ctx.pin(p, f"split section sized by {what} {ctx.where()}")
        elif s.qualname in first:
            ctx.uf.union_arrays(first[s.qualname], p)
        else:
            first[s.qualname] = p
            ctx.attr_size(s, p)
    return tuple(TVal(o.shape, x.tdims, p) for o, p in zip(out, pieces, strict=True))


def _stack(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """A new dim at ``dim``: channels stay where they were (shifted), shared position-wise."""
    b = bind_args(args, kwargs, ("tensors", "dim"), {"dim": 0})
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
    b = bind_args(args, kwargs, ("input", "dim"), {"dim": 0})
    x = b["input"]
    if not isinstance(x, TVal) or not x.tracked:
        return out
    dim = b["dim"] % x.ndim
    if dim in x.tdims:  # the pieces (q, k, v) keep their count: positions along dim go together
        pos = x.tdims.index(dim)
        _couple_along(ctx, x.atoms, pos)
        rest = tuple(t - (t > dim) for t in x.tdims if t != dim)
        if not rest:
            return ctx.opaque([x], out, "unbinds the channel dim")
        return tuple(TVal(o.shape, rest, np.take(x.atoms, j, axis=pos)) for j, o in enumerate(out))
    return tuple(TVal(o.shape, tuple(t - (t > dim) for t in x.tdims), x.atoms) for o in out)


register_function_rule([torch.cat, torch.concat, torch.concatenate], _cat, name="cat")
register_function_rule([torch.stack], _stack, name="stack")
register_function_rule([torch.unbind, "unbind"], _unbind, name="unbind")
register_function_rule([torch.chunk, "chunk"], _chunk, name="chunk")
register_function_rule([torch.split, "split"], _split, name="split")


def _whole_slice(ctx: RuleContext, obj: TVal, d: int, s: slice) -> bool:
    """A slice that keeps every position of channel dim ``d`` and still does once channels go
    (GhostNet's ``torch.cat([x1, x2], 1)[:, :self.out_chs]`` where the cat is that wide): its
    end is the size from an attribute (rewritten with the count kept), from the tensor, or a
    literal no smaller."""
    if s.start not in (None, 0) or s.step not in (None, 1):
        return False
    stop = s.stop
    if stop is None:
        return True
    if isinstance(stop, bool) or not isinstance(stop, int) or stop < obj.shape[d]:
        return False
    if isinstance(stop, AttrInt):
        if stop == obj.shape[d] and obj.tdims == (d,):
            ctx.attr_size(stop, obj.atoms)
        else:
            ctx.freeze([stop])  # larger than the dim: staying so, it keeps the slice whole
        return True
    if isinstance(stop, Dyn):
        return bool(ctx.size_role(stop, obj) == "free")
    return True


def _getitem(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    obj, idx = args
    if isinstance(obj, tuple | list):
        return obj[idx]
    if not isinstance(obj, TVal) or not obj.tracked:
        return out
    idx = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    mapping: dict[int, int] = {}  # input dim -> output dim
    taken: dict[int, int] = {}  # atoms axis -> the index taken along it
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
            if d_in in obj.tdims and not _whole_slice(ctx, obj, d_in, i):
                return ctx.opaque([obj], out, "slices the channel dim")
            mapping[d_in] = d_out
            d_in, d_out = d_in + 1, d_out + 1
        elif isinstance(i, int) and d_in not in obj.tdims:
            d_in += 1
        elif isinstance(i, int) and len(obj.tdims) > 1:  # qkv[0] of (3, heads, width): the
            taken[obj.tdims.index(d_in)] = i % obj.shape[d_in]  # 3 positions go together
            d_in += 1
        else:
            return ctx.opaque([obj], out, "indexes the channel dim")
    for rest in range(d_in, obj.ndim):
        mapping[rest] = d_out + rest - d_in
    atoms = obj.atoms
    if taken:
        if len(taken) == len(obj.tdims):
            return ctx.opaque([obj], out, "indexes the channel dim")
        for axis in taken:
            _couple_along(ctx, atoms, axis)
        atoms = atoms[tuple(taken.get(k, slice(None)) for k in range(atoms.ndim))]
    return TVal(out.shape, tuple(mapping[d] for d in obj.tdims if d in mapping),
                np.ascontiguousarray(atoms))


register_function_rule([operator.getitem], _getitem, name="getitem")


# --- layout: reshape, flatten, permute ------------------------------------------------------------

def reshape_blocks(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
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


def reshape(ctx: RuleContext, x: Any, out: Any, roles: Sequence[Any] | None, op: str,
            sizes: Sequence[Any] = ()) -> Any:
    """Channels through a reshape. ``roles[k]``: what out dim k's size does when channels go
    (``ctx.size_role``); None: every size follows (flatten).

    Channels may spread over several output dims (a channel shuffle views C as (g, C/g); attention
    views 3·H·D as (3, H, D)). One of those dims may change size: one whose size follows by itself
    (``-1``, ``x.size(1) // g``), else the outermost one sized by a module attribute (heads before
    head width), which the plan then rewrites. The positions along every other channel dim are
    coupled, so whole slices go and their sizes stay. With no dim that can change, the size is
    hard-coded and the channels are pinned.
    """
    if not isinstance(x, TVal) or not x.tracked:
        return out
    blocks = reshape_blocks(x.shape, out.shape)
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
    channel_dims = {outs[k] for k in vary}
    for d, s in enumerate(sizes):
        if d not in channel_dims:
            ctx.hold(s)
    if roles is not None:
        kinds = [roles[outs[k]] for k in vary]
        for pos, kind in enumerate(kinds):
            if isinstance(kind, tuple) and kind[0] == "per":
                given = [sizes[outs[k]] if sizes else None for k in vary]
                kinds[pos] = _per_attribute(ctx, atoms, kinds, given, pos, kind[1], kind[2])
            elif isinstance(kind, tuple):  # the count of other channels: match them one for one
                line = _line(atoms, pos)
                if kind[1].shape == line.shape:
                    ctx.uf.union_arrays(kind[1], line)
                    kinds[pos] = "free"
                else:
                    ctx.pin(kind[1], f"its channel count sizes a reshape {ctx.where()}")
                    kinds[pos] = "fixed"
        free = [pos for pos, kind in enumerate(kinds) if kind == "free"]
        attrs = [pos for pos, kind in enumerate(kinds) if isinstance(kind, AttrInt)]
        if not free and not attrs:
            shape = tuple(out.shape[outs[k]] for k in vary)
            given = [sizes[outs[k]] for k in vary] if sizes else []
            if any(isinstance(g, Dyn | AttrInt) for g in given):  # not written: held
                return ctx.opaque([x], out, f"sizes {shape} in {op} {ctx.where()} are computed "
                                            "from another tensor's width or from an attribute "
                                            "that must stay, so they cannot follow these "
                                            "channels")
            return ctx.opaque([x], out, f"hard-coded size {shape} in {op} {ctx.where()}; write "
                                        "the size from x.size()/-1 or a module attribute to let "
                                        "surgery prune it")
        inferred = bool(sizes) and all(
            not isinstance(sizes[outs[vary[pos]]], Dyn) and sizes[outs[vary[pos]]] == -1
            for pos in free)
        if attrs and inferred:  # view(B, N, self.num_heads, -1): whole heads, -1 keeps its size;
            # view(B, N, -1, self.head_dim): whole heads again, the attribute keeps its value
            free = free[:1] if free and free[0] < attrs[0] else []
        if len(free) > 1:  # a dim whose positions already go together (a head's width) keeps
            free = [pos for pos in free if not _coupled_along(ctx, atoms, pos)] or free[:1]
        if len(free) > 1:
            return ctx.opaque([x], out, f"several sizes in {op} follow the width {ctx.where()}")
        change = free[0] if free else attrs[0]
        ctx.freeze(kinds[pos] for pos in attrs if pos != change)
        for pos in range(len(kinds)):
            if pos != change:
                _couple_along(ctx, atoms, pos)
        if isinstance(kinds[change], AttrInt):
            line = _line(atoms, change)
            n = int(kinds[change])
            if len(line) != n:  # B * self.num_heads: the heads repeat once per batch item
                if n == 0 or len(line) % n or not (line == np.tile(line[:n], len(line) // n)).all():
                    return ctx.opaque([x], out, f"{op} to a size that is not a multiple of "
                                                f"{kinds[change].qualname} {ctx.where()}")
                line = line[:n]
            ctx.attr_size(kinds[change], line)
    return TVal(out.shape, tuple(outs[k] for k in vary), atoms)


def _per_attribute(ctx: RuleContext, atoms: np.ndarray, kinds: list[Any], given: list[Any],
                   pos: int, other: np.ndarray, attr: AttrInt) -> str:
    """``view(B, N, self.num_heads, C // self.num_heads)`` with ``C`` the width of other
    channels ``other``: position (h, j) is ``other``'s channel h·(C/heads) + j, so the heads
    stay and each head's width follows ``other`` (which then loses the same positions in every
    head). Else ``other``'s count is held."""
    outer = [p for p, g in enumerate(given[:pos]) if isinstance(g, AttrInt)
             and g.qualname == attr.qualname]
    if outer or int(attr) == 1:  # (one head: its axis has size 1 and carries no channels)
        plane = atoms[tuple(slice(None) if j in (*outer[:1], pos) else 0
                            for j in range(atoms.ndim))]
        if plane.size == other.size:
            ctx.uf.union_arrays(other.reshape(plane.shape), plane)
            ctx.freeze([attr])
            if outer:
                kinds[outer[0]] = "fixed"
            return "free"
    ctx.pin(other, f"its channel count sizes a reshape {ctx.where()}")
    ctx.freeze([attr])
    return "fixed"


def _line(atoms: np.ndarray, axis: int) -> np.ndarray:
    """The atoms along ``axis`` (index 0 on the other axes)."""
    return atoms[tuple(slice(None) if j == axis else 0 for j in range(atoms.ndim))]


def shared_line(ctx: RuleContext, x: TVal, dim: int) -> np.ndarray | None:
    """The atoms along channel dim ``dim`` of ``x`` where its other channel dims hold the same
    units at every position (a width shared by every head): one set of positions to keep
    along ``dim``, as a kept-channel site needs (:meth:`RuleContext.record_cross_channel`)."""
    pos = x.tdims.index(dim)
    moved = np.moveaxis(x.atoms, pos, -1)
    if any(not _coupled_along(ctx, moved, j) for j in range(moved.ndim - 1)):
        return None
    return moved.reshape(-1, moved.shape[-1])[0]


def _coupled_along(ctx: RuleContext, atoms: np.ndarray, axis: int) -> bool:
    """Whether the positions along ``axis`` are already removed together (its size stays)."""
    roots = np.vectorize(ctx.uf.find, otypes=[np.int64])(atoms)
    return bool((roots == np.take(roots, [0], axis=axis)).all())


def pixel_shuffled(ctx: RuleContext, x: Any, r: int, out: Any, shuffle: bool) -> Any:
    """``pixel_shuffle(x, r)``: input channels ``c*r*r ... c*r*r + r*r - 1`` become output
    channel ``c`` at r x r positions, so they are one unit with it; ``pixel_unshuffle`` the
    reverse (each input channel spreads over r*r output channels)."""
    if not isinstance(x, TVal) or not x.tracked:
        return out
    cdim = x.ndim - 3
    if not isinstance(out, TVal) or x.tdims != (cdim,) or not isinstance(r, int):
        return ctx.opaque([x], out, "pixel shuffle of channels on other dims")
    k = r * r
    if shuffle:
        grid = x.atoms.reshape(-1, k)
        _couple_along(ctx, grid, 1)
        return TVal(out.shape, (cdim,), np.ascontiguousarray(grid[:, 0]))
    grid = ctx.uf.new(out.shape[cdim]).reshape(-1, k)
    for j in range(k):
        ctx.uf.union_arrays(x.atoms, grid[:, j])
    return TVal(out.shape, (cdim,), grid.reshape(-1))


def _pixel(shuffle: bool) -> Any:
    def rule(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        name = "upscale_factor" if shuffle else "downscale_factor"
        b = bind_args(args, kwargs, ("input", name), {})
        return pixel_shuffled(ctx, b["input"], b[name], out, shuffle)

    return rule


register_function_rule([F.pixel_shuffle, torch.pixel_shuffle], _pixel(True), name="pixel_shuffle")
register_function_rule([F.pixel_unshuffle, torch.pixel_unshuffle], _pixel(False),
                       name="pixel_unshuffle")


def _couple_along(ctx: RuleContext, atoms: np.ndarray, axis: int) -> None:
    """Positions along ``axis`` are removed together (the size of that axis stays)."""
    first = np.take(atoms, 0, axis=axis)
    for j in range(1, atoms.shape[axis]):
        ctx.uf.union_arrays(first, np.take(atoms, j, axis=axis))


def _sizes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], tuple | list) else args


def _view(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    sizes = _sizes(args[1:]) if args[1:] else _sizes((kwargs.get("shape", kwargs.get("size")),))
    x = args[0]
    if not isinstance(x, TVal) or not x.tracked or len(sizes) != out.ndim:
        if not (isinstance(x, TVal) and x.param is not None):  # (a parameter's view follows
            ctx.hold(sizes)  # its slicing) a constant's sizes do not follow the width
        return out if not isinstance(x, TVal) or not x.tracked else \
            ctx.opaque([x], out, f"view/reshape to sizes {sizes!r}")
    return reshape(ctx, x, out, [ctx.size_role(s, x) for s in sizes], "view/reshape", sizes)


def _unflatten(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = bind_args(args, kwargs, ("input", "dim", "sizes"), {})
    x = b["input"]
    sizes = list(b["sizes"])
    if not isinstance(x, TVal) or not x.tracked:
        ctx.hold(sizes)
        return out
    dim = b["dim"] % x.ndim
    roles = ["fixed"] * dim + [ctx.size_role(s, x) for s in sizes] + \
        ["fixed"] * (x.ndim - dim - 1)
    return reshape(ctx, x, out, roles, "unflatten",
                   [0] * dim + sizes + [0] * (x.ndim - dim - 1))


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
    b = bind_args(args, kwargs, ("input", "dim0", "dim1"), {})
    x = b["input"]
    dims = list(range(x.ndim))
    d0, d1 = b["dim0"] % x.ndim, b["dim1"] % x.ndim
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return permute(x, dims, out)


def _reshape_as(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any],
                out: Any) -> Any:
    """``y.reshape_as(x)``: the sizes are ``x``'s, so a channel dim of ``x`` follows ``x``."""
    x, other = args[0], args[1]
    if not isinstance(x, TVal) or not x.tracked or not isinstance(other, TVal):
        return out
    own = {ctx.uf.find(a) for a in x.atoms.ravel().tolist()}
    roles: list[Any] = []
    for d in range(other.ndim):
        if d not in other.tdims:
            roles.append("fixed")
            continue
        line = _line(np.moveaxis(other.atoms, other.tdims.index(d), 0), 0)
        roles.append("free" if {ctx.uf.find(a) for a in line.tolist()} <= own
                     else ("couple", line))
    return reshape(ctx, x, out, roles, "reshape_as")


register_function_rule(["view", "reshape", torch.reshape], _view, name="view")
register_function_rule(["reshape_as", "view_as"], _reshape_as, name="reshape_as")
register_function_rule(["unflatten", torch.unflatten], _unflatten, name="unflatten")
register_function_rule([torch.flatten, "flatten", "squeeze", "unsqueeze", torch.squeeze,
                        torch.unsqueeze], _flatten, name="flatten")
register_function_rule([torch.permute, "permute"], _permute, name="permute")
def _swap(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = bind_args(args, kwargs, ("input", "axis0", "axis1"), {})
    return _transpose(ctx, (b["input"], b.get("axis0", b.get("dim0")),
                            b.get("axis1", b.get("dim1"))), {}, out)


register_function_rule([torch.transpose, "transpose"], _transpose, name="transpose")
register_function_rule([torch.swapaxes, torch.swapdims, "swapaxes", "swapdims"], _swap,
                       name="transpose")


# --- reductions and channel-wise normalisations ---------------------------------------------------

def _reduction(statistic: bool) -> Any:
    """Reductions over some dims: the channels of the others pass. Over the channel dim, a
    ``statistic`` (mean, variance, max: a hand-written LayerNorm2d's ``x.mean(1, keepdim=True)``)
    uses every channel, like a norm layer: removal is allowed, not exact, and the result
    carries none; a sum over channels, whose scale changes as they go, keeps them."""

    def rule(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        b = bind_args(args, kwargs, ("input", "dim"), {"dim": None})
        x, dim = b["input"], b["dim"]
        if not isinstance(x, TVal) or not x.tracked:
            return out
        if dim is None or not isinstance(out, TVal):
            return ctx.opaque([x], out, "reduces over every dim")
        dims = {d % x.ndim for d in (dim if isinstance(dim, tuple | list) else (dim,))}
        if dims & set(x.tdims):
            if statistic and set(x.tdims) <= dims:
                ctx.record_cross_channel(x.atoms, x.tdims[0] if len(x.tdims) == 1 else None)
                return out
            return ctx.opaque([x], out, "reduces over channels")
        shift = 0 if out.ndim == x.ndim else 1  # keepdim
        return TVal(out.shape, tuple(t - shift * sum(d < t for d in dims) for t in x.tdims),
                    x.atoms)

    return rule


def _on_kept_input(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   dim: int, keep: torch.Tensor) -> Any:
    """A statistic over the channels (``x.mean(1)``, ``torch.max(x, 1)``) of the kept ones: the
    channel dim is reduced, so nothing is scattered back (``max``'s indices count kept channels,
    as the pruned model's do)."""
    if args:
        return fn(args[0].index_select(dim, keep), *args[1:], **kwargs)
    return fn(**{**kwargs, "input": kwargs["input"].index_select(dim, keep)})


def _on_kept_scattered(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                       dim: int, keep: torch.Tensor) -> Any:
    """An op whose output keeps the channel dim (``F.normalize``) on the kept channels alone."""
    x = args[0] if args else kwargs["input"]
    return scattered(x, dim, keep, _on_kept_input(fn, args, kwargs, dim, keep))


_REDUCE, _STATISTIC = _reduction(False), _reduction(True)
register_function_rule([torch.sum, "sum"], _REDUCE, name="reduce")
register_function_rule([torch.mean, torch.var, torch.std, torch.amax, torch.amin, "mean", "var",
                        "std", "amax", "amin"], _STATISTIC, name="statistic",
                       on_kept=_on_kept_input)


def _extreme(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """``torch.max(x, dim)`` / ``min``: (values, indices) reduced as a statistic (CBAM's
    ``torch.max(x, 1)[0]`` over channels); ``torch.max(a, b)`` is position-wise."""
    b = bind_args(args, kwargs, ("input", "dim", "keepdim"), {"dim": None, "keepdim": False})
    if isinstance(b["dim"], TVal | torch.Tensor):
        return _binary(ctx, args, kwargs, out)
    if b["dim"] is None or not isinstance(out, tuple) or len(out) != 2:
        return _REDUCE(ctx, args, kwargs, out)
    values = _STATISTIC(ctx, args[:2], {k: v for k, v in kwargs.items() if k == "dim"}, out[0])
    indices = TVal(out[1].shape, values.tdims, values.atoms) \
        if isinstance(values, TVal) and values.tracked and isinstance(out[1], TVal) else out[1]
    kind: Any = type(out)  # torch.return_types.max, a named tuple of (values, indices)
    return kind((values, indices))


register_function_rule([torch.max, torch.min, "max", "min"], _extreme, name="extreme",
                       on_kept=_on_kept_input)


def _field(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """``x.max(1).values``: a field of a named tuple of results."""
    obj, name = args[0], args[1]
    if isinstance(obj, tuple) and isinstance(name, str) and not name.startswith("_"):
        field = getattr(obj, name, None)
        if isinstance(field, TVal):
            return field
    return NotImplemented


register_function_rule([getattr], _field, name="field")


def _softmax(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    b = bind_args(args, kwargs, ("input", "dim"), {"dim": None})
    x = b["input"]
    if isinstance(x, TVal) and x.tracked and (b["dim"] is None or b["dim"] % x.ndim in x.tdims):
        return ctx.opaque([x], out, "softmax over channels")
    return passthrough(ctx, x, out)


register_function_rule([F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax",
                        "log_softmax"], _softmax, name="softmax")


def _last_dim_norm(op: str, names: tuple[str, ...]) -> Any:
    """``F.layer_norm`` / ``F.rms_norm`` over the last dim: every channel counts in the
    statistics (removal allowed, not exact); the weight (and bias) are sliced with the channels:
    by the owner's norm rule where it has one, else as raw tensors, and a ``normalized_shape``
    read from an attribute (timm's ``RmsNorm``: ``self.normalized_shape``) is rewritten."""

    def rule(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        b = bind_args(args, kwargs, ("input", "normalized_shape", *names),
                      dict.fromkeys(names))
        x, shape = b["input"], tuple(b["normalized_shape"])
        if not isinstance(x, TVal) or not x.tracked:
            return out
        if max(x.tdims) < x.ndim - len(shape):
            return passthrough(ctx, x, out)
        params = [b[n] for n in names if isinstance(b[n], TVal)]
        if len(shape) != 1 or x.tdims != (x.ndim - 1,) or any(p.param is None for p in params):
            return ctx.opaque([x], out, f"{op} over channels with other dims")
        atoms = ctx.record_cross_channel(x.atoms, x.ndim - 1)
        ruled = False
        for p in params:
            found = ctx.owner(p)
            ruled = ruled or (found is not None and found[2] is not None)
            bound = ctx.bind_param(p, 0, atoms)
            if bound is None:
                return ctx.opaque([x], out, f"{op} with the weight '{p.param}' of another layer")
            atoms = bound
        if not ruled:  # no norm rule rewrites the size: it must follow by itself or be rewritten
            role = ctx.size_role(shape[0], x)
            if isinstance(role, AttrInt):
                ctx.attr_size(role, atoms)
            elif role != "free":
                return ctx.opaque([x], out, f"{op} over a size written in the call {ctx.where()}")
        return TVal(out.shape, x.tdims, atoms)

    return rule


def _norm_on_kept(names: tuple[str, ...]) -> OnKept:
    """``F.layer_norm`` / ``F.rms_norm`` over the kept channels (the last dim) alone, with their
    entries of the weight (and bias)."""

    def on_kept(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], dim: int,
                keep: torch.Tensor) -> Any:
        b = bind_args(args, kwargs, ("input", "normalized_shape", *names), {})
        b["normalized_shape"] = (len(keep),)
        return on_kept_affine(fn, b.pop("input"), dim, keep, **b)

    return on_kept


register_function_rule([F.layer_norm], _last_dim_norm("layer_norm", ("weight", "bias")),
                       name="layer_norm", on_kept=_norm_on_kept(("weight", "bias", "eps")))
register_function_rule([F.rms_norm], _last_dim_norm("rms_norm", ("weight",)), name="rms_norm",
                       on_kept=_norm_on_kept(("weight", "eps")))


def _normalize(ctx: RuleContext, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """``F.normalize(x, dim=d)``: x over its norm along d. Along a channel dim every channel
    counts in the norm, so removing one changes the rest (allowed, not exact)."""
    b = bind_args(args, kwargs, ("input", "p", "dim"), {"p": 2.0, "dim": 1})
    x = b["input"]
    if isinstance(x, TVal) and x.tracked and b["dim"] % x.ndim in x.tdims:
        line = shared_line(ctx, x, b["dim"] % x.ndim)
        if line is None:
            ctx.record_cross_channel(x.atoms)
        else:
            ctx.record_cross_channel(line, b["dim"] % x.ndim)
    return passthrough(ctx, x, out)


register_function_rule([F.normalize], _normalize, name="normalize",
                       on_kept=_on_kept_scattered)
