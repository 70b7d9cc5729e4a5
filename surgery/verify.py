"""Verification: the pruned model must equal the original with the removed inputs zeroed.

Pruning is exact: deleting channel c is the same as zeroing every weight that reads c downstream.
The reference is a copy of the original with exactly those weights zeroed; both run in float64 so
a real mismatch cannot hide in float32 rounding. Where a removed channel passes a cross-channel
normalisation (LayerNorm over C), equivalence is not defined and only shapes are checked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ExampleInputError, VerificationError
from .graph import Inputs, _fx_trace, _Recorder, as_tuple
from .groups import param_dim, param_reads
from .plan import LayerPlan, Plan
from .rules import module_rule


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify`. ``max_rel_error`` is max|small - ref| / max|ref|."""

    passed: bool
    exact_checked: bool
    max_rel_error: float
    output_shapes: tuple[tuple[int, ...], ...]
    dtype: str
    message: str = ""


def zeroed_reference(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` with every weight that reads a removed channel set to zero."""
    ref = copy.deepcopy(model)
    for path, lp in plan.layers.items():
        if lp.kind != "module":
            _zero_read_entries(ref, path, lp)
            continue
        m = ref.get_submodule(path)
        rule = module_rule(m)
        for axis, ap in lp.axes.items():
            kept = torch.zeros(ap.size, dtype=torch.bool)
            kept[list(ap.keep)] = True
            rule.zero_removed(m, axis, torch.nonzero(~kept).flatten())
    return ref


def _zero_read_entries(ref: nn.Module, path: str, lp: LayerPlan) -> None:
    """A raw weight that reads channels (``F.conv2d(x, self.w)``) stops reading the removed ones."""
    owner, _, name = path.rpartition(".")
    t = getattr(ref.get_submodule(owner), name)
    for axis, ap in lp.axes.items():
        if param_reads(axis):
            kept = torch.zeros(ap.size, dtype=torch.bool)
            kept[list(ap.keep)] = True
            with torch.no_grad():
                t.index_fill_(param_dim(axis), torch.nonzero(~kept).flatten(), 0)


def _leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for o in out for t in _leaves(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _leaves(o)]
    return []


def _run(model: nn.Module, inputs: tuple, dtype: torch.dtype | None) -> list[torch.Tensor]:
    if dtype is not None:
        model = model.to(dtype)
        inputs = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
                       else x for x in inputs)
    with torch.no_grad():
        return _leaves(model.eval()(*inputs))


def locate_failure(model: nn.Module, inputs: tuple) -> str:
    """Re-run ``model`` node by node to say which node and source line fail."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        _Recorder(torch.fx.GraphModule(model, _fx_trace(model, ()))).run(*inputs)
    except ExampleInputError as e:
        return str(e).split(". Check the shape")[0]
    except Exception as e:  # the failure is reported by the caller; this only adds a location
        return f"{type(e).__name__}: {e}"
    finally:
        for m, mode in modes.items():
            m.training = mode
    return ""


def verify(original: nn.Module, pruned: nn.Module, plan: Plan, example_inputs: Inputs, *,
           rtol: float = 1e-6, raise_on_failure: bool = True) -> VerifyReport:
    """Check ``pruned`` against ``original`` with the removed inputs zeroed; neither is modified.

    Output shapes are always compared; values are compared when ``plan.exact``.

    Example:
        >>> report = surgery.verify(model, small, plan, x)
        >>> report.max_rel_error
    """
    inputs = as_tuple(example_inputs)
    small = copy.deepcopy(pruned)
    try:
        _run(small, inputs, None)
    except Exception as e:
        where = locate_failure(copy.deepcopy(pruned), inputs)
        raise VerificationError(
            f"the pruned model no longer runs: {type(e).__name__}: {e}. {where}. The forward "
            "probably hard-codes a channel count the surgery changed; compute it from x.size() "
            "or keep that layer with ignore=[...]. The original model is unchanged.") from e
    ref = zeroed_reference(original, plan)
    dtype = torch.float64
    try:
        want, got = _run(ref, inputs, dtype), _run(small, inputs, dtype)
    except Exception:  # an op without float64 kernels: compare in the model's own dtype
        dtype = None
        ref, small = zeroed_reference(original, plan), copy.deepcopy(pruned)
        want, got = _run(ref, inputs, None), _run(small, inputs, None)
        rtol = max(rtol, 1e-4)
    shapes = tuple(tuple(t.shape) for t in got)
    message = ""
    err = 0.0
    if shapes != tuple(tuple(t.shape) for t in want):
        message = (f"output shapes differ: pruned {shapes}, original "
                   f"{tuple(tuple(t.shape) for t in want)}")
    elif plan.exact:
        for a, b in zip(got, want, strict=True):
            if a.is_floating_point():
                scale = b.abs().max().item() if b.numel() else 0.0
                diff = (a - b).abs().max().item() if b.numel() else 0.0
                err = max(err, diff / scale if scale > 0 else diff)
            elif not torch.equal(a, b):
                err = float("inf")
        if not err <= rtol:
            message = (f"pruned outputs differ from the zeroed original: max relative error "
                       f"{err:.3g} > {rtol:g}")
    report = VerifyReport(not message, plan.exact, err, shapes,
                          str(dtype or got[0].dtype if got else ""), message)
    if message and raise_on_failure:
        raise VerificationError(f"verification failed: {message}. Please report this model; "
                                "the original model is unchanged.")
    return report
