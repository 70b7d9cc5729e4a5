"""Verification: the pruned model must equal the original with the removed inputs zeroed.

Pruning is exact: deleting channel c is the same as zeroing every weight that reads c downstream.
The reference is a copy of the original with exactly those weights zeroed. Where a removed channel
passes a cross-channel op (a LayerNorm over C, a mean over the channels), the reference runs that op
on the kept channels alone, as the pruned model does (:mod:`surgery.kept_sites`); where it cannot
(a scale computed from a channel count), only shapes are checked.

One pass in the model's own precision decides when it can. The reference runs first, sharing
the original's tensors (where a layer's rule allows it, it zeroes the removed channels on the way
into the layer instead of copying and zeroing its weights, whichever copies fewer values), and
keeps every layer output that no later in-place op changed (an output a later ``relu_`` or
``+=`` rewrote is not compared; the next layer's is). The pruned model then runs in place, layer
by layer against those: each layer's output is compared as it returns and its successors get the
reference's, so a difference stays where it arose and float32 rounding cannot flip a later top-k
or NMS choice (a detector's proposals). The pass succeeds when every compared output is within
the model's float32 rounding (:func:`float32_rounding`, at least 1e-6). Anything above is never
failed on float32 evidence: both are run again in float64 (fresh copies, end to end), which
decides at 1e-6, so a real mismatch cannot hide in float32 rounding and rounding cannot fail a
correct prune; it only costs the second pass.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .collector import pauses_collector
from .copies import SharedModule, own_tables
from .depth import bypass_in_place
from .errors import ExampleInputError, VerificationError
from .graph import Inputs, Recorder, as_tuple, fx_trace
from .groups import param_dim, param_reads
from .kept_sites import KeptRun
from .modes import attributes_kept, buffers_kept, switched_mode
from .paths import Submodules
from .plan import LayerPlan, Plan
from .rules import ModuleRule, module_rule
from .tensors import output_tensors, rel_error, replace_tensors


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
    #: each layer was compared given the reference's outputs of the layers before it, so float32
    #: rounding could not flip a later selection such as top-k or NMS (the float32 pass)
    layer_by_layer: bool = False
    #: cross-channel ops (a LayerNorm over C, a mean over the channels) the reference ran on the
    #: kept channels alone, as the pruned model does, so that values could still be compared
    kept_sites: int = 0
    #: where only shapes were compared: the op that the reference cannot run on the kept
    #: channels alone (it mixes channels the plan removes), with its source line
    shapes_only: str = ""

    @property
    def checked(self) -> str:
        """What the equivalence check compared, in words."""
        if not self.exact_checked:
            return f"output shapes only: {self.shapes_only}"
        inner = f"{self.layers_compared} inner layer outputs"
        if self.layer_by_layer:
            inner += " (layer by layer, each on the reference's values before it)"
        if self.kept_sites:
            inner += (f", the reference's {self.kept_sites} cross-channel ops (norms, statistics)"
                      " over the kept channels alone")
        if self.degenerate_outputs:
            return f"{inner} (the outputs are empty or constant, so they prove nothing)"
        return f"outputs and {inner}"


def zeroed_reference(model: nn.Module, plan: Plan, *, share_tensors: bool = False,
                     mask_inputs: bool = True, by_weight: Collection[str] = ()) -> nn.Module:
    """A copy of ``model`` with the plan's bypasses made and every weight that reads a removed
    channel set to zero, or, where a layer's rule says it is the same (a conv or linear layer
    with its own forward: ``rule.input_dims``), those channels zeroed on the way into the layer
    (or, at its first call on an input larger than its weights, a zeroed copy of its weights).

    ``share_tensors``: the copy's module tree is its own (flags, hooks, tables), but the tensors
    of layers whose weights are not zeroed are ``model``'s own, not copies; a cheap reference for
    a forward pass that must not be modified in place. ``mask_inputs=False``: zero the weights
    of every layer (no input hooks); ``by_weight``: of these layers.
    """
    masks: dict[str, list[tuple[str, int, torch.Tensor]]] = {}
    zeroed: list[str] = []  # layers whose weights are zeroed in the copy
    submodule = Submodules(model)
    for path, lp in plan.layers.items():
        if lp.kind != "module":
            continue
        m = submodule(path)
        rule = module_rule(m)
        if rule is not None and type(rule).zero_removed is ModuleRule.zero_removed:
            continue  # its weights read no channel across (a norm layer): nothing to zero
        dims = rule.input_dims(m) if mask_inputs and rule is not None and \
            path not in by_weight else None
        if dims is None:
            zeroed.append(path)
            continue
        entries = [(axis, dims[axis], ap.removed())
                   for axis, ap in lp.axes.items() if axis in dims]
        if any(len(idx) for _, _, idx in entries):
            masks[path] = entries
    ref = _light_copy(model, plan, zeroed, submodule) if share_tensors else None
    if ref is None:
        ref = copy.deepcopy(model)
    bypass_in_place(ref, plan.bypasses)
    in_ref = Submodules(ref)
    for path, lp in plan.layers.items():
        if lp.kind != "module":
            _zero_read_entries(in_ref, path, lp)
        elif path in zeroed:
            m = in_ref(path)
            rule = module_rule(m)
            for axis, ap in lp.axes.items():
                assert rule is not None  # a plan prunes only the axes of a ruled layer
                rule.zero_removed(m, axis, ap.removed())
    for path, entries in masks.items():
        m = in_ref(path)
        rule = module_rule(m)
        assert rule is not None  # only a ruled layer has input_dims
        weights = sum(t.numel() for t in m._parameters.values() if t is not None)
        m.register_forward_pre_hook(_InputZeroer(path, entries, rule, weights), with_kwargs=True)
    return ref


class _Unmasked(Exception):
    """A masked layer was called without its input as a tensor argument."""


class _InputZeroer:
    """Forward pre-hook: the layer's input with the removed positions zeroed (a new tensor), or,
    where the layer's weights are smaller than its input (a small conv on a large feature map),
    its weights replaced by zeroed copies once (the reference's module has tables of its own)
    and the input passed on as it is: either is the same to the layer, whichever copies less."""

    def __init__(self, path: str, entries: list[tuple[str, int, torch.Tensor]],
                 rule: ModuleRule, weights: int) -> None:
        self.path, self.entries, self.rule, self.failed = path, entries, rule, False
        self.fired = False  # called at all: a layer whose weight another forward reads is not
        self.weights = weights  # values in the layer's parameters

    def zeroed(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.entries:
            return x
        if x.numel() >= self.weights:
            with torch.no_grad():
                for name, t in m._parameters.items():
                    if t is not None:
                        m._parameters[name] = nn.Parameter(t.detach().clone(), t.requires_grad)
                for axis, _, idx in self.entries:
                    self.rule.zero_removed(m, axis, idx)
            self.entries = []
            return x
        for _, dim, idx in self.entries:
            x = x.index_fill(dim, idx.to(x.device), 0)
        return x

    def __call__(self, m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        self.fired = True
        if args and isinstance(args[0], torch.Tensor):
            return (self.zeroed(m, args[0]), *args[1:]), kwargs
        if isinstance(kwargs.get("input"), torch.Tensor):
            return args, {**kwargs, "input": self.zeroed(m, kwargs["input"])}
        self.failed = True  # seen after the run even if the forward swallows the exception
        raise _Unmasked(self.path)


def _masking_failed(ref: nn.Module) -> bool:
    return any(isinstance(h, _InputZeroer) and h.failed for m in ref.modules()
               for h in m._forward_pre_hooks.values())


def _unfired(ref: nn.Module) -> set[str]:
    """Masked layers the run never called: where another forward reads such a layer's weight
    (``F.linear(x, self.qkv.weight, bias)``) the removed inputs were not zeroed."""
    return {h.path for m in ref.modules() for h in m._forward_pre_hooks.values()
            if isinstance(h, _InputZeroer) and not h.fired and h.entries}


def _tables(m: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    return m._parameters, m._buffers


def _light_copy(model: nn.Module, plan: Plan, zeroed: list[str], submodule: Submodules
                ) -> nn.Module | None:
    """The module tree of ``model`` copied (tables of its own), tensors shared except those of
    the ``zeroed`` layers and the plan's raw tensors, which are cloned (ties kept). None where
    that is not safe."""
    touched: set[int] = set()
    for path in zeroed:
        touched.update(id(m) for m in submodule(path).modules())
    for path, lp in plan.layers.items():
        if lp.kind != "module":
            owner, _, name = path.rpartition(".")
            t = getattr(submodule(owner), name)
            if isinstance(t, torch.Tensor):
                touched.add(id(t))
    tree = _Tree(touched)
    try:
        ref = tree.copy(model)
    except SharedModule:
        return None
    for new in tree.copies.values():  # a tensor tied into a layer the plan does not touch
        for table in _tables(new):
            for key, t in table.items():
                if t is not None and id(t) in tree.clones:
                    table[key] = tree.clones[id(t)]
    return ref


class _Tree:
    """:func:`_light_copy`'s walk (an object, not a recursive closure: a closure that calls
    itself is a reference cycle, and the copied tree would wait for the cyclic collector)."""

    def __init__(self, touched: set[int]) -> None:
        self.touched = touched  # ids of layers whose tensors are cloned, and of raw tensors
        self.copies: dict[int, nn.Module] = {}
        self.clones: dict[int, torch.Tensor] = {}

    def clone(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self.clones:
            c = t.detach().clone()
            self.clones[id(t)] = nn.Parameter(c, t.requires_grad) \
                if isinstance(t, nn.Parameter) else c
        return self.clones[id(t)]

    def copy(self, m: nn.Module) -> nn.Module:
        if id(m) in self.copies:
            return self.copies[id(m)]
        new = own_tables(m)
        self.copies[id(m)] = new
        for key, child in m._modules.items():
            if child is not None:
                new._modules[key] = self.copy(child)
        for table in _tables(new):  # a touched layer's tensors, or a raw tensor of the plan
            for key, t in table.items():
                if t is not None and (id(m) in self.touched or id(t) in self.touched):
                    table[key] = self.clone(t)
        for key, v in vars(m).items():
            if isinstance(v, torch.Tensor) and id(v) in self.touched:
                new.__dict__[key] = self.clone(v)
        return new


def _zero_read_entries(submodule: Submodules, path: str, lp: LayerPlan) -> None:
    """A raw weight that reads channels (``F.conv2d(x, self.w)``) stops reading the removed ones."""
    owner, _, name = path.rpartition(".")
    t = getattr(submodule(owner), name)
    for axis, ap in lp.axes.items():
        if param_reads(axis):
            with torch.no_grad():
                t.index_fill_(param_dim(axis), ap.removed(), 0)


def _cast(v: Any, dtype: torch.dtype) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, tuple | list):
        return type(v)(_cast(x, dtype) for x in v)
    if isinstance(v, dict):
        return {k: _cast(x, dtype) for k, x in v.items()}
    return v


#: layer path -> per call, its output tensors (None: changed in place afterwards, not compared)
Inner = dict[str, list[list[torch.Tensor | None]]]


class _Tally:
    """Inner layer comparisons: how many, the largest relative error and where it was."""

    def __init__(self) -> None:
        self.count, self.worst, self.where = 0, 0.0, ""

    def pairs(self, path: str, got: Sequence[torch.Tensor | None],
              want: Sequence[torch.Tensor | None], limits: dict[str, int]
              ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(index, got, want) of a call's comparable outputs (same shape and dtype; only the
        first ``limits[path]`` where the layer's rule limits them)."""
        for i, (a, b) in enumerate(list(zip(got, want, strict=False))[:limits.get(path)]):
            if a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype:
                yield i, a, b

    def add(self, path: str, call: int, got: torch.Tensor, want: torch.Tensor) -> None:
        err = rel_error(got, want)
        self.count += 1
        if err > self.worst:
            self.worst, self.where = err, f"'{path or '<root>'}' (call {call})"

    def result(self) -> tuple[int, float, str]:
        return self.count, self.worst, self.where


