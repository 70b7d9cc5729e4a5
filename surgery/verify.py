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

from .depth import bypass_in_place
from .errors import ExampleInputError, VerificationError
from .graph import Inputs, Recorder, as_tuple, fx_trace
from .groups import param_dim, param_reads
from .modes import switched_mode
from .plan import LayerPlan, Plan
from .rules import module_rule
from .tensors import output_tensors, rel_error


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify`. ``max_rel_error`` is max|small - ref| / max|ref|."""

    passed: bool
    exact_checked: bool
    max_rel_error: float
    output_shapes: tuple[tuple[int, ...], ...]
    dtype: str
    message: str = ""
    #: inner module outputs whose shape the pruning kept, compared as well (head logits before a
    #: detector's NMS, features entering a zero-initialised classifier ...)
    layers_compared: int = 0
    #: the model's outputs carry no signal (empty, or constant like a zero-initialised head):
    #: equality there proves nothing, so the inner outputs are what was checked
    degenerate_outputs: bool = False

    @property
    def checked(self) -> str:
        """What the equivalence check compared, in words."""
        if not self.exact_checked:
            return "output shapes only (a cross-channel norm is on a pruned axis)"
        inner = f"{self.layers_compared} inner layer outputs"
        if self.degenerate_outputs:
            return f"{inner} (the outputs are empty or constant, so they prove nothing)"
        return f"outputs and {inner}"


def zeroed_reference(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` with the plan's bypasses made and every weight that reads a removed
    channel set to zero."""
    ref = bypass_in_place(copy.deepcopy(model), plan.bypasses)
    for path, lp in plan.layers.items():
        if lp.kind != "module":
            _zero_read_entries(ref, path, lp)
            continue
        m = ref.get_submodule(path)
        rule = module_rule(m)
        for axis, ap in lp.axes.items():
            kept = torch.zeros(ap.size, dtype=torch.bool)
            kept[list(ap.keep)] = True
            assert rule is not None  # a plan prunes only the axes of a ruled layer
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


def _cast(v: Any, dtype: torch.dtype) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, tuple | list):
        return type(v)(_cast(x, dtype) for x in v)
    if isinstance(v, dict):
        return {k: _cast(x, dtype) for k, x in v.items()}
    return v


Inner = dict[str, list[list[torch.Tensor]]]


def _run(model: nn.Module, inputs: tuple, dtype: torch.dtype | None,
         inner: Inner | None = None) -> list[torch.Tensor]:
    """Eval-mode outputs; with ``inner``, every module's tensor outputs too, by path and call."""
    if dtype is not None:
        model = model.to(dtype)
        inputs = _cast(inputs, dtype)
    hooks = []
    if inner is not None:
        for path, m in model.named_modules():
            hooks.append(m.register_forward_hook(
                lambda _m, _a, out, path=path: inner.setdefault(path, []).append(
                    output_tensors(out))))
    try:
        with torch.no_grad():
            return output_tensors(model.eval()(*inputs))
    finally:
        for h in hooks:
            h.remove()


def _has_signal(outputs: list[torch.Tensor]) -> bool:
    """Some floating output with more than one distinct value."""
    return any(t.is_floating_point() and t.numel() > 1 and bool(t.max() != t.min())
               for t in outputs)


def _compare_inner(want: Inner, got: Inner, rtol: float,
                   limits: dict[str, int] | None = None) -> tuple[int, float, str]:
    """Compare every module output whose shape survived pruning; (count, max error, worst).
    ``limits``: layers whose rule compares only their first outputs."""
    count, worst, where = 0, 0.0, ""
    limits = limits or {}
    for path, calls in want.items():
        for i, (a_list, b_list) in enumerate(zip(calls, got.get(path, []), strict=False)):
            n = limits.get(path)
            for a, b in list(zip(a_list, b_list, strict=False))[:n]:
                if a.shape != b.shape or a.dtype != b.dtype:
                    continue
                err = rel_error(b, a)
                count += 1
                if err > worst:
                    worst, where = err, f"'{path or '<root>'}' (call {i})"
    return count, worst, where


def locate_failure(model: nn.Module, inputs: tuple) -> str:
    """Re-run ``model`` node by node to say which node and source line fail."""
    try:
        with switched_mode(model):
            Recorder(torch.fx.GraphModule(model, fx_trace(model, (), len(inputs)))).run(*inputs)
    except ExampleInputError as e:
        return str(e).split(". Check the shape")[0]
    except Exception as e:  # the failure is reported by the caller; this only adds a location
        return f"{type(e).__name__}: {e}"
    return ""


def verify(original: nn.Module, pruned: nn.Module, plan: Plan, example_inputs: Inputs, *,
           rtol: float = 1e-6, raise_on_failure: bool = True) -> VerifyReport:
    """Check ``pruned`` against ``original`` with the removed inputs zeroed; neither is modified.

    Output shapes are always compared; values are compared when ``plan.exact``: the outputs and
    every module output whose shape the pruning kept (so a detector's head logits before NMS, or
    the features entering a zero-initialised classifier, are checked even when the outputs are
    empty or constant; ``report.checked`` says what was compared).

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
    dtype: torch.dtype | None = torch.float64
    inner_want: Inner = {}
    inner_got: Inner = {}
    try:
        want = _run(ref, inputs, dtype, inner_want if plan.exact else None)
        got = _run(small, inputs, dtype, inner_got if plan.exact else None)
    except Exception:  # an op without float64 kernels: compare in the model's own dtype
        dtype = None
        inner_want, inner_got = {}, {}
        ref, small = zeroed_reference(original, plan), copy.deepcopy(pruned)
        want = _run(ref, inputs, None, inner_want if plan.exact else None)
        got = _run(small, inputs, None, inner_got if plan.exact else None)
        rtol = max(rtol, 1e-4)
    shapes = tuple(tuple(t.shape) for t in got)
    message = ""
    err = 0.0
    layers = 0
    degenerate = not _has_signal(want)
    if shapes != tuple(tuple(t.shape) for t in want):
        message = (f"output shapes differ: pruned {shapes}, original "
                   f"{tuple(tuple(t.shape) for t in want)}")
    elif plan.exact:
        for a, b in zip(got, want, strict=True):
            err = max(err, rel_error(a, b))
        limits = {path: rule.compared_outputs for path, m in original.named_modules()
                  for rule in (module_rule(m),)
                  if rule is not None and rule.compared_outputs is not None}
        layers, inner_err, where = _compare_inner(inner_want, inner_got, rtol, limits)
        if not err <= rtol:
            message = (f"pruned outputs differ from the zeroed original: max relative error "
                       f"{err:.3g} > {rtol:g}")
        elif not inner_err <= rtol:
            message = (f"the output of {where} differs from the zeroed original: relative error "
                       f"{inner_err:.3g} > {rtol:g}")
        elif degenerate and layers == 0:
            message = ("the outputs are empty or constant on the example inputs, and no inner "
                       "layer output could be compared: give example inputs that produce output")
        err = max(err, inner_err)
    report = VerifyReport(not message, plan.exact, err, shapes,
                          str(dtype or got[0].dtype if got else ""), message, layers, degenerate)
    if message and raise_on_failure:
        raise VerificationError(f"verification failed: {message}. Please report this model; "
                                "the original model is unchanged.")
    return report