class _Forced(_Tally):
    """Compares each layer output of a run with the reference's record of the same call as the
    layer returns it, then hands the layer's successors the reference's output instead, so a
    difference stays where it arose (float32 rounding cannot flip a later top-k or NMS choice).
    Only a layer's first ``limits[path]`` outputs are compared and replaced, if limited; an
    output the reference rewrote in place later (no record) is neither. ``own``: ids of the
    original's parameters and buffers, compared but never handed on (a layer that returns its
    own weight must not let this run write into the user's tensor)."""

    def __init__(self, want: Inner, limits: dict[str, int], own: frozenset[int] = frozenset()
                 ) -> None:
        super().__init__()
        self.want, self.limits, self.own = want, limits, own

    def __call__(self, path: str, call: int, out: Any) -> Any:
        calls = self.want.get(path, [])
        if call >= len(calls):
            return None
        got = output_tensors(out)
        new = list(got)
        for i, a, b in self.pairs(path, got, calls[call], self.limits):
            if a is b:  # a container passing on its last child's output, already compared
                self.count += 1
                continue
            self.add(path, call, a, b)
            if id(b) not in self.own:
                new[i] = b  # the reference's own tensor: this run's in-place ops may change it
        return replace_tensors(out, iter(new)) if any(
            a is not b for a, b in zip(new, got, strict=True)) else None


def _run(model: nn.Module, inputs: tuple, dtype: torch.dtype | None,
         inner: Inner | None = None, in_place: bool = False, *, kept: bool = False,
         forced: _Forced | None = None) -> list[torch.Tensor]:
    """Eval-mode outputs; with ``inner``, every module's tensor outputs too, by path and call.
    ``in_place``: ``model`` is the caller's own, so its train/eval flags and buffers are put
    back afterwards (and ``dtype`` must be None). ``kept``: record only outputs that still hold
    the values the layer returned when the run ends (no later in-place op changed them; the
    others are None), so they can stand in for the layer in another run. ``forced``: compare
    each layer output with another run's and continue on those (see :class:`_Forced`)."""
    if dtype is not None:
        assert not in_place, "casting would modify the caller's model"
        model = model.to(dtype)
        inputs = _cast(inputs, dtype)
    versions: list[tuple[list[torch.Tensor | None], int, torch.Tensor, int]] = []
    # one hook for every layer call in the process, for this model's layers (one registration,
    # not one per layer), by the name named_modules() gives each
    paths = {id(m): path for path, m in model.named_modules()} \
        if inner is not None or forced is not None else {}
    counts: dict[str, int] = {}

    def record(m: nn.Module, _a: Any, out: Any) -> Any:
        path = paths.get(id(m))
        if path is None:  # another model's layer (another thread), or one added by the forward
            return None
        if inner is not None:
            got: list[torch.Tensor | None] = list(output_tensors(out))
            if kept:
                versions.extend((got, i, t, t._version) for i, t in enumerate(got)
                                if t is not None)
            inner.setdefault(path, []).append(got)
        call = counts.get(path, 0)
        counts[path] = call + 1
        return forced(path, call, out) if forced is not None else None

    hook = nn.modules.module.register_module_forward_hook(record) if paths else None
    try:
        own = model if in_place else None
        with torch.no_grad(), switched_mode(own), buffers_kept(own), attributes_kept(own):
            # in place, switched_mode has set eval mode (and puts the flags back)
            out = output_tensors((model if in_place else model.eval())(*inputs))
        for got, i, t, version in versions:
            if t._version != version:  # rewritten in place after the layer returned it
                got[i] = None
        return out
    finally:
        if hook is not None:
            hook.remove()


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model`` (shared ones repeated), in one walk."""
    return [t for m in model.modules() for table in (m._parameters, m._buffers)
            for t in table.values() if t is not None]


def _has_signal(outputs: list[torch.Tensor]) -> bool:
    """Some floating output with more than one distinct value."""
    return any(t.is_floating_point() and t.numel() > 1 and bool(t.max() != t.min())
               for t in outputs)


def _compare_inner(want: Inner, got: Inner, limits: dict[str, int]) -> tuple[int, float, str]:
    """Compare every module output whose shape survived pruning; (count, max error, worst).
    ``limits``: layers whose rule compares only their first outputs."""
    tally = _Tally()
    for path, calls in want.items():
        for i, (a_list, b_list) in enumerate(zip(calls, got.get(path, []), strict=False)):
            for _, a, b in tally.pairs(path, a_list, b_list, limits):
                tally.add(path, i, b, a)
    return tally.result()


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


@pauses_collector
def verify(original: nn.Module, pruned: nn.Module, plan: Plan, example_inputs: Inputs, *,
           rtol: float | None = None, raise_on_failure: bool = True) -> VerifyReport:
    """Check ``pruned`` against ``original`` with the removed inputs zeroed; neither is modified.

    Output shapes are always compared; values are compared when ``plan.checks_values``
    (``plan.exact``, or every cross-channel op the removed channels pass runs in the reference on
    the kept channels alone: :mod:`surgery.kept_sites`): the outputs and
    every module output whose shape the pruning kept (so a detector's head logits before NMS, or
    the features entering a zero-initialised classifier, are checked even when the outputs are
    empty or constant; ``report.checked`` says what was compared).

    ``rtol``: the largest relative error accepted. Default: 1e-6, and for the float32 pass
    (layer by layer: ``report.layer_by_layer``) the model's own float32 rounding where that is
    larger (:func:`float32_rounding`); anything above goes to float64, which decides at 1e-6. A
    given ``rtol`` applies to both passes.

    Example:
        >>> report = surgery.verify(model, small, plan, x)
        >>> report.max_rel_error
    """
    inputs = as_tuple(example_inputs)
    unfired: set[str] = set()
    try:
        report = _verify(original, pruned, plan, inputs, rtol, unfired)
        if unfired and not report.passed and report.message.startswith(_VALUES):
            # a layer whose weight another forward reads kept its removed inputs in the
            # reference: zero its weights instead (found only here, so it costs only where
            # it happens)
            report = _verify(original, pruned, plan, inputs, rtol, set(), by_weight=unfired)
    except _Untrusted as e:  # the forward's calls did not match the trace's: shapes only
        why = f"the forward's cross-channel calls did not match the trace's ({e})"
        report = _verify(original, pruned, dataclasses.replace(
            plan, kept_sites=None, settings={**plan.settings, "shapes_only": why}), inputs,
            rtol, set())
    return _raised(report, raise_on_failure)


def _verify(original: nn.Module, pruned: nn.Module, plan: Plan, inputs: tuple,
            rtol: float | None, unfired: set[str], by_weight: Collection[str] = ()
            ) -> VerifyReport:
    """:func:`verify`'s passes; adds to ``unfired`` the masked layers a reference never called."""
    # one pass in the model's own float32 (or float64): the reference (sharing the original's
    # tensors) records its layer outputs, then the pruned model runs in place, layer by layer
    # against them; float64 copies only where that pass is not enough
    values = plan.checks_values
    mine = _tensors(original)
    own = {t.dtype for t in (*mine, *_tensors(pruned)) if t.is_floating_point()}
    one_pass = own <= {torch.float32} or own == {torch.float64}
    strict = 1e-6 if rtol is None else rtol
    inner_want: Inner = {}
    if one_pass:
        with buffers_kept(original):  # the reference shares them
            want = _reference_run(original, plan, inputs, None,
                                  inner_want if values else None, share=True, kept=True,
                                  unfired=unfired, by_weight=by_weight)
        own_tensors = frozenset(id(t) for t in mine)
        forced = _Forced(inner_want, _limits(original), own_tensors) if values else None
        got = _pruned_run(pruned, inputs, None, None, in_place=True, forced=forced)
        tol = strict if rtol is not None or own == {torch.float64} else \
            max(strict, float32_rounding(original))
        compared = forced.result() if forced else (0, 0.0, "")
        report = _report(want, got, compared, plan, tol, None, layer_by_layer=forced is not None)
        if own == {torch.float64} or report.passed or not report.message.startswith(_VALUES):
            return report
        small = copy.deepcopy(pruned)  # above rounding in float32: float64 decides
    else:
        small = copy.deepcopy(pruned)
        _pruned_run(small, inputs, None, None)  # it runs at all (in its own dtypes)
    dtype: torch.dtype | None = torch.float64
    inner_want = {}
    inner_got: Inner = {}
    try:
        want = _reference_run(original, plan, inputs, dtype, inner_want if values else None,
                              unfired=unfired, by_weight=by_weight)
        got = _run(small, inputs, dtype, inner_got if values else None)
    except Exception:  # an op without float64 kernels: compare in the model's own dtype
        dtype = None
        inner_want, inner_got = {}, {}
        small = copy.deepcopy(pruned)
        want = _reference_run(original, plan, inputs, None, inner_want if values else None,
                              unfired=unfired, by_weight=by_weight)
        got = _run(small, inputs, None, inner_got if values else None)
        strict = max(strict, 1e-4)
    compared = _compare_inner(inner_want, inner_got, _limits(original))
    return _report(want, got, compared, plan, strict, dtype)


def _pruned_run(pruned: nn.Module, inputs: tuple, dtype: torch.dtype | None,
                inner: Inner | None, in_place: bool = False, forced: _Forced | None = None
                ) -> list[torch.Tensor]:
    """The pruned model's outputs, or an error that says where it no longer runs."""
    try:
        return _run(pruned, inputs, dtype, inner, in_place, forced=forced)
    except Exception as e:
        where = locate_failure(copy.deepcopy(pruned), inputs)
        raise VerificationError(
            f"the pruned model no longer runs: {type(e).__name__}: {e}. {where}. The forward "
            "probably hard-codes a channel count the surgery changed; compute it from x.size() "
            "or keep that layer with ignore=[...]. The original model is unchanged.") from e


def float32_rounding(model: nn.Module) -> float:
    """The relative error float32 rounding alone may leave between two correct forwards of
    ``model`` that sum in different orders (a pruned layer and its zeroed original do):
    2^-24 * sqrt(sum of every weight's fan-in). It grows as rounding does, with the square root
    of the products summed along the way; on torchvision's classifiers it is 10 to 100 times
    the error measured, and far below what a wrong prune changes (1e-4 and up)."""
    fan_in = sum(p.numel() // p.shape[0] for p in model.parameters() if p.dim() >= 2)
    return 2.0 ** -24 * math.sqrt(fan_in)


def _reference_run(original: nn.Module, plan: Plan, inputs: tuple, dtype: torch.dtype | None,
                   inner: Inner | None, share: bool = False, kept: bool = False,
                   unfired: set[str] | None = None, by_weight: Collection[str] = ()
                   ) -> list[torch.Tensor]:
    """The zeroed reference's outputs: inputs zeroed where the rules allow, weights elsewhere
    (and everywhere if a masked layer was called without its input as a tensor argument).
    ``unfired`` gets the masked layers the run never called; ``by_weight``: layers whose
    weights are zeroed, not their inputs."""
    ref = zeroed_reference(original, plan, share_tensors=share, by_weight=by_weight)
    try:
        out = _kept_run(ref, plan, inputs, dtype, inner, kept)
    except _Untrusted:
        raise
    except Exception:
        if not _masking_failed(ref):
            raise
    else:
        if not _masking_failed(ref):
            if unfired is not None:
                unfired |= _unfired(ref)
            return out
    if inner is not None:
        inner.clear()
    return _kept_run(zeroed_reference(original, plan, share_tensors=share, mask_inputs=False),
                     plan, inputs, dtype, inner, kept)


class _Untrusted(Exception):
    """The reference's cross-channel ops could not all be run on the kept channels."""


def _kept_run(ref: nn.Module, plan: Plan, inputs: tuple, dtype: torch.dtype | None,
              inner: Inner | None, kept: bool) -> list[torch.Tensor]:
    """:func:`_run` of the reference with the plan's cross-channel ops on the kept channels."""
    if not plan.kept_sites:
        return _run(ref, inputs, dtype, inner, kept=kept)
    with KeptRun(ref, plan.kept_sites) as sites:
        try:
            out = _run(ref, inputs, dtype, inner, kept=kept)
        except Exception as e:
            if sites.bad:
                raise _Untrusted(sites.bad) from e
            raise
    if not sites.trusted():
        raise _Untrusted(sites.bad or "a site was not met once")
    return out


def _limits(original: nn.Module) -> dict[str, int]:
    """Layers whose rule compares only their first outputs: path -> how many."""
    return {path: rule.compared_outputs for path, m in original.named_modules()
            for rule in (module_rule(m),)
            if rule is not None and rule.compared_outputs is not None}


#: failures that a more precise pass could overturn (values, not shapes or missing signal)
_VALUES = ("pruned outputs differ", "the output of")


def _raised(report: VerifyReport, raise_on_failure: bool) -> VerifyReport:
    if report.message and raise_on_failure:
        raise VerificationError(f"verification failed: {report.message}. Please report this "
                                "model; the original model is unchanged.")
    return report


def _report(want: list[torch.Tensor], got: list[torch.Tensor], compared: tuple[int, float, str],
            plan: Plan, rtol: float, dtype: torch.dtype | None, layer_by_layer: bool = False
            ) -> VerifyReport:
    """Compare the reference's outputs (``want``) with the pruned model's (``got``), given the
    inner layer comparison (count, worst error, where)."""
    shapes = tuple(tuple(t.shape) for t in got)
    message = ""
    err = 0.0
    layers = 0
    degenerate = not _has_signal(want)
    if shapes != tuple(tuple(t.shape) for t in want):
        message = (f"output shapes differ: pruned {shapes}, original "
                   f"{tuple(tuple(t.shape) for t in want)}")
    elif plan.checks_values:
        for a, b in zip(got, want, strict=True):
            err = max(err, rel_error(a, b))
        layers, inner_err, where = compared
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
    return VerifyReport(not message, plan.checks_values, err, shapes,
                        str(dtype or got[0].dtype if got else ""), message, layers, degenerate,
                        layer_by_layer and plan.checks_values,
                        len(plan.kept_sites) if plan.kept_sites else 0,
                        "" if plan.checks_values else _why_shapes(plan))


def _why_shapes(plan: Plan) -> str:
    """Why a plan is checked by shapes only, in words."""
    return str(plan.settings.get("shapes_only", "a cross-channel op is on a pruned axis"))
